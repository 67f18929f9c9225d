"""The RAD-RWKV recurrences (METHOD.md §3-§4): a step-by-step reference, a chunked PyTorch path,
and (later) Triton kernels, behind one public function per recurrence.

State S per (batch, head) is laid out [K, V] (fla's layout; METHOD §3 writes the transpose):

    RAD-RWKV7 (DPLR):  S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ
    RAD-RWKV6 (GLA):   S_t = diag(e^{log_w_t}) S_{t-1} + k_t v_tᵀ
    both:              y_t = scale · S_tᵀ r_t,   scale = N^-½ by default

with METHOD's a = −κ, b = κ ⊙ iclr, k = k̃ for RWKV7. The chunk form, its numerics and the
design of the Triton kernels are in ../shared/KERNELS.md. File order: plain reference, chunked
PyTorch path, Triton kernels (to come), public entry points, benchmark.

    python kernels.py --bench                      # chunked torch path vs step-by-step, CPU or GPU
    python -m pytest -q test_kernels.py            # parity tests against fp64 oracles
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# 1. Plain reference: one token at a time (the specification and the decode path)
# ---------------------------------------------------------------------------------------------

def _step(q, w, k, v, a, b, S):
    """One recurrence step. q (already scaled), w = e^{log_w}, k, v, a, b: (B, H, N); a = b = None
    for RWKV6. S: (B, H, K, V). Returns y (B, H, V) and the new S."""
    S_new = w[..., :, None] * S + k[..., :, None] * v[..., None, :]
    if a is not None:
        S_new = S_new + b[..., :, None] * (a[..., None, :] @ S)       # b (aᵀ S_{t-1}): rank 1
    y = (q[..., None, :] @ S_new).squeeze(-2)                          # y = S_tᵀ q
    return y, S_new


def _naive(q, log_w, k, v, a, b, S):
    """Step-by-step loop over T. Inputs (B, T, H, N) in the compute dtype, S (B, H, N, N).
    Autograd keeps every S_t: O(T N²) memory, which is fine for an oracle and for short T."""
    w = log_w.exp()
    ys = []
    for t in range(q.shape[1]):
        y, S = _step(q[:, t], w[:, t], k[:, t], v[:, t],
                     None if a is None else a[:, t], None if b is None else b[:, t], S)
        ys.append(y)
    return torch.stack(ys, 1), S


# ---------------------------------------------------------------------------------------------
# 2. Chunked PyTorch path (KERNELS.md "Chunk form"): exact, any T, any N, autograd
# ---------------------------------------------------------------------------------------------
# Chunk sizes, chosen for CPU speed. RWKV7's work per token is ~(9·C/N + 5)·N² multiply-adds
# in small matmuls (the pairwise matrices, the solve and the intra-chunk products grow with C;
# the state pass does not), so a smaller C does less arithmetic but runs more, smaller matmuls
# and a longer Python loop. Measured at smol-L512 (B = 2, N = 64, one core, forward+backward):
# C = 16: 84 ms, 32: 86 ms, 64: 100 ms; 32 keeps half the per-chunk N×N tensors of 16.
# RWKV6: 16, the largest chunk whose mid-referenced decay factors stay inside fp32 at
# log w = −5 (8 · 5 = 40 nats, see _MAX_NATS); its intra-chunk work is small and its state
# update elementwise, so the short chunk costs little.
CHUNK = {"rwkv7": 32, "rwkv6": 16}
# Within a chunk, decay factors are e^{γ_i − ρ} and e^{ρ − γ_j} with ρ the cumsum at the middle
# row, so their exponents are bounded by ⌈C/2⌉ · max|log w|. Keep that ≤ 40 nats: the factors
# stay normal fp32 numbers (e^±40 ≈ 2e17, far from e^±87), and their products, which equal
# e^{γ_i − γ_j} ≤ 1 on the causal side, are exact. Stronger decays get a smaller chunk.
_MAX_NATS = 40.0


def _safe_chunk(log_w, chunk):
    """Largest chunk ≤ `chunk` (halving) whose decay factors stay within ±_MAX_NATS."""
    g_max = float(log_w.detach().abs().max()) if log_w.numel() else 0.0
    while chunk > 1 and math.ceil(chunk / 2) * g_max > _MAX_NATS:
        chunk //= 2
    return chunk


def _to_chunks(x, C):
    """(B, T, H, N) -> (n_chunks, B, H, C, N), zero-padded at the end of T. Zero padding is an
    identity step for every input (log_w = 0 means w = 1; k = v = a = b = 0 add nothing).
    Chunk index first, so that the state loop reads contiguous (B, H, N, N) slices."""
    B, T, H, N = x.shape
    nc = -(-T // C)
    x = F.pad(x, (0, 0, 0, 0, 0, nc * C - T))
    return x.view(B, nc, C, H, N).permute(1, 0, 3, 2, 4).contiguous()


def _pairwise(x_in, y_in, strict, x=None, y=None):
    """Lower-triangular A[i, j] = Σ_d x_in_id y_in_jd (j < i), plus the diagonal Σ_d x_id y_id
    when x, y are given. masked_fill, not a product with the mask: the anti-causal side can
    overflow to inf. The diagonal carries no decay (e^0), so it is taken from the raw inputs:
    through the gated ones it would send d log_w two terms that cancel exactly and leave only
    rounding (30× the error of the step-by-step path at log w = −5)."""
    A = (x_in @ y_in.mT).masked_fill(~strict, 0)
    if x is not None:
        A.diagonal(dim1=-2, dim2=-1).copy_((x * y).sum(-1))
    return A


def _chunked(q, log_w, k, v, a, b, S, chunk):
    """Chunk-parallel form. Inputs (B, T, H, N) in the compute dtype (q already scaled), a = b =
    None for RWKV6, S (B, H, N, N). Returns y (B, T, H, N), S_T.

    Per chunk of C tokens with S_0 its initial state, γ the inclusive cumsum of log w within the
    chunk, ε = γ − log w (exclusive), γ_C the last row, ρ = γ at the middle row:
      Ũ_i = a_iᵀ S_{i−1} solves (I − A_ab) Ũ = (a⊙e^ε) S_0 + A_ak V, so Ũ = U + W S_0 with
        [W | U] = (I − A_ab)^{-1} [a⊙e^ε | A_ak V]                        (WY/UT form)
      Y   = (q⊙e^γ + A_qb W) S_0 + A_qk V + A_qb U
      S_C = (diag(e^{γ_C}) + (b⊙e^{γ_C−γ})ᵀ W) S_0 + (k⊙e^{γ_C−γ})ᵀ V + (b⊙e^{γ_C−γ})ᵀ U
    where A_xy[i, j] = Σ_d x_id y_jd e^{γ_id − γ_jd} (j ≤ i; with ε_i for x = a and j < i).
    Everything S_0-free is computed for all chunks at once; the loop over chunks only carries S
    (two C×N×N products per chunk for RWKV7, one elementwise update for RWKV6). Memory: inputs,
    O(C) per token for the pairwise matrices, and N×N per chunk (D and the chunk states)."""
    B, T, H, N = q.shape
    C = _safe_chunk(log_w, chunk)
    q, g, k, v = (_to_chunks(x, C) for x in (q, log_w, k, v))       # (nc, B, H, C, N)
    gam = g.cumsum(-2)                                                # γ, inclusive
    gam_C = gam[..., -1:, :]                                          # (nc, B, H, 1, N)
    # ρ only splits e^{γ_i − γ_j} into two bounded factors; the product does not depend on it,
    # so no gradient flows through it.
    rho = gam[..., max(C // 2 - 1, 0), None, :].detach()
    # exp is ~10× the cost of a multiply on CPU: two full-size exps, the other factors are
    # products of bounded ones (each within e^±40, so the products are exact too).
    E = (gam - rho).exp()                                             # e^{γ − ρ}
    E_inv = E.reciprocal()                                            # e^{ρ − γ}
    q_in, k_in = q * E, k * E_inv                                     # pairwise (intra-chunk) use
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A_qk = _pairwise(q_in, k_in, strict, q, k)                        # (nc, B, H, C, C)
    Y = A_qk @ v                                                      # intra-chunk part
    q_out = q_in * rho.exp()                                          # q⊙e^γ reads S_0, ≤ 1
    decay_C = E_inv * (gam_C - rho).exp()                             # e^{γ_C − γ} ≤ 1
    D = (k * decay_C).mT @ v                                          # (nc, B, H, N, N)
    decay_S = gam_C.mT.exp()                                          # (nc, B, H, N, 1): e^{γ_C}
    if a is not None:
        a, b = _to_chunks(a, C), _to_chunks(b, C)
        a_in = a * (gam - g - rho).exp()                              # a⊙e^{ε − ρ}, ε exclusive
        b_in = b * E_inv
        A_qb = _pairwise(q_in, b_in, strict, q, b)
        A_ak, A_ab = _pairwise(a_in, k_in, strict), _pairwise(a_in, b_in, strict)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        rhs = torch.cat([a_in * rho.exp(), A_ak @ v], -1)             # [a⊙e^ε | A_ak V]
        WU = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
        W, U = WU[..., :N], WU[..., N:]                               # (nc, B, H, C, N) each
        Y = Y + A_qb @ U
        q_out = q_out + A_qb @ W
        b_out = b * decay_C
        D = D + b_out.mT @ U
    # unbind once, not D[c] in the loop: autograd would then write a full-size zero gradient
    # for every chunk (quadratic in T / C; it was a quarter of the backward time).
    low_rank = zip(b_out.mT.unbind(), W.unbind()) if a is not None else [None] * q.shape[0]
    S_in = []                                                         # S_0 of every chunk
    for decay_c, D_c, bW in zip(decay_S.unbind(), D.unbind(), low_rank):
        S_in.append(S)
        S_next = decay_c * S + D_c
        if bW is not None:                                            # + (b⊙e^{γ_C−γ})ᵀ W S_0
            S_next = S_next + bW[0] @ (bW[1] @ S)
        S = S_next
    Y = Y + q_out @ torch.stack(S_in)                                 # (nc, B, H, C, N)
    Y = Y.permute(1, 0, 3, 2, 4).reshape(B, -1, H, N)[:, :T]          # (B, T, H, N)
    return Y, S


# ---------------------------------------------------------------------------------------------
# 3. Triton kernels, launchers and the autograd Function go here (KERNELS.md "A lean design").
#    Contract: _triton(q, log_w, k, v, a, b, S) with the same arguments and results as
#    _chunked(...) minus `chunk`; set _TRITON_READY = True once it exists.
# ---------------------------------------------------------------------------------------------
_TRITON_READY = False


def _triton(q, log_w, k, v, a, b, S):
    raise NotImplementedError("the Triton backend of kernels.py is not written yet; "
                              "use backend='torch' (or 'auto', which picks it)")


# ---------------------------------------------------------------------------------------------
# 4. Public entry points
# ---------------------------------------------------------------------------------------------
BACKENDS = ("auto", "naive", "torch", "triton")


def _check(fn, tensors, state, backend):
    """One-line errors for bad inputs: name the problem and the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend={backend!r} is unknown; use one of {BACKENDS}")
    shape = tensors["r"].shape
    if len(shape) != 4 or shape[1] == 0:
        raise ValueError(f"{fn}: r has shape {tuple(shape)}; inputs must be (B, T, H, N) with T ≥ 1")
    for name, x in tensors.items():
        if x.shape != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)} but r has {tuple(shape)}; "
                             "all inputs must share (B, T, H, N) (repeat GQA k/v heads first)")
        if not x.is_floating_point():
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}; inputs must be floating point")
    B, _, H, N = shape
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"{fn}: state has shape {tuple(state.shape)}, expected (B, H, N, N) = "
                         f"{(B, H, N, N)} in [K, V] layout")


