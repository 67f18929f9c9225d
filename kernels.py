"""The RAD-RWKV recurrences (METHOD.md §3-§4): a step-by-step reference, a chunked PyTorch path,
and Triton kernels (CUDA; Triton's interpreter on CPU), behind one public function per recurrence.

State S per (batch, head) is laid out [K, V] (fla's layout; METHOD §3 writes the transpose):

    RAD-RWKV7 (DPLR):  S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ
    RAD-RWKV6 (GLA):   S_t = diag(e^{log_w_t}) S_{t-1} + k_t v_tᵀ
    both:              y_t = scale · S_tᵀ r_t,   scale = N^-½ by default

with METHOD's a = −κ, b = κ ⊙ iclr, k = k̃ for RWKV7. The chunk form, its numerics and the
design of the Triton kernels are in ../shared/KERNELS.md. File order: plain reference, chunked
PyTorch path, Triton kernels, public entry points, benchmark.

    python kernels.py --bench                      # CPU: torch vs naive; GPU: triton vs fla, SDPA
    python -m pytest -q test_kernels.py            # parity tests against fp64 oracles
    python -m pytest -q test_kernels_triton.py     # the Triton backend (interpreter on CPU)
"""
import argparse
import functools
import math
import os
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
# 3. Triton kernels (KERNELS.md "A lean design"), launchers and the autograd Function
# ---------------------------------------------------------------------------------------------
# Forward: _pairs_kernel, the S-free C×C matrices of all chunks in parallel, then _fwd_kernel,
# one sequential pass over the chunks that writes Y as it goes (and, when a backward follows, S₀
# of every chunk and RWKV7's u). Backward: _dstate_kernel, the reverse sequential pass (stores
# ∂L/∂S at the end of every chunk, writes dV and RWKV7's dz as it goes), then _vpairs_kernel, the
# V-side C×C matrices of all chunks in parallel, and _grad_kernel, the K-side gradients of all
# chunks in parallel. Decode: _step_kernel. Math in fp32 (inputs of any float dtype are converted
# on load); for 16-bit inputs on a GPU the tensor-core products with a state operand take bf16
# operands and the chunk-local ones TF32 (_sdot, _dot; IEEE fp32 for fp32 inputs), the triangular
# inverse in IEEE fp32. Saved for backward: the inputs, the pair matrices, the states of every
# chunk (bf16 for 16-bit inputs, _state_dtype) and u; everything else is recomputed.
try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:                   # no Triton on this platform: backend="triton" raises
    import types
    triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=None)
    _HAVE_TRITON = False

