"""bf16-input errors against the fp64 oracle of several kernels.py versions, in Triton's interpreter
(bf16 products emulated exactly, chunk-local products in IEEE fp32), same inputs for every version:
    TRITON_INTERPRET=1 python errs_interp.py k_a.py k_b.py ...      (from the repository root)"""
import importlib.util, os, sys, torch
sys.path.insert(0, os.getcwd())
import test_kernels_triton as TT

for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("kernels", path)
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    sys.modules["kernels"] = K                       # run_case imports `kernels`
    for variant in ("rwkv7", "rwkv6"):
        for B, T, H, N, seed in ((2, 100, 3, 32, 7), (2, 300, 3, 64, 7)):
            torch.manual_seed(seed)
            xs = TT.make_inputs(variant, B, T, H, N, seed=seed)
            state = torch.randn(B, H, N, N, dtype=TT.F64)
            e = TT.run_case(variant, xs, state, torch.bfloat16)
            print(f"{os.path.basename(path):<18} {variant} T{T} N{N} " + " ".join(f"{k}={v:.2e}" for k, v in e.items()), flush=True)