def _attn(variant, r, log_w, k, v, a, b, state, scale, backend):
    fn = f"{variant}_attn"
    named = dict(r=r, log_w=log_w, k=k, v=v) | ({} if a is None else dict(a=a, b=b))
    _check(fn, named, state, backend)
    B, T, H, N = r.shape
    if backend == "auto":
        tensors = [*named.values()] + ([] if state is None else [state])
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        if r.is_cuda and _TRITON_READY:
            backend = "triton"            # it has its own decode path
        elif T == 1 and not grad:         # decoding: one recurrence step, no chunk set-up
            backend = "naive"
        else:
            backend = "torch"
    cd = torch.float64 if r.dtype == torch.float64 else torch.float32  # compute + state dtype
    S = torch.zeros(B, H, N, N, dtype=cd, device=r.device) if state is None else state.to(cd)
    q = r.to(cd) * (N ** -0.5 if scale is None else scale)
    log_w, k, v = log_w.to(cd), k.to(cd), v.to(cd)
    if a is not None:
        a, b = a.to(cd), b.to(cd)
    if backend == "naive":
        y, S = _naive(q, log_w, k, v, a, b, S)
    elif backend == "torch":
        y, S = _chunked(q, log_w, k, v, a, b, S, CHUNK[variant])
    else:
        y, S = _triton(q, log_w, k, v, a, b, S)
    return y.to(r.dtype), S


