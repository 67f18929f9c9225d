"""Which TF32 does the GPU do? The interpreter run of the GPU error test's bf16 inputs (B 2, T 300,
H 3, N 64, seed 7) with the chunk-local products' operands cut to TF32 three ways, next to the H200's
errors from pytest_gpu.txt (the same r, k, v, log w, a, b and fp64 oracle; the initial state, which
that GPU run drew on CUDA, is drawn here on the CPU three times); last, with the chunk-local products
in IEEE fp32 and the state products and saved chunk states in fp32 too. Run from the repo root:

    TRITON_INTERPRET=1 python docs/runs/kernels-h200/tf32_emulation.py
"""
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import kernels                                                    # noqa: E402
import test_kernels_triton as t                                   # noqa: E402


@triton.jit
def _truncate(x):                                                 # kernels._tf32
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _nearest(x):                                                  # round to nearest even
    u = x.to(tl.uint32, bitcast=True)
    return ((u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _exact(x):                                                    # IEEE fp32 products
    return x


@triton.jit
def _sdot_exact(x, y, PREC: tl.constexpr):                       # state products in IEEE fp32 too
    return tl.dot(x, y, input_precision="ieee")


gpu = {}
for line in (Path(__file__).parent / "pytest_gpu.txt").read_text().splitlines():
    m = re.match(r"ours (\w+) bfloat16 N=64: (.*)", line)
    if m:
        gpu[m[1]] = dict(kv.split("=") for kv in m[2].split())
SDOT, STATE_DTYPE = kernels._sdot, kernels._state_dtype
SEEDS = (0, 1, 2)   # the GPU test drew its initial state on CUDA: here three CPU draws give the spread
for variant in ("rwkv7", "rwkv6"):
    xs = t.make_inputs(variant, 2, 300, 3, 64, seed=7)
    states = [torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
              for s in SEEDS]
    print(f"{variant}, bf16 inputs: relative RMS error against the fp64 oracle (interpreter: min-max over "
          f"{len(SEEDS)} initial states)")
    if variant in gpu:
        print(f"  {'H200 (pytest_gpu.txt)':<30}" + " ".join(f"{n}={e}" for n, e in gpu[variant].items()))
    for name, fn in (("interpreter, TF32 truncated", _truncate), ("interpreter, TF32 to nearest", _nearest),
                     ("interpreter, IEEE fp32", _exact), ("  and fp32 states, products", None)):
        kernels._sdot, kernels._state_dtype = SDOT, STATE_DTYPE
        if fn is None:     # what fla's chunk_gla backward keeps: fp32 states (of 64-token chunks)
            kernels._sdot, kernels._state_dtype = _sdot_exact, lambda x: torch.float32
        else:
            kernels._tf32 = fn
        errs = [t.run_case(variant, xs, state, torch.bfloat16) for state in states]
        print(f"  {name:<30}" + " ".join(f"{n}={min(e[n] for e in errs) * 1e3:.2f}-{max(e[n] for e in errs) * 1e3:.2f}"
                                         for n in errs[0]) + " (e-3)", flush=True)
