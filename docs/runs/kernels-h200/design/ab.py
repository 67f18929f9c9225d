"""A/B of kernels.py versions in one process on one GPU: errors against the fp64 oracle (small
shape), forward / forward+backward ms, per-kernel split, peak memory; fla beside them if importable.
    python ab.py k_a.py k_b.py k_b.py:_WARPS_SEQ=8,_BV=128 ...   (SHAPES=q7b-L4k,... FLA=1)
A spec is a copy of kernels.py and, after ':', module constants to override (each spec is its own
module). Run from the repository root of the version these outputs came from (it uses that version's
test_kernels_triton.make_inputs/run_case and kernels.SHAPES/bench_inputs)."""
import importlib.util, os, sys, math, torch, triton
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.getcwd())
import test_kernels_triton as TT

def load(spec_str):
    path, _, sets = spec_str.partition(":")
    spec = importlib.util.spec_from_file_location(f"k{abs(hash(spec_str))}", path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    for kv in filter(None, sets.split(",")):
        name, val = kv.split("=")
        setattr(m, name, int(val))
    return m

mods = [(p, load(p)) for p in sys.argv[1:]]
bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: TRITON_INTERPRET=1 smoke test of this script

def errs(K, variant, dtype, N):
    xs = TT.make_inputs(variant, 2, 300 if DEV == "cuda" else 40, 3, N, seed=7, device=DEV)
    state = torch.randn(2, 3, N, N, dtype=TT.F64, device=DEV)
    sys.modules["kernels"] = K                      # run_case imports `kernels`
    e = TT.run_case(variant, xs, state, dtype)
    return max(e.values()), e

for p, K in mods if os.environ.get("ERRS", "1") == "1" else []:
    for variant in ("rwkv7", "rwkv6"):
        for dtype, N in ((torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 128)) if DEV == "cuda" else ((torch.float32, 16),):
            try:
                mx, e = errs(K, variant, dtype, N)
            except Exception as ex:
                print(f"err {p:<34} {variant} failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                continue
            print(f"err {p:<34} {variant} {str(dtype)[6:]:<8} N={N:<4} max {mx:.1e}  " +
                  " ".join(f"{k}={v:.1e}" for k, v in e.items()), flush=True)

if DEV == "cpu":
    sys.exit(0)


def split(call):
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(5): call()
        torch.cuda.synchronize()
    tot = {}
    for e in pr.events():
        if e.device_type.name == "CUDA":
            tot[e.name] = tot.get(e.name, 0) + e.device_time_total / 5 / 1e3
    return "  ".join(f"{k[:16]} {v:.2f}" for k, v in sorted(tot.items(), key=lambda t: -t[1])[:4])

def peak(call):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    call(); torch.cuda.synchronize(); return (torch.cuda.max_memory_allocated() - base) / 2**20

fla = None
if os.environ.get("FLA"):
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.rwkv7 import chunk_rwkv7
        fla = (chunk_rwkv7, chunk_gla)
    except ImportError:
        pass
for shape in os.environ.get("SHAPES", "q7b-L4k,q7b-L512,smol-L512").split(","):
    B, T, H, N = mods[0][1].SHAPES[shape]
    for variant in ("rwkv7", "rwkv6"):
        xs = mods[0][1].bench_inputs(variant, B, T, H, N, torch.bfloat16, "cuda")
        dy = torch.randn_like(xs["v"])
        for p, K in mods:
            fn = K.rwkv7_attn if variant == "rwkv7" else K.rwkv6_attn
            call = lambda: fn(**xs, backend="triton")[0].backward(dy)
            try:
                with torch.no_grad():
                    f = bench(lambda: fn(**xs, backend="triton"))
                fb = bench(call)
                print(f"time {shape:<9} {variant} {p:<34} f {f:7.3f}  f+b {fb:7.3f}  peak {peak(call):6.0f} MiB | {split(call)}", flush=True)
            except Exception as e:                       # one failing spec must not end the comparison
                print(f"time {shape:<9} {variant} {p:<34} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if fla:
            x = {n: t.detach().bfloat16().requires_grad_() for n, t in xs.items()}
            if variant == "rwkv7":
                c = lambda: fla[0](x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5, safe_gate=True,
                                   lower_bound=-math.exp(-0.5), chunk_size=64)[0]
            else:
                c = lambda: fla[1](x["r"], x["k"], x["v"], x["log_w"], scale=N ** -0.5)[0]
            with torch.no_grad():
                f = bench(c)
            fb = bench(lambda: c().backward(dy))
            print(f"time {shape:<9} {variant} {'fla':<34} f {f:7.3f}  f+b {fb:7.3f}  peak {peak(lambda: c().backward(dy)):6.0f} MiB", flush=True)
        del xs
        torch.cuda.empty_cache()

for B in (1, 64):                                    # one decode step, H=28, N=128, state in place
    with torch.no_grad():
        xs = {n: t.detach() for n, t in mods[0][1].bench_inputs("rwkv7", B, 1, 28, 128, torch.bfloat16, "cuda").items()}
        S = torch.zeros(B, 28, 128, 128, device="cuda")
        for p, K in mods:
            try:
                print(f"decode B={B:<3} {p:<34} {1e3 * bench(lambda: K.rwkv7_attn(**xs, state=S, backend='triton')):7.1f} us", flush=True)
            except Exception as e:
                print(f"decode B={B:<3} {p:<34} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