def rwkv7_attn(r, log_w, k, v, a, b, state=None, scale=None, backend="auto"):
    """RAD-RWKV7 time mixing (METHOD §3), the DPLR / generalised delta rule, in [K, V] layout:

        S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ
        y_t = scale · S_tᵀ r_t

    r, log_w, k, v, a, b: (B, T, H, N), any float dtype; log_w ≤ 0 per key channel (METHOD keeps
        it in [−e^{−0.5}, 0); stronger decays also work, with a smaller chunk), a = −κ,
        b = κ ⊙ iclr, k = k̃ = k ⊙ (1 − w + iclr) (state balancing).
    state: (B, H, N, N) [K, V] initial state S_0, or None for zeros.
    scale: default N^-½.
    backend: "naive" (step by step, the oracle), "torch" (chunked, autograd), "triton" (CUDA,
        not written yet), "auto" (triton on CUDA once it exists; otherwise torch, except T = 1
        without grad, which runs one naive step).
    Returns y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in fp32 (fp64 for fp64
    inputs). Decoding calls this with T = 1 and the carried state; every backend computes in
    fp32 at least, and S_T of one call continues exactly into the next.
    """
    return _attn("rwkv7", r, log_w, k, v, a, b, state, scale, backend)


def rwkv6_attn(r, log_w, k, v, state=None, scale=None, backend="auto"):
    """RAD-RWKV6 time mixing (METHOD §4), gated linear attention, in [K, V] layout:

        S_t = diag(e^{log_w_t}) S_{t-1} + k_t v_tᵀ
        y_t = scale · S_tᵀ r_t

    r, log_w, k, v: (B, T, H, N), any float dtype; log_w ≤ 0 per key channel (METHOD clamps it to
        [−5, 0); stronger decays also work, with a smaller chunk); k is already state-balanced.
    state, scale, backend and the results: as rwkv7_attn.
    """
    return _attn("rwkv6", r, log_w, k, v, None, None, state, scale, backend)


