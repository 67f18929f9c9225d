"""Per-kernel split of one forward+backward (torch.profiler), and a small launch-config sweep."""
import sys, itertools, torch, triton
import kernels as K
from torch.profiler import profile, ProfilerActivity

def split(variant, shape):
    B, T, H, N = K.SHAPES[shape]
    xs = K.bench_inputs(variant, B, T, H, N, torch.bfloat16, "cuda")
    dy = torch.randn_like(xs["v"])
    fn = K.rwkv7_attn if variant == "rwkv7" else K.rwkv6_attn
    call = lambda: fn(**xs, backend="triton")[0].backward(dy)
    for _ in range(3): call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5): call()
        torch.cuda.synchronize()
    tot = {}
    for e in p.events():
        if e.device_type.name == "CUDA":
            tot[e.name] = tot.get(e.name, 0) + e.device_time_total / 5 / 1e3
    top = sorted(tot.items(), key=lambda t: -t[1])[:6]
    fb = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median")
    print(f"{shape} {variant} f+b {fb:.3f} ms | " + "  ".join(f"{k[:28]} {v:.3f}" for k, v in top), flush=True)
    return fb

print("sweep: BK, warps_par, BV, warps_seq, C")
for shape in ("q7b-L4k", "smol-L512", "q7b-L512"):
  for variant in ("rwkv7", "rwkv6"):
    for bk, wp, bv, ws, c in [(32, 4, 64, 4, 16), (64, 4, 64, 4, 16), (32, 2, 64, 4, 16), (64, 2, 64, 4, 16),
                              (16, 2, 64, 4, 16), (128, 4, 64, 4, 16), (16, 1, 64, 4, 16), (32, 1, 64, 4, 16),
                              (64, 4, 64, 4, 32), (32, 4, 64, 4, 32), (32, 4, 128, 8, 16)]:
        K._BK, K._WARPS_PAR, K._BV, K._WARPS_SEQ, K._C = bk, wp, bv, ws, c
        try:
            print(variant, (bk, wp, bv, ws, c), end=" ")
            split(variant, shape)
        except Exception as e:
            print("failed", type(e).__name__, str(e)[:200], flush=True)