# ---------------------------------------------------------------------------------------------
# Chunk symbols (KERNELS.md), chunk of C rows i, per key channel d:
#   γ_i = Σ_{j≤i} g_j (inclusive cumsum), ε_i = γ_i − g_i, γ_C = Σ_j g_j, ref = γ_C / 2.
#   Every pairwise factor e^{γ_i−γ_j} is split as e^{γ_i−ref}·e^{ref−γ_j}; |γ−ref| ≤ C/2·max|g|,
#   so C = 16 keeps both factors inside fp32 even for RWKV6's log w = −5 (e^{±40}).
#   q⁺ = r e^{γ−ref}, k⁻ = k e^{ref−γ}, b⁻ = b e^{ref−γ}, a⁺ = a e^{ε−ref}
#   A_qk = tril(q⁺ k⁻ᵀ), A_qb = tril(q⁺ b⁻ᵀ), A_ak = stril(a⁺ k⁻ᵀ), A_ab = stril(a⁺ b⁻ᵀ)
#   r₀ = r e^{γ}, a₀ = a e^{ε}, k_C = k e^{γ_C−γ}, b_C = b e^{γ_C−γ}
#   T = (I − A_ab)^{-1};  u_i = a_iᵀ S_{i−1} = T (a₀ S₀ + A_ak V)
#   Y = scale (r₀ S₀ + A_qk V + A_qb u);   S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bf16(x):
    """x rounded to bf16 (to nearest, ties to even) and held in fp32: the interpreter's stand-in for
    bf16 tensor-core products, which are exact in fp32 once the operands are bf16."""
    u = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32(x):
    """x with its mantissa cut to TF32's 10 bits, truncated: the interpreter's stand-in for a GPU's
    TF32 products, which read only those bits of each fp32 operand: on the GPU test's inputs the
    interpreter's errors then equal an H200's to two digits, and rounding to nearest here would
    lower them by up to 4e-4 (docs/results-2xh200/seventh/tf32_emulation.txt)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(x, y, PREC: tl.constexpr):
    """x @ y of chunk-local operands, fp32 sums: TF32 products for 16-bit inputs on a GPU (emulated
    in the interpreter), IEEE fp32 otherwise."""
    if PREC == "emu":
        return tl.dot(_tf32(x), _tf32(y), input_precision="ieee")
    else:
        return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _sdot(x, y, PREC: tl.constexpr):
    """x @ y with a state operand (S or dS, rows × V): bf16 products for 16-bit inputs (emulated
    with bf16-rounded operands in the interpreter), IEEE fp32 for fp32 inputs. These are most of
    the kernels' tensor-core time; the chunk-local products stay TF32, where bf16 would cost
    accuracy (H200: RWKV6 d log w 1.2e-2 instead of 3.4e-3)."""
    if PREC == "tf32":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    elif PREC == "emu":
        return tl.dot(_bf16(x), _bf16(y), input_precision="ieee")
    else:
        return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _cast(x, ptr, PREC: tl.constexpr):
    """x in the dtype of ptr's elements. The interpreter's fp32 -> bf16 conversion truncates where a
    GPU rounds to nearest even, so there x is rounded first."""
    if PREC == "emu":
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _tril_inverse(A, C: tl.constexpr):
    """(I − A)^{-1} for strictly lower-triangular A (C, C): A is nilpotent (A^C = 0), so
    (I − A)^{-1} = (I + A)(I + A²)(I + A⁴)…; fp32 products in IEEE precision (not TF32)."""
    rows = tl.arange(0, C)
    Tm = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) + A
    P = A
    for s in tl.static_range(1, 7):
        if (1 << s) < C:
            P = tl.dot(P, P, input_precision="ieee")                      # A^(2^s)
            Tm += tl.dot(Tm, P, input_precision="ieee")
    return Tm


@triton.jit
def _chunk_prep(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR: tl.constexpr, C: tl.constexpr):
    """Loads one chunk's (C, K) key-side inputs (rows past T read as identity steps: g = 0,
    r = k = a = b = 0) and returns the fp32 gated operands and decays of the chunk."""
    g = tl.load(w_ptr + offk, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offk, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + offk, mask=m, other=0.0).to(tl.float32)
    gam = tl.cumsum(g, axis=0)                     # γ (C, K)
    gC = tl.sum(g, axis=0)                         # γ_C (K,)
    ref = gC * 0.5
    qp = r * tl.exp(gam - ref[None, :])            # q⁺
    kn = k * tl.exp(ref[None, :] - gam)            # k⁻
    r0 = r * tl.exp(gam)                           # r₀
    kC = k * tl.exp(gC[None, :] - gam)             # k_C
    if DPLR:
        a = tl.load(a_ptr + offk, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offk, mask=m, other=0.0).to(tl.float32)
        eps = gam - g
        ap = a * tl.exp(eps - ref[None, :])        # a⁺
        bn = b * tl.exp(ref[None, :] - gam)        # b⁻
        a0 = a * tl.exp(eps)                       # a₀
        bC = b * tl.exp(gC[None, :] - gam)         # b_C
    else:
        a = r
        b = r
        ap = qp
        bn = kn
        a0 = r0
        bC = kC
    return g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC


@triton.jit
def _pairs(qp, kn, ap, bn, DPLR: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """Pairwise chunk matrices A_qk, A_qb (causal, j ≤ i), A_ak, A_ab (strict, j < i) and
    T = (I − A_ab)^{-1}; for RWKV6 only A_qk is real (the rest alias it)."""
    ri = tl.arange(0, C)
    causal = ri[:, None] >= ri[None, :]
    strict = ri[:, None] > ri[None, :]
    A_qk = tl.where(causal, _dot(qp, tl.trans(kn), PREC), 0.0)
    if DPLR:
        A_qb = tl.where(causal, _dot(qp, tl.trans(bn), PREC), 0.0)
        A_ak = tl.where(strict, _dot(ap, tl.trans(kn), PREC), 0.0)
        A_ab = tl.where(strict, _dot(ap, tl.trans(bn), PREC), 0.0)
        Tm = _tril_inverse(A_ab, C)
    else:
        A_qb = A_qk
        A_ak = A_qk
        Tm = A_qk
    return A_qk, A_qb, A_ak, Tm


@triton.jit
def _chunk_offsets(ib, ih, it, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, ck, cv):
    """Row mask and element offsets of chunk `it` of sequence ib, head ih, for the key channels ck
    and value channels cv of (B, T, H, ·) token-major tensors."""
    t = it * C + tl.arange(0, C)
    row = (ib * T + t) * H + ih                                           # (C,) token rows
    return (t < T)[:, None], row[:, None] * K + ck[None, :], row[:, None] * V + cv[None, :]


@triton.jit
def _pair_block(p_ptr, ibh, it, NT, NM: tl.constexpr, C: tl.constexpr):
    """Pointers to matrix 0 of chunk `it`'s NM C × C pair matrices in p (B, H, NT, NM, C, C);
    matrix j is at + j·C·C."""
    ri = tl.arange(0, C)
    return p_ptr + (ibh * NT + it) * NM * C * C + ri[:, None] * C + ri[None, :]


@triton.jit(do_not_specialize=["T"])
def _pairs_kernel(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p_ptr, q_ptr, T, H: tl.constexpr, K: tl.constexpr,
                  C: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """The S-free matrices of every chunk, one program per (chunk, batch·head), all in parallel,
    into p[chunk] (C × C) and, for RWKV7, q[chunk] (C × K):
        RWKV6: A_qk.   RWKV7: A_qk, A_qb, A_ak, M = T A_ak, M_z = A_qb T;  W = T a₀, B = Tᵀ b_C,
    so that the sequential passes' chains from one state to the next are two dots deep:
        u = W S₀ + M V  (forward),   dz = M_zᵀ dŶ + B dS  (backward)."""
    it = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    ck = tl.arange(0, K)
    m, offk, offv = _chunk_offsets(ibh // H, ibh % H, it, T, H, K, K, C, ck, ck)
    g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC = _chunk_prep(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    A_qk, A_qb, A_ak, Tm = _pairs(qp, kn, ap, bn, DPLR, C, PREC)
    p = _pair_block(p_ptr, ibh, it, tl.cdiv(T, C), NM, C)
    tl.store(p, A_qk)
    if DPLR:
        tl.store(p + C * C, A_qb)
        tl.store(p + 2 * C * C, A_ak)
        tl.store(p + 3 * C * C, _dot(Tm, A_ak, PREC))
        tl.store(p + 4 * C * C, _dot(A_qb, Tm, PREC))
        ri = tl.arange(0, C)
        q = q_ptr + (ibh * tl.cdiv(T, C) + it) * 2 * C * K + ri[:, None] * K + ck[None, :]
        tl.store(q, _dot(Tm, a0, PREC))
        tl.store(q + C * K, _dot(tl.trans(Tm), bC, PREC))


@triton.jit
def _load_pairs(p_ptr, ibh, it, NT, NM: tl.constexpr, DPLR: tl.constexpr, C: tl.constexpr):
    """_pairs_kernel's C × C matrices of chunk `it`: A_qk, A_qb, A_ak, M, M_z (RWKV6: A_qk alone,
    aliased as the others)."""
    p = _pair_block(p_ptr, ibh, it, NT, NM, C)
    A_qk = tl.load(p)
    if DPLR:
        A_qb = tl.load(p + C * C)
        A_ak = tl.load(p + 2 * C * C)
        M = tl.load(p + 3 * C * C)
        Mz = tl.load(p + 4 * C * C)
    else:
        A_qb = A_qk
        A_ak = A_qk
        M = A_qk
        Mz = A_qk
    return A_qk, A_qb, A_ak, M, Mz


@triton.jit
def _load_wb(q_ptr, ibh, it, NT, C: tl.constexpr, K: tl.constexpr):
    """_pairs_kernel's W = T a₀ and B = Tᵀ b_C of chunk `it` (C, K), RWKV7."""
    q = q_ptr + (ibh * NT + it) * 2 * C * K + tl.arange(0, C)[:, None] * K + tl.arange(0, K)[None, :]
    return tl.load(q), tl.load(q + C * K)


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, p_ptr, q_ptr, s0_ptr, st_ptr, sT_ptr, y_ptr, u_ptr, T, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, NM: tl.constexpr,
                DPLR: tl.constexpr, HAS_S0: tl.constexpr, STORE: tl.constexpr, PREC: tl.constexpr):
    """Forward pass, one program per (V block, batch·head), sequential over chunks; per chunk
        Y = scale (r₀ S₀ + A_qk V + A_qb u),  S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u,
        u = T (a₀ S₀ + A_ak V) = W S₀ + M V  (DPLR only; W, M from _pairs_kernel).
    The output terms hang off the S₀ → S_C chain and overlap it, instead of a second kernel
    re-reading every chunk state (2.1× faster forward at q7b-L4k on an H100). Writes the final
    state to sT; when STORE (a backward follows) also S₀ of every chunk at st[chunk] (_state_dtype)
    and, for DPLR, u (token-major like V, fp32) for _grad_kernel."""
    iv = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    ib = ibh // H
    ih = ibh % H
    NT = tl.cdiv(T, C)
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    kv = ck[:, None] * V + cv[None, :]                                    # (K, BV) in one [K, V] state
    if HAS_S0:
        S = tl.load(s0_ptr + ibh * K * V + kv)
    else:
        S = tl.zeros((K, BV), dtype=tl.float32)
    for it in range(NT):
        m, offk, offv = _chunk_offsets(ib, ih, it, T, H, K, V, C, ck, cv)
        v = tl.load(v_ptr + offv, mask=m, other=0.0).to(tl.float32)
        g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC = _chunk_prep(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
        if STORE:
            tl.store(st_ptr + (ibh * NT + it) * K * V + kv, _cast(S, st_ptr, PREC))
        A_qk, A_qb, _, M, _ = _load_pairs(p_ptr, ibh, it, NT, NM, DPLR, C)    # the forward's three
        o = _sdot(r0, S, PREC) + _dot(A_qk, v, PREC)
        Snew = tl.exp(gC)[:, None] * S + _dot(tl.trans(kC), v, PREC)
        if DPLR:
            W, _ = _load_wb(q_ptr, ibh, it, NT, C, K)
            u = _sdot(W, S, PREC) + _dot(M, v, PREC)   # u_i = a_iᵀ S_{i−1}
            o += _dot(A_qb, u, PREC)
            Snew += _dot(tl.trans(bC), u, PREC)
            if STORE:
                tl.store(u_ptr + offv, u, mask=m)
        tl.store(y_ptr + offv, _cast(o * scale, y_ptr, PREC), mask=m)
        S = Snew
    tl.store(sT_ptr + ibh * K * V + kv, S)


# ---------------------------------------------------------------------------------------------
# Backward per chunk, with dS = ∂L/∂S_C from later chunks and dŶ = scale·dY (C, V):
#   dz = Tᵀ (A_qbᵀ dŶ + b_C dS) = M_zᵀ dŶ + B dS     (dz_i = b_iᵀ dS_i: the per-step gradient of u_i)
#   dV = A_qkᵀ dŶ + k_C dS + A_akᵀ dz
#   dS₀ = e^{γ_C} dS + r₀ᵀ dŶ + a₀ᵀ dz
#   dR = e^{γ} (dŶ S₀ᵀ) + e^{γ−ref} [tril(dŶ Vᵀ) k⁻ + tril(dŶ uᵀ) b⁻]          (dr_i = S_i dŷ_i)
#   dK = e^{γ_C−γ} (V dSᵀ) + e^{ref−γ} [triu(V dŶᵀ) q⁺ + striu(V dzᵀ) a⁺]      (dk_i = dS_i v_i)
#   dB = same as dK with u in place of V                                       (db_i = dS_i u_i)
#   dA = e^{ε} (dz S₀ᵀ) + e^{ε−ref} [stril(dz Vᵀ) k⁻ + stril(dz uᵀ) b⁻]       (da_i = S_{i−1} dz_i)
#   dg_i = c + Σ_{j≥i} (r dr − k dk − b db)_j + Σ_{j>i} (a da)_j,  c = rowsum(S_C ⊙ dS)
#   (from rowsum(S_i ⊙ dS_i) = dg_{i+1} + a_{i+1} da_{i+1} + r_i dr_i and
#    dg_i = rowsum(S_i ⊙ dS_i) − b_i db_i − k_i dk_i), where with S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u
#   c = e^{γ_C} rowsum(S₀ ⊙ dS) + colsum(k_C ⊙ V dSᵀ) + colsum(b_C ⊙ u dSᵀ): no S_C needed.
# dV and dz need only chunk-local terms and dS, so the reverse pass writes them; dR, dK, dA, dB,
# dg need S₀ as well and are per key channel (sums over V, no K-contraction): _grad_kernel takes
# blocks of key channels with the whole V row, so no partial sums are added across programs.
# Both passes store a state for every chunk (S₀, and dS at its end) in bf16 for 16-bit inputs:
# the products that read them take bf16 operands anyway (_sdot), so only c's rowsum(S₀ ⊙ dS)
# sees the rounding. The bytes are those of fp32 states for every other chunk, which the kernels
# kept before, recomputing the chunk between in _grad_kernel; dropping that recomputation took
# RWKV7 forward+backward at q7b-L4k from 11.8 to 9.4 ms (docs/results-2xh200/sixth/ab.txt).
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _dstate_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, p_ptr, q_ptr, dy_ptr, dsT_ptr, dst_ptr, ds0_ptr,
                   dv_ptr, dz_ptr, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr):
    """Reverse state pass, one program per (V block, batch·head), sequential from the last chunk:
    stores dS (gradient of chunk n's end state) at dst[n] (_state_dtype),
    writes dV = A_qkᵀ dŶ + k_C dS + A_akᵀ dz and (DPLR) dz (fp32, token-major like V) off the dS
    chain, then dS ← e^{γ_C} dS + r₀ᵀ dŶ + a₀ᵀ dz."""
    iv = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    ib = ibh // H
    ih = ibh % H
    NT = tl.cdiv(T, C)
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    kv = ck[:, None] * V + cv[None, :]
    if HAS_DST:
        dS = tl.load(dsT_ptr + ibh * K * V + kv)
    else:
        dS = tl.zeros((K, BV), dtype=tl.float32)
    for j in range(NT):
        it = NT - 1 - j
        m, offk, offv = _chunk_offsets(ib, ih, it, T, H, K, V, C, ck, cv)
        # the cast after `* scale`: torch.compile passes a float argument as fp64 (tl.dot needs one dtype)
        dy = (tl.load(dy_ptr + offv, mask=m, other=0.0).to(tl.float32) * scale).to(tl.float32)
        g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC = _chunk_prep(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
        tl.store(dst_ptr + (ibh * NT + it) * K * V + kv, _cast(dS, dst_ptr, PREC))
        dSprev = tl.exp(gC)[:, None] * dS + _dot(tl.trans(r0), dy, PREC)
        A_qk, _, A_ak, _, Mz = _load_pairs(p_ptr, ibh, it, NT, NM, DPLR, C)   # the backward's three
        dv = _dot(tl.trans(A_qk), dy, PREC) + _sdot(kC, dS, PREC)
        if DPLR:
            _, Bm = _load_wb(q_ptr, ibh, it, NT, C, K)
            dz = _dot(tl.trans(Mz), dy, PREC) + _sdot(Bm, dS, PREC)
            dSprev += _dot(tl.trans(a0), dz, PREC)
            dv += _dot(tl.trans(A_ak), dz, PREC)
            tl.store(dz_ptr + offv, dz, mask=m)
        tl.store(dv_ptr + offv, _cast(dv, dv_ptr, PREC), mask=m)
        dS = dSprev
    tl.store(ds0_ptr + ibh * K * V + kv, dS)


@triton.jit(do_not_specialize=["T"])
def _vpairs_kernel(v_ptr, dy_ptr, u_ptr, dz_ptr, pv_ptr, T, scale, H: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """The V-side pair matrices of every chunk, one program per (chunk, batch·head), into pv[chunk]:
        Y_v = tril(dŶ Vᵀ)   and for RWKV7   Y_u = tril(dŶ uᵀ), Z_v = stril(dz Vᵀ), Z_u = stril(dz uᵀ).
    They are sums over all V, the same for every block of key channels: _grad_kernel loads them
    instead of computing them once per key block."""
    it = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    cv = tl.arange(0, V)
    m, _, offv = _chunk_offsets(ibh // H, ibh % H, it, T, H, V, V, C, cv, cv)
    v = tl.load(v_ptr + offv, mask=m, other=0.0).to(tl.float32)
    dy = (tl.load(dy_ptr + offv, mask=m, other=0.0).to(tl.float32) * scale).to(tl.float32)
    ri = tl.arange(0, C)
    causal = ri[:, None] >= ri[None, :]
    strict = ri[:, None] > ri[None, :]
    p = _pair_block(pv_ptr, ibh, it, tl.cdiv(T, C), NM, C)
    tl.store(p, tl.where(causal, _dot(dy, tl.trans(v), PREC), 0.0))
    if DPLR:
        u = tl.load(u_ptr + offv, mask=m, other=0.0)
        dz = tl.load(dz_ptr + offv, mask=m, other=0.0)
        tl.store(p + C * C, tl.where(causal, _dot(dy, tl.trans(u), PREC), 0.0))
        tl.store(p + 2 * C * C, tl.where(strict, _dot(dz, tl.trans(v), PREC), 0.0))
        tl.store(p + 3 * C * C, tl.where(strict, _dot(dz, tl.trans(u), PREC), 0.0))


@triton.jit(do_not_specialize=["T"])
def _grad_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, dst_ptr, dy_ptr, u_ptr, dz_ptr, pv_ptr,
                 dr_ptr, dw_ptr, dk_ptr, da_ptr, db_ptr, T, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """K-side gradients dR, dK, dA, dB, dg of BK key channels with the whole V row, one program per
    (chunk, K block, batch·head), all in parallel, from the chunk's S₀ (st) and the dS at its end
    (dst), the forward's u, the reverse pass's dz and _vpairs_kernel's matrices. Written in the
    gradients' dtypes. The V-side terms come first (the products with S₀ and dS, and the pair
    matrices Y· = tril(dŶ ·ᵀ), Z· = stril(dz ·ᵀ)), so their operands are dead before the key side
    is loaded."""
    it = tl.program_id(0)
    ik = tl.program_id(1)
    ibh = tl.program_id(2).to(tl.int64)
    NT = tl.cdiv(T, C)
    ck = ik * BK + tl.arange(0, BK)
    cv = tl.arange(0, V)
    kv = ck[:, None] * V + cv[None, :]                                # (BK, V) block of a state
    S0 = tl.load(st_ptr + (ibh * NT + it) * K * V + kv).to(tl.float32)
    dS = tl.load(dst_ptr + (ibh * NT + it) * K * V + kv).to(tl.float32)
    m, offk, offv = _chunk_offsets(ibh // H, ibh % H, it, T, H, K, V, C, ck, cv)
    # Where the key side is loaded is a register-pressure choice (H200, q7b-L4k, one process):
    # RWKV7 loads it after the V side, which cut _grad_kernel from 7.7 to 6.5 ms; RWKV6, with
    # fewer operands, is faster loading it first.
    if not DPLR:
        g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC = _chunk_prep(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    v = tl.load(v_ptr + offv, mask=m, other=0.0).to(tl.float32)
    dy = (tl.load(dy_ptr + offv, mask=m, other=0.0).to(tl.float32) * scale).to(tl.float32)   # dŶ (see _dstate_kernel)
    vdS = _sdot(v, tl.trans(dS), PREC)                 # [i, d] = v_i · dS_d
    yS = _sdot(dy, tl.trans(S0), PREC)                 # dŶ S₀ᵀ
    sdS = tl.sum(S0 * dS, axis=1)
    if DPLR:
        u = tl.load(u_ptr + offv, mask=m, other=0.0)
        dz = tl.load(dz_ptr + offv, mask=m, other=0.0)
        udS = _sdot(u, tl.trans(dS), PREC)
        zS = _sdot(dz, tl.trans(S0), PREC)
    p = _pair_block(pv_ptr, ibh, it, NT, NM, C)
    Yv = tl.load(p)                                                   # from _vpairs_kernel
    if DPLR:
        Yu = tl.load(p + C * C)
        Zv = tl.load(p + 2 * C * C)
        Zu = tl.load(p + 3 * C * C)
        g, r, k, a, b, gam, gC, ref, qp, kn, r0, kC, ap, bn, a0, bC = _chunk_prep(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    c = tl.exp(gC) * sdS + tl.sum(kC * vdS, axis=0)  # rowsum(S_C ⊙ dS)
    dr = tl.exp(gam) * yS + tl.exp(gam - ref[None, :]) * _dot(Yv, kn, PREC)
    dk = tl.exp(gC[None, :] - gam) * vdS
    dkin = _dot(tl.trans(Yv), qp, PREC)
    if DPLR:
        c += tl.sum(bC * udS, axis=0)
        dr += tl.exp(gam - ref[None, :]) * _dot(Yu, bn, PREC)
        dkin += _dot(tl.trans(Zv), ap, PREC)
        db = tl.exp(gC[None, :] - gam) * udS + \
            tl.exp(ref[None, :] - gam) * (_dot(tl.trans(Yu), qp, PREC) + _dot(tl.trans(Zu), ap, PREC))
        da = tl.exp(gam - g) * zS + tl.exp(gam - g - ref[None, :]) * (_dot(Zv, kn, PREC) + _dot(Zu, bn, PREC))
    dk += tl.exp(ref[None, :] - gam) * dkin
    x = r * dr - k * dk
    if DPLR:
        x -= b * db
        xa = a * da
        dg = c[None, :] + tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x \
            + tl.sum(xa, axis=0)[None, :] - tl.cumsum(xa, axis=0)
    else:
        dg = c[None, :] + tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x
    tl.store(dr_ptr + offk, _cast(dr, dr_ptr, PREC), mask=m)
    tl.store(dk_ptr + offk, _cast(dk, dk_ptr, PREC), mask=m)
    tl.store(dw_ptr + offk, _cast(dg, dw_ptr, PREC), mask=m)
    if DPLR:
        tl.store(da_ptr + offk, _cast(da, da_ptr, PREC), mask=m)
        tl.store(db_ptr + offk, _cast(db, db_ptr, PREC), mask=m)


@triton.jit(do_not_specialize=["T"])
def _step_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s_ptr, y_ptr, T, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, DPLR: tl.constexpr):
    """Recurrent steps (decode), state updated in place; one program per (V block, batch·head):
    S ← diag(e^{g_t}) S + b_t (a_tᵀ S) + k_t v_tᵀ ;  y_t = scale · Sᵀ r_t."""
    iv = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    ib = ibh // H
    ih = ibh % H
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    soff = ibh * K * V + ck[:, None] * V + cv[None, :]
    S = tl.load(s_ptr + soff)
    for t in range(T):
        row = (ib * T + t) * H + ih
        g = tl.load(w_ptr + row * K + ck).to(tl.float32)
        r = tl.load(r_ptr + row * K + ck).to(tl.float32)
        k = tl.load(k_ptr + row * K + ck).to(tl.float32)
        v = tl.load(v_ptr + row * V + cv).to(tl.float32)
        if DPLR:
            a = tl.load(a_ptr + row * K + ck).to(tl.float32)
            b = tl.load(b_ptr + row * K + ck).to(tl.float32)
            sa = tl.sum(a[:, None] * S, axis=0)                        # a_tᵀ S (BV,)
            S = tl.exp(g)[:, None] * S + b[:, None] * sa[None, :] + k[:, None] * v[None, :]
        else:
            S = tl.exp(g)[:, None] * S + k[:, None] * v[None, :]
        y = tl.sum(r[:, None] * S, axis=0) * scale
        tl.store(y_ptr + row * V + cv, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + soff, S)

# Launch configuration, from H200 sweeps at the 7B shapes (docs/results-2xh200/fourth/sweep_*.txt).
# Chunk C = 16: its mid-referenced factors stay within e^±40 for log w ≥ −5, and 32-row chunks made
# RWKV7 forward+backward 7× slower (register spills; 64 rows overflow shared memory). The
# sequential passes take V blocks of 64 with 4 warps (8 warps: 1.7× slower forward); _v_block
# narrows the blocks when few heads would leave most SMs idle. _grad_kernel takes 32 key channels
# × the whole V row with 4 warps (2 or 8 warps: 1.6-1.7× slower there; 64 channels 1.5×; 16
# channels 2.3× at best, and still 1.3× with the V-side pair matrices precomputed,
# docs/results-2xh200/sixth/ab.txt).
_C, _BV, _BV_STEP, _BK = 16, 64, 32, 32
_WARPS_SEQ, _WARPS_PAR, _WARPS_STEP = 4, 4, 4


@functools.lru_cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _v_block(B, H, N, device):
    """V block of the sequential passes (one program per V block per head, walking all chunks):
    halve it, down to 16, while twice the programs still fit on the SMs at once. On an H200 at
    q7b-L16k (B1 H28 N128: 56 programs at 64) 32 cuts RWKV7 forward+backward from 23.8 to 17.7
    ms; at q7b-L4k (224 programs) 32 is 8% slower than 64."""
    bv, sms = min(N, _BV), _sm_count(device)
    while bv > 16 and 2 * B * H * (N // bv) <= sms:
        bv //= 2
    return bv


def _prec(x):
    """Product precision, see _dot and _sdot: "tf32" for 16-bit inputs on a GPU (their own rounding
    dominates: ~3e-3), "emu" for 16-bit inputs in the interpreter (its bf16 dots are wrong), "ieee"
    for fp32 inputs (~1e-6, slower)."""
    if x.dtype == torch.float32:
        return "ieee"
    return "tf32" if x.is_cuda else "emu"


def _state_dtype(x):
    """dtype of the chunk states kept for the backward: bf16 for 16-bit inputs (the products that
    read them take bf16 operands anyway, _sdot), fp32 for fp32 inputs."""
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


def _pair_matrices(r, w, k, a, b):
    """_pairs_kernel launch: p (B, H, NT, NM, C, C) fp32, NM = 5 for RWKV7 (A_qk, A_qb, A_ak, M,
    M_z), 1 for RWKV6 (A_qk); q (B, H, NT, 2, C, N) fp32 (W, B) for RWKV7, p for RWKV6 (unread).
    a = None for RWKV6."""
    B, T, H, N = r.shape
    dplr = a is not None
    a, b = (a, b) if dplr else (r, r)                   # RWKV6: a, b never read
    NT, nm = triton.cdiv(T, _C), 5 if dplr else 1
    f32 = dict(device=r.device, dtype=torch.float32)
    p = torch.empty(B, H, NT, nm, _C, _C, **f32)
    q = torch.empty(B, H, NT, 2, _C, N, **f32) if dplr else p
    _pairs_kernel[(NT, B * H)](r, w, k, a, b, p, q, T, H=H, K=N, C=_C, NM=nm, DPLR=dplr, PREC=_prec(r),
                               num_warps=_WARPS_SEQ)
    return p, q


def _fwd(r, w, k, v, a, b, s0, scale, store):
    """Forward launches. Returns y (r's dtype), S_T (fp32) and, when store, the pair matrices p
    (_pair_matrices), the chunk states st (B, H, NT, N, N) in _state_dtype, st[:, :, n] = S₀ of
    chunk n, and (RWKV7) u (B, T, H, N) fp32 (else None)."""
    B, T, H, N = r.shape
    dplr = a is not None
    p, q = _pair_matrices(r, w, k, a, b)
    a, b = (a, b) if dplr else (r, r)                   # RWKV6: a, b never read
    NT, bv = triton.cdiv(T, _C), _v_block(B, H, N, r.device)
    f32 = dict(device=r.device, dtype=torch.float32)
    sT = torch.empty(B, H, N, N, **f32)
    st = torch.empty(B, H, NT, N, N, device=r.device, dtype=_state_dtype(r)) if store else None
    u = torch.empty(B, T, H, N, **f32) if store and dplr else None
    y = torch.empty_like(r)
    _fwd_kernel[(N // bv, B * H)](r, w, k, v, a, b, p, q, sT if s0 is None else s0, sT if st is None else st, sT, y,
                                  y if u is None else u, T, scale, H=H, K=N, V=N, C=_C, BV=bv, NM=p.shape[3],
                                  DPLR=dplr, HAS_S0=s0 is not None, STORE=store, PREC=_prec(r),
                                  num_warps=_WARPS_SEQ)
    return y, sT, ((p, q) if store else None), st, u


def _bwd(r, w, k, v, a, b, p, q, st, u, dy, dsT, scale):
    """Backward launches. Returns dr, dw, dk, dv, da, db (the inputs' dtypes; None for RWKV6) and
    dS_0 (fp32)."""
    B, T, H, N = r.shape
    dplr = a is not None
    a, b = (a, b) if dplr else (r, r)
    NT, bv, bk = triton.cdiv(T, _C), _v_block(B, H, N, r.device), min(N, _BK)
    f32 = dict(device=r.device, dtype=torch.float32)
    dst = torch.empty(B, H, NT, N, N, device=r.device, dtype=_state_dtype(r))   # ∂L/∂S at every chunk's end
    ds0 = torch.empty(B, H, N, N, **f32)
    dv = torch.empty_like(v)
    dz = torch.empty(B, T, H, N, **f32) if dplr else dv
    _dstate_kernel[(N // bv, B * H)](r, w, k, v, a, b, p, q, dy, ds0 if dsT is None else dsT, dst, ds0, dv, dz, T,
                                     scale, H=H, K=N, V=N, C=_C, BV=bv, NM=p.shape[3], DPLR=dplr,
                                     HAS_DST=dsT is not None, PREC=_prec(r), num_warps=_WARPS_SEQ)
    u = u if dplr else dv                               # RWKV6: u never read
    nm = 4 if dplr else 1                               # Y_v (RWKV7: Y_u, Z_v, Z_u too)
    pv = torch.empty(B, H, NT, nm, _C, _C, **f32)
    _vpairs_kernel[(NT, B * H)](v, dy, u, dz, pv, T, scale, H=H, V=N, C=_C, NM=nm, DPLR=dplr,
                                PREC=_prec(r), num_warps=_WARPS_SEQ)
    dr, dw, dk = torch.empty_like(r), torch.empty_like(w), torch.empty_like(k)
    da, db = (torch.empty_like(a), torch.empty_like(b)) if dplr else (dr, dr)
    _grad_kernel[(NT, N // bk, B * H)](r, w, k, v, a, b, st, dst, dy, u, dz, pv,
                                       dr, dw, dk, da, db, T, scale, H=H, K=N, V=N, C=_C, BK=bk, NM=nm,
                                       DPLR=dplr, PREC=_prec(r), num_warps=_WARPS_PAR)
    return dr, dw, dk, dv, (da if dplr else None), (db if dplr else None), ds0


class _TritonAttn(torch.autograd.Function):
    """(r, log_w, k, v, a, b, S_0, scale) -> (y, S_T) through the chunked kernels; a = b = None
    for RWKV6, S_0 = None for zeros. Saves the inputs, the chunk states and (RWKV7) u."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, scale):
        ctx.set_materialize_grads(False)                  # an unused y or S_T costs nothing
        y, sT, (p, q), st, u = _fwd(r, w, k, v, a, b, s0, scale, store=True)
        ctx.save_for_backward(r, w, k, v, a, b, p, q, st, u)
        ctx.scale, ctx.has_s0 = scale, s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, p, q, st, u = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        grads = _bwd(r, w, k, v, a, b, p, q, st, u, dy, None if dsT is None else dsT.contiguous(), ctx.scale)
        return (*grads[:6], grads[6] if ctx.has_s0 else None, None)


def _launch_step(r, w, k, v, a, b, S, scale):
    """T recurrent steps without autograd, S (B, H, N, N) fp32 contiguous updated in place."""
    B, T, H, N = r.shape
    dplr = a is not None
    y = torch.empty_like(r)
    bv = min(N, _BV_STEP)
    _step_kernel[(N // bv, B * H)](r, w, k, v, a if dplr else r, b if dplr else r, S, y, T, scale,
                                   H=H, K=N, V=N, BV=bv, DPLR=dplr, num_warps=_WARPS_STEP)
    return y, S


_DECODE_T = 16        # without grad, T < 16 runs the recurrent kernel (no chunk set-up)


def _triton(r, log_w, k, v, a, b, state, scale):
    """backend="triton": raw inputs (any float dtype, converted in the kernels), scale a float."""
    B, T, H, N = r.shape
    if not _HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (Linux); use backend='torch'")
    if not r.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotImplementedError("the Triton backend runs on CUDA tensors (on CPU only under "
                                  "TRITON_INTERPRET=1); move the inputs to a GPU or use backend='torch'")
    if N < 16 or N & (N - 1):
        raise ValueError(f"backend='triton' needs a power-of-two head size N >= 16, got N={N}; "
                         "use backend='torch'")
    xs = [x.contiguous() for x in (r, log_w, k, v)] + [None if x is None else x.contiguous() for x in (a, b)]
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*xs, state))
    if not grad and T < _DECODE_T:
        S = torch.zeros(B, H, N, N, device=r.device) if state is None else state
        if S.dtype != torch.float32 or not S.is_contiguous():
            S = S.float().contiguous()
        return _launch_step(*xs, S, scale)
    s0 = None if state is None else state.float().contiguous()
    if not grad:                                        # nothing to save: no chunk states stored
        return _fwd(*xs, s0, scale, store=False)[:2]
    return _TritonAttn.apply(*xs, s0, scale)


# ---------------------------------------------------------------------------------------------
# 4. Public entry points
# ---------------------------------------------------------------------------------------------
BACKENDS = ("auto", "naive", "torch", "triton")
AUTO = "auto"   # what backend="auto" resolves to; "auto" picks per call (_attn). distill.py --backend pins
                # it for a whole run, so that one run can be repeated on another backend and compared


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
        backend = AUTO
    if backend == "auto":
        tensors = [*named.values()] + ([] if state is None else [state])
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        if r.is_cuda and _HAVE_TRITON and r.dtype != torch.float64 and N >= 16 and N & (N - 1) == 0:
            backend = "triton"            # it has its own decode path
        elif T == 1 and not grad:         # decoding: one recurrence step, no chunk set-up
            backend = "naive"
        else:
            backend = "torch"
    if backend == "triton":              # raw dtypes: the kernels convert on load
        return _triton(r, log_w, k, v, a, b, state, N ** -0.5 if scale is None else scale)
    cd = torch.float64 if r.dtype == torch.float64 else torch.float32  # compute + state dtype
    S = torch.zeros(B, H, N, N, dtype=cd, device=r.device) if state is None else state.to(cd)
    q = r.to(cd) * (N ** -0.5 if scale is None else scale)
    log_w, k, v = log_w.to(cd), k.to(cd), v.to(cd)
    if a is not None:
        a, b = a.to(cd), b.to(cd)
    if backend == "naive":
        y, S = _naive(q, log_w, k, v, a, b, S)
    else:
        y, S = _chunked(q, log_w, k, v, a, b, S, CHUNK[variant])
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
        power-of-two N ≥ 16, log_w ≥ −5; chunked kernels with autograd, and without grad for
        T < 16 a recurrent kernel that updates an fp32 contiguous `state` in place and returns
        it), "auto" (triton on CUDA where it applies; otherwise torch, except T = 1 without
        grad, which runs one naive step).
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
# 5. Benchmark, same run, same machine: CPU: chunked torch path vs step-by-step; GPU: the Triton
#    backend vs fla's kernels (BENCHMARKS.md anchors), SDPA and decode
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
    fla_shapes: str = ""      # GPU: shapes that also time fla and SDPA; "" = every shape timed (fla's cold
                              # autotuning takes minutes per shape: name fewer to save time)


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
    if cuda:                              # the Triton backend against fla, SDPA and decode
        return bench_gpu(cfg)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # bf16 is slow on CPU
    names = cfg.shapes.split(",") if cfg.shapes else list(SHAPES if cuda else CPU_SHAPES)
    backends = ["naive", "torch"] + (["triton"] if cuda and _HAVE_TRITON else [])
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


def _fla():
    """fla's kernels (the anchors of BENCHMARKS.md) when installed, else None."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        return None
    return chunk_rwkv7, chunk_gla, fused_recurrent_rwkv7


def _peak_mib(fn):
    """Peak CUDA memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_gpu(cfg: BenchConfig):
    """GPU: the Triton backend next to fla's chunk_rwkv7 (default and the best configuration for
    RAD-RWKV7's decay range), chunk_gla and causal SDPA, same inputs and run (BENCHMARKS.md);
    ratio = ours / the faster fla call. Then one decode step against fused_recurrent_rwkv7."""
    import triton
    fla = _fla()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    names = cfg.shapes.split(",") if cfg.shapes else list(SHAPES)
    anchored = set(cfg.fla_shapes.split(",") if cfg.fla_shapes else names)
    print(f"device {torch.cuda.get_device_name()}, bf16 inputs, fp32 state; median ms; "
          f"ratio = ours / fla (the faster of fla's calls); peak = extra MiB of one fwd+bwd"
          + ("" if fla else "; fla not installed: no anchors"))
    head = (f"{'shape':<10} {'variant':<7} {'ours f':>8} {'ours f+b':>9} {'fla f':>8} {'fla f+b':>8} "
            f"{'ratio f':>7} {'ratio fb':>8} {'sdpa f+b':>8} {'peak':>7} {'fla peak':>8}")
    print(head + "\n" + "-" * len(head))
    for name in names:
        B, T, H, N = SHAPES[name]
        for variant in cfg.variants.split(","):
            xs = bench_inputs(variant, B, T, H, N, torch.bfloat16, "cuda")
            dy = torch.randn_like(xs["v"])
            fn = rwkv7_attn if variant == "rwkv7" else rwkv6_attn
            with torch.no_grad():
                f = bench(lambda: fn(**xs, backend="triton"))
            fb_call = lambda: fn(**xs, backend="triton")[0].backward(dy)
            fb = bench(fb_call)
            peak = _peak_mib(fb_call)
            row = dict(f=f, fb=fb, peak=peak)
            if name in anchored:
                x = {n: t.detach().bfloat16().requires_grad_() for n, t in xs.items()}   # fla: bf16 log w
                if fla and variant == "rwkv7":
                    calls = [lambda: fla[0](x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5)[0],
                             lambda: fla[0](x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5,
                                            safe_gate=True, lower_bound=-math.exp(-0.5), chunk_size=64)[0]]
                elif fla:
                    calls = [lambda: fla[1](x["r"], x["k"], x["v"], x["log_w"], scale=N ** -0.5)[0]]
                if fla:
                    with torch.no_grad():
                        row["fla_f"] = min(bench(c) for c in calls)
                    fbs = [(bench(lambda c=c: c().backward(dy)), c) for c in calls]
                    row["fla_fb"], best = min(fbs, key=lambda t: t[0])
                    row["fla_peak"] = _peak_mib(lambda: best().backward(dy))
                q, k_, v_ = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (x["r"], x["k"], x["v"]))
                do = dy.transpose(1, 2).contiguous()
                row["sdpa_fb"] = bench(lambda: F.scaled_dot_product_attention(q, k_, v_, is_causal=True).backward(do))
                del x, q, k_, v_
            get = lambda key: row.get(key, float("nan"))
            print(f"{name:<10} {variant:<7} {f:>8.3f} {fb:>9.3f} {get('fla_f'):>8.3f} {get('fla_fb'):>8.3f} "
                  f"{f / get('fla_f'):>7.2f} {fb / get('fla_fb'):>8.2f} {get('sdpa_fb'):>8.3f} "
                  f"{peak:>7.0f} {get('fla_peak'):>8.0f}", flush=True)
            del xs
            torch.cuda.empty_cache()
    bench_decode(fla, bench)


def bench_decode(fla, bench):
    """One decode step at H=28, N=128, batch 1 and 64, against fla's fused_recurrent_rwkv7 (fla:
    _fla()'s kernels, or None) and a copy of the state; bench(fn) -> ms."""
    # The step reads and writes the whole fp32 state: a device copy of it is the floor it cannot beat.
    # At batch 1 a call is bound by its launch from Python; a CUDA graph replays the captured
    # kernels without it, which is how a decoding loop would run them (fla's call graphed too).
    print(f"\ndecode step, H=28, N=128 (RWKV7), µs; graph = the call captured in a CUDA graph, replayed\n"
          f"{'batch':>5} {'ours':>8} {'fla':>8} {'ratio':>6} {'ours graph':>10} {'fla graph':>9} "
          f"{'graph/fla':>9} {'graph/graph':>11} {'state copy':>10}")
    for B in (1, 64):
        with torch.no_grad():
            xs = {n: t.detach() for n, t in bench_inputs("rwkv7", B, 1, 28, 128, torch.bfloat16, "cuda").items()}
            S, S2 = torch.zeros(B, 28, 128, 128, device="cuda"), torch.empty(B, 28, 128, 128, device="cuda")
            w16 = xs["log_w"].bfloat16()
            ours_call = lambda: rwkv7_attn(**xs, state=S, backend="triton")
            fla_call = lambda: fla[2](xs["r"], w16, xs["k"], xs["v"], xs["a"], xs["b"], scale=128 ** -0.5,
                                      initial_state=S, output_final_state=True)
            t = dict(ours=bench(ours_call), ours_graph=bench(_graphed(ours_call)), copy=bench(lambda: S2.copy_(S)))
            if fla:
                t["fla"] = bench(fla_call)
                try:
                    t["fla_graph"] = bench(_graphed(fla_call))
                except Exception as e:                # the comparison stays with fla's plain call
                    print(f"fla's call could not be captured in a CUDA graph: {e}")
        us = {n: 1e3 * t.get(n, float("nan")) for n in ("ours", "fla", "ours_graph", "fla_graph", "copy")}
        print(f"{B:>5} {us['ours']:>8.1f} {us['fla']:>8.1f} {us['ours'] / us['fla']:>6.2f} {us['ours_graph']:>10.1f} "
              f"{us['fla_graph']:>9.1f} {us['ours_graph'] / us['fla']:>9.2f} {us['ours_graph'] / us['fla_graph']:>11.2f} "
              f"{us['copy']:>10.1f}", flush=True)


def _graphed(fn):
    """fn captured in a CUDA graph (after warm-up calls on a side stream, which compile and
    autotune outside the capture); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