# ---------------------------------------------------------------------------------------------
# 5. Benchmark: chunked torch path next to the step-by-step path, same run, same machine
# ---------------------------------------------------------------------------------------------
SHAPES = {"smol-L512": (16, 512, 9, 64), "smol-L4k": (2, 4096, 9, 64),      # BENCHMARKS.md
          "q7b-L512": (32, 512, 28, 128), "q7b-L4k": (4, 4096, 28, 128), "q7b-L16k": (1, 16384, 28, 128)}


# On CPU only what fits a 2-core machine: smol-L512 at B = 2, and smol-L4k at B = 1, T = 1024.
# There the chunked forward is only ~2× the step loop (RWKV7 at N = 64 does ~2× the recurrence's
# arithmetic, in matmuls that run ~4× faster); forward+backward gains 7-20×, since autograd of
# the step loop walks T tiny steps back. On a shared CPU use --threads 1: two OpenMP threads
# waiting on a busy core made single runs up to 100× slower.
CPU_SHAPES = {"smol-L512": dict(B=2), "smol-L4k": dict(B=1, T=1024)}


@dataclass
class BenchConfig:
    shapes: str = ""          # comma-separated SHAPES names; "" = all on GPU, CPU_SHAPES on CPU
    batch: int = 0            # override B (0 = the shape's own, reduced on CPU)
    seq: int = 0              # override T (0 = the shape's own, reduced on CPU)
    variants: str = "rwkv7,rwkv6"
    reps: int = 5             # timed repetitions on CPU (median); GPU uses triton's do_bench
    threads: int = 0          # CPU threads (0 = torch's default)
    naive_gb: float = 8.0     # skip the naive fwd+bwd when its saved states exceed this


def bench_inputs(variant, B, T, H, N, dtype, device, seed=0):
    """Inputs in the range METHOD's parameterisation produces, requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=gen)
    r, k, v = rnd(), rnd(), rnd()
    if variant == "rwkv7":
        log_w = -math.exp(-0.5) * torch.sigmoid(rnd())
        kk, iclr = F.normalize(rnd(), dim=-1), torch.sigmoid(rnd())
        xs = dict(r=r, log_w=log_w, k=k * (1 - log_w.exp() + iclr), v=v, a=-kk, b=kk * iclr)
    else:
        log_w = torch.clamp(-torch.exp(rnd()), min=-5.0)
        xs = dict(r=r, log_w=log_w, k=k * (1 - log_w.exp()), v=v)
    return {n: x.to(device, dtype if n != "log_w" else torch.float32).requires_grad_()
            for n, x in xs.items()}


def _time_ms(fn, cuda, reps):
    if cuda:
        import triton
        return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
    fn()                                                              # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def bench(cfg: BenchConfig):
    """One row per backend: forward and forward+backward time, and the speed-up over naive."""
    cuda = torch.cuda.is_available()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # bf16 is slow on CPU
    names = cfg.shapes.split(",") if cfg.shapes else list(SHAPES if cuda else CPU_SHAPES)
    backends = ["naive", "torch"] + (["triton"] if cuda and _TRITON_READY else [])
    fns = {"rwkv7": rwkv7_attn, "rwkv6": rwkv6_attn}
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, inputs {dtype}, "
          f"{torch.get_num_threads()} threads; median ms; x = naive time / this time")
    head = (f"{'shape':<10} {'B':>3} {'T':>6} {'H':>3} {'N':>4} {'variant':<7} {'backend':<7} "
            f"{'fwd':>9} {'x':>6} {'fwd+bwd':>9} {'x':>6}")
    print(head + "\n" + "-" * len(head))
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {list(SHAPES)}")
        B, T, H, N = SHAPES[name]
        small = {} if cuda else CPU_SHAPES.get(name, {})
        B, T = cfg.batch or small.get("B", B), cfg.seq or small.get("T", T)
        for variant in cfg.variants.split(","):
            xs = bench_inputs(variant, B, T, H, N, dtype, device)
            cot = [torch.randn_like(xs["v"]), torch.randn(B, H, N, N, device=device)]
            ms = {}
            for backend in backends:
                call = lambda: fns[variant](**xs, backend=backend)
                with torch.no_grad():
                    f = _time_ms(call, cuda, cfg.reps)
                fb = lambda: torch.autograd.grad(call(), list(xs.values()), cot)
                saved_gb = B * H * T * N * N * 4 / 1e9 * (2 if variant == "rwkv7" else 1)
                skip = backend == "naive" and saved_gb > cfg.naive_gb    # the oracle keeps every S_t
                ms[backend] = f, (float("nan") if skip else _time_ms(fb, cuda, cfg.reps))
                x_f, x_fb = (ms["naive"][i] / ms[backend][i] for i in (0, 1))
                print(f"{name:<10} {B:>3} {T:>6} {H:>3} {N:>4} {variant:<7} {backend:<7} "
                      f"{ms[backend][0]:>9.2f} {x_f:>6.1f} {ms[backend][1]:>9.2f} {x_fb:>6.1f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", action="store_true", help="time the backends (the only action)")
    for f, d in BenchConfig.__dataclass_fields__.items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(d.default), default=d.default)
    args = p.parse_args()
    if not args.bench:
        p.error("nothing to do; pass --bench")
    bench(BenchConfig(**{f: getattr(args, f) for f in BenchConfig.__dataclass_fields__}))


if __name__ == "__main__":
    main()
