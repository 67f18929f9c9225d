"""The recurrences of the RAD-RWKV students (docs/method.md §3-§5), behind one public function each:
rwkv7_attn (RAD-RWKV7) and rwkv6_attn (RAD-RWKV6, and QLinAtt at log w = 0). In file order:

    §1 rwkv7_naive, rwkv6_naive   the recurrences as the paper writes them, one token at a time:
                                  the specification, and the oracle of every parity test
    §2 kernel form in PyTorch     a step-by-step loop (backend="naive", and CPU decoding) and the
                                  chunked path (backend="torch"): exact, any T, any N, autograd
    §3 Triton kernels             backend="triton": CUDA, or Triton's interpreter on CPU
    §4 rwkv7_attn, rwkv6_attn     input checks and the choice of backend

§2-§4 use the kernel form (docs/kernels.md §1): the state S of each (batch, head) is laid out
[K, V] (fla's layout; docs/method.md §3 writes RAD-RWKV7's state as the transpose), and

    RAD-RWKV7 (DPLR):  S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ
    RAD-RWKV6 (GLA):   S_t = diag(e^{log_w_t}) S_{t-1} + k_t v_tᵀ
    both:              y_t = scale · S_tᵀ r_t,   scale = N^-½ by default

with a = −κ, b = κ ⊙ iclr (iclr: the paper's in-context rate a) and k = k̃ for RAD-RWKV7. The chunk
form and its numerics are docs/kernels.md §2 and §4, the Triton design §3, speed §5.

    python -m pytest -q test_equivalence.py -k "kernel or interp or gpu"   # parity (interpreter on CPU)
    python bench.py kernels                                                 # timings
"""
import functools
import math
import os

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# §1 Paper-form references (docs/method.md §3-§4): one token at a time, rows are vectors
# ---------------------------------------------------------------------------------------------

def rwkv7_naive(r, w, k, v, kk, a, state=None):
    """RAD-RWKV7 exactly as docs/method.md §3 writes it, with S in the paper's [V, K] layout
    (N_value × N_key) and row vectors:

        S_t = S_{t-1} (diag(w_t) − kk_tᵀ (a_t ⊙ kk_t)) + v_tᵀ k_t,    y_t = S_t r_tᵀ · N^-½

    r, w (the decay, in (0, 1)), k (already state-balanced, k̃), v, kk (κ, unit length per head),
    a (the in-context rate, model.py's iclr): (B, T, H, N). state: (B, H, N, N) [V, K], or None
    for zeros. Returns y (B, T, H, N) and S_T (B, H, N, N) [V, K], computed in the inputs' dtype.
    Independent of the kernel form below (other layout, w not log w, κ and the rate a rather than
    the kernel form's a = −κ and b), so a layout or sign error there cannot hide from the tests."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.to(r.dtype)
    ys = []
    for t in range(T):
        transition = torch.diag_embed(w[:, t]) - kk[:, t, :, :, None] * (a[:, t] * kk[:, t])[..., None, :]
        S = S @ transition + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None])[..., 0] * N ** -0.5)
    return torch.stack(ys, 1), S


def rwkv6_naive(r, w, k, v, state=None):
    """RAD-RWKV6 exactly as docs/method.md §4 writes it, with S [K, V] and row vectors:

        S_t = diag(w_t) S_{t-1} + k_tᵀ v_t,    y_t = (r_t · N^-½) S_t

    r, w (the decay, in (0, 1)), k (already state-balanced), v: (B, T, H, N). state: (B, H, N, N)
    [K, V], or None for zeros. Returns y (B, T, H, N) and S_T (B, H, N, N) [K, V], computed in the
    inputs' dtype. QLinAtt (docs/method.md §5) is this recurrence at w = 1."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.to(r.dtype)
    ys = []
    for t in range(T):
        S = torch.diag_embed(w[:, t]) @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append((r[:, t, :, None, :] * N ** -0.5 @ S)[..., 0, :])
    return torch.stack(ys, 1), S


# ---------------------------------------------------------------------------------------------
# §2 Kernel form in PyTorch: step by step, and chunked (docs/kernels.md §1-§2)
# ---------------------------------------------------------------------------------------------
# Notation of the chunked PyTorch path and of the Triton kernels (§3), in the kernel form above
# with g = log w and q = scale · r (the Triton kernels build everything from r and multiply Y and
# dY by scale instead); a = b = 0 for RWKV6. Within a chunk of C rows i, j, per key channel d:
#
#   γ_i = Σ_{j≤i} g_j (gam, inclusive),  ε_i = γ_i − g_i (eps, exclusive),  γ_C = Σ_j g_j (gam_C)
#   ρ = γ_C / 2 (rho), the reference point: each pairwise decay e^{γ_i − γ_j} is split as
#       e^{γ_i − ρ} · e^{ρ − γ_j}; γ and ε lie in [γ_C, 0], so both exponents are at most
#       |γ_C| / 2 ≤ ⌈C/2⌉ · max|g|.
#   q⁺ = q e^{γ−ρ} (q_plus),  k⁻ = k e^{ρ−γ} (k_minus),  a⁺ = a e^{ε−ρ} (a_plus),  b⁻ = b e^{ρ−γ} (b_minus):
#       the factors of the pairwise matrices
#   q₀ = q e^{γ} (q0), a₀ = a e^{ε} (a0): the rows that read S₀, the chunk's initial state
#   k_C = k e^{γ_C−γ} (k_C), b_C = b e^{γ_C−γ} (b_C): the rows that write S_C, its final state
#   A_qk = tril(q⁺ k⁻ᵀ), A_qb = tril(q⁺ b⁻ᵀ) (diagonal included),
#   A_ak = stril(a⁺ k⁻ᵀ), A_ab = stril(a⁺ b⁻ᵀ) (strictly lower)
#   J = (I − A_ab)⁻¹,  W = J a₀,  M = J A_ak,  U = M V
#   u_i = a_iᵀ S_{i−1}:  u = J (a₀ S₀ + A_ak V) = W S₀ + U                     (the WY/UT form)
#   Y = q₀ S₀ + A_qk V + A_qb u,    S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u
#
# Everything without S₀ is computed for all chunks at once; only S₀ → S_C runs chunk after chunk.

def _step(q, w, k, v, a, b, S):
    """One kernel-form step. q (already scaled), w = e^{log_w}, k, v, a, b: (B, H, N); a = b = None
    for RWKV6. S: (B, H, K, V). Returns y (B, H, V) and the new S."""
    S_new = w[..., :, None] * S + k[..., :, None] * v[..., None, :]
    if a is not None:
        S_new = S_new + b[..., :, None] * (a[..., None, :] @ S)       # b (aᵀ S_{t-1}): rank 1
    y = (q[..., None, :] @ S_new).squeeze(-2)                          # y = S_tᵀ q
    return y, S_new


def _recurrent(q, log_w, k, v, a, b, S):
    """backend="naive": the kernel form step by step over T. Inputs (B, T, H, N) in the compute
    dtype, S (B, H, N, N). Autograd keeps every S_t: O(T N²) memory, fine for a reference and for
    short T (decoding)."""
    w = log_w.exp()
    ys = []
    for t in range(q.shape[1]):
        y, S = _step(q[:, t], w[:, t], k[:, t], v[:, t],
                     None if a is None else a[:, t], None if b is None else b[:, t], S)
        ys.append(y)
    return torch.stack(ys, 1), S


# RWKV7: 32, as fast on a CPU as 16 with half its per-chunk N × N tensors (docs/kernels.md §2).
# RWKV6: 16, the largest chunk whose factors stay within ±_MAX_NATS at log w = −5 (8 · 5 = 40).
CHUNK = {"rwkv7": 32, "rwkv6": 16}
# ⌈C/2⌉ · max|log w| ≤ 40 nats keeps both factors of every pairwise decay normal fp32 numbers
# (e^±40 ≈ 2e17, far from e^±87), so their products, e^{γ_i − γ_j} ≤ 1 on the causal side, are
# exact. Stronger decays get a smaller chunk.
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


def _pairwise(x_plus, y_minus, strict, x=None, y=None):
    """Lower-triangular A[i, j] = Σ_d x⁺_id y⁻_jd (j < i), plus the diagonal Σ_d x_id y_id when
    x, y are given. masked_fill, not a product with the mask: the anti-causal side can overflow
    to inf. The diagonal carries no decay (e^0), so it is taken from the raw inputs: through the
    gated ones it would send d log_w two terms that cancel exactly and leave only rounding."""
    A = (x_plus @ y_minus.mT).masked_fill(~strict, 0)
    if x is not None:
        A.diagonal(dim1=-2, dim2=-1).copy_((x * y).sum(-1))
    return A


def _chunked(q, log_w, k, v, a, b, S, chunk):
    """backend="torch": the chunk form in the notation above. Inputs (B, T, H, N) in the compute
    dtype (q already scaled), a = b = None for RWKV6, S (B, H, N, N). Returns y (B, T, H, N), S_T.

    Per chunk, [W | U] solves (I − A_ab) [W | U] = [a₀ | A_ak V], and with S_chunk = k_Cᵀ V + b_Cᵀ U
    and q_S0 = q₀ + A_qb W, the rows of Y that read S₀:
        Y = q_S0 S₀ + A_qk V + A_qb U,    S_C = (diag(e^{γ_C}) + b_Cᵀ W) S₀ + S_chunk.
    The loop over chunks only carries S (two C×N×N products per chunk for RWKV7, one elementwise
    update for RWKV6). Memory: inputs, O(C) per token for the pairwise matrices, and N×N per chunk
    (S_chunk and the chunk states)."""
    B, T, H, N = q.shape
    C = _safe_chunk(log_w, chunk)
    q, g, k, v = (_to_chunks(x, C) for x in (q, log_w, k, v))       # (nc, B, H, C, N)
    gam = g.cumsum(-2)                                                # γ, inclusive
    gam_C = gam[..., -1:, :]                                          # (nc, B, H, 1, N)
    # ρ only splits e^{γ_i − γ_j} into two bounded factors; the product does not depend on it,
    # so no gradient flows through it.
    rho = (gam_C / 2).detach()
    # exp costs far more than a multiply on a CPU: two full-size exps, the other factors are
    # products of bounded ones (each within e^±40, so the products are exact too).
    exp_gam_rho = (gam - rho).exp()                                   # e^{γ − ρ}
    exp_rho_gam = exp_gam_rho.reciprocal()                            # e^{ρ − γ}
    q_plus, k_minus = q * exp_gam_rho, k * exp_rho_gam
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A_qk = _pairwise(q_plus, k_minus, strict, q, k)                   # (nc, B, H, C, C)
    Y = A_qk @ v                                                      # intra-chunk part
    q_S0 = q_plus * rho.exp()                                         # q₀ = q e^γ (e^γ ≤ 1)
    exp_C_gam = exp_rho_gam * (gam_C - rho).exp()                     # e^{γ_C − γ} ≤ 1
    k_C = k * exp_C_gam
    S_chunk = k_C.mT @ v                                              # (nc, B, H, N, N)
    exp_C = gam_C.mT.exp()                                            # (nc, B, H, N, 1): e^{γ_C}
    if a is not None:
        a, b = _to_chunks(a, C), _to_chunks(b, C)
        eps = gam - g                                                 # ε, exclusive
        a_plus = a * (eps - rho).exp()
        b_minus = b * exp_rho_gam
        A_qb = _pairwise(q_plus, b_minus, strict, q, b)
        A_ak, A_ab = _pairwise(a_plus, k_minus, strict), _pairwise(a_plus, b_minus, strict)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        rhs = torch.cat([a_plus * rho.exp(), A_ak @ v], -1)           # [a₀ | A_ak V]
        WU = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
        W, U = WU[..., :N], WU[..., N:]                               # (nc, B, H, C, N) each
        Y = Y + A_qb @ U
        q_S0 = q_S0 + A_qb @ W
        b_C = b * exp_C_gam
        S_chunk = S_chunk + b_C.mT @ U
    # unbind once, not S_chunk[c] in the loop: autograd would then write a full-size zero
    # gradient for every chunk (quadratic in T / C).
    low_rank = zip(b_C.mT.unbind(), W.unbind()) if a is not None else [None] * q.shape[0]
    S0s = []                                                          # S₀ of every chunk
    for exp_C_c, S_chunk_c, bW in zip(exp_C.unbind(), S_chunk.unbind(), low_rank):
        S0s.append(S)
        S_C = exp_C_c * S + S_chunk_c
        if bW is not None:                                            # + b_Cᵀ W S₀
            S_C = S_C + bW[0] @ (bW[1] @ S)
        S = S_C
    Y = Y + q_S0 @ torch.stack(S0s)                                   # (nc, B, H, C, N)
    Y = Y.permute(1, 0, 3, 2, 4).reshape(B, -1, H, N)[:, :T]          # (B, T, H, N)
    return Y, S


# ---------------------------------------------------------------------------------------------
# §3 Triton kernels (docs/kernels.md §3), launchers and the autograd Function; notation as in §2
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
# The kernels take q = r (Y and dY are multiplied by scale) and ρ = γ_C / 2 as §2 does, so that
# |γ − ρ| ≤ C/2 · max|g|: C = 16 keeps both factors inside fp32 down to RWKV6's log w = −5.
try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:                   # no Triton on this platform: backend="triton" raises
    import types
    triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=None)
    _HAVE_TRITON = False


@triton.jit
def _bf16(x):
    """x rounded to bf16 (to nearest, ties to even) and held in fp32: the interpreter's stand-in for
    bf16 tensor-core products, which are exact in fp32 once the operands are bf16."""
    u = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32(x):
    """x with its mantissa cut to TF32's 10 bits, truncated: the interpreter's stand-in for a GPU's
    TF32 products, which read only those bits of each fp32 operand (rounding to nearest here
    would make the interpreter's errors smaller than a GPU's: docs/kernels.md §4)."""
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
    accuracy (docs/kernels.md §4)."""
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
    J = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) + A
    A_pow = A
    for s in tl.static_range(1, 7):
        if (1 << s) < C:
            A_pow = tl.dot(A_pow, A_pow, input_precision="ieee")          # A^(2^s)
            J += tl.dot(J, A_pow, input_precision="ieee")
    return J


@triton.jit
def _chunk_prep(r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR: tl.constexpr, C: tl.constexpr):
    """Loads one chunk's (C, K) key-side inputs (rows past T read as identity steps: g = 0,
    r = k = a = b = 0) and returns the fp32 gated operands and decays of the chunk."""
    g = tl.load(g_ptr + offk, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offk, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + offk, mask=m, other=0.0).to(tl.float32)
    gam = tl.cumsum(g, axis=0)                         # γ (C, K)
    gam_C = tl.sum(g, axis=0)                          # γ_C (K,)
    rho = gam_C * 0.5                                  # ρ
    q_plus = r * tl.exp(gam - rho[None, :])            # q⁺
    k_minus = k * tl.exp(rho[None, :] - gam)           # k⁻
    q0 = r * tl.exp(gam)                               # q₀
    k_C = k * tl.exp(gam_C[None, :] - gam)             # k_C
    if DPLR:
        a = tl.load(a_ptr + offk, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offk, mask=m, other=0.0).to(tl.float32)
        eps = gam - g                                  # ε
        a_plus = a * tl.exp(eps - rho[None, :])        # a⁺
        b_minus = b * tl.exp(rho[None, :] - gam)       # b⁻
        a0 = a * tl.exp(eps)                           # a₀
        b_C = b * tl.exp(gam_C[None, :] - gam)         # b_C
    else:
        a = r
        b = r
        a_plus = q_plus
        b_minus = k_minus
        a0 = q0
        b_C = k_C
    return g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C


@triton.jit
def _pairs(q_plus, k_minus, a_plus, b_minus, DPLR: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    """Pairwise chunk matrices A_qk, A_qb (causal, j ≤ i), A_ak (strict, j < i) and
    J = (I − A_ab)^{-1}; for RWKV6 only A_qk is real (the rest alias it)."""
    ri = tl.arange(0, C)
    causal = ri[:, None] >= ri[None, :]
    strict = ri[:, None] > ri[None, :]
    A_qk = tl.where(causal, _dot(q_plus, tl.trans(k_minus), PREC), 0.0)
    if DPLR:
        A_qb = tl.where(causal, _dot(q_plus, tl.trans(b_minus), PREC), 0.0)
        A_ak = tl.where(strict, _dot(a_plus, tl.trans(k_minus), PREC), 0.0)
        A_ab = tl.where(strict, _dot(a_plus, tl.trans(b_minus), PREC), 0.0)
        J = _tril_inverse(A_ab, C)
    else:
        A_qb = A_qk
        A_ak = A_qk
        J = A_qk
    return A_qk, A_qb, A_ak, J


@triton.jit
def _chunk_offsets(ib, ih, it, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, ck, cv):
    """Row mask and element offsets of chunk `it` of sequence ib, head ih, for the key channels ck
    and value channels cv of (B, T, H, ·) token-major tensors."""
    t = it * C + tl.arange(0, C)
    row = (ib * T + t) * H + ih                                           # (C,) token rows
    return (t < T)[:, None], row[:, None] * K + ck[None, :], row[:, None] * V + cv[None, :]


@triton.jit
def _pair_block(pairs_ptr, ibh, it, NT, NM: tl.constexpr, C: tl.constexpr):
    """Pointers to matrix 0 of chunk `it`'s NM C × C pair matrices in pairs (B, H, NT, NM, C, C);
    matrix j is at + j·C·C."""
    ri = tl.arange(0, C)
    return pairs_ptr + (ibh * NT + it) * NM * C * C + ri[:, None] * C + ri[None, :]


@triton.jit(do_not_specialize=["T"])
def _pairs_kernel(r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, pairs_ptr, W_ptr, T, H: tl.constexpr, K: tl.constexpr,
                  C: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """The S-free matrices of every chunk, one program per (chunk, batch·head), all in parallel,
    into pairs[chunk] (C × C each) and, for RWKV7, W[chunk] (C × K each):
        RWKV6: A_qk.   RWKV7: A_qk, A_qb, A_ak, M = J A_ak, M_z = A_qb J;  W = J a₀, W_z = Jᵀ b_C,
    so that the sequential passes' chains from one state to the next are two dots deep:
        u = W S₀ + M V  (forward),   dz = M_zᵀ dŶ + W_z dS  (backward)."""
    it = tl.program_id(0)
    ibh = tl.program_id(1).to(tl.int64)
    ck = tl.arange(0, K)
    m, offk, offv = _chunk_offsets(ibh // H, ibh % H, it, T, H, K, K, C, ck, ck)
    g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C = _chunk_prep(
        r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    A_qk, A_qb, A_ak, J = _pairs(q_plus, k_minus, a_plus, b_minus, DPLR, C, PREC)
    p = _pair_block(pairs_ptr, ibh, it, tl.cdiv(T, C), NM, C)
    tl.store(p, A_qk)
    if DPLR:
        tl.store(p + C * C, A_qb)
        tl.store(p + 2 * C * C, A_ak)
        tl.store(p + 3 * C * C, _dot(J, A_ak, PREC))
        tl.store(p + 4 * C * C, _dot(A_qb, J, PREC))
        ri = tl.arange(0, C)
        Wp = W_ptr + (ibh * tl.cdiv(T, C) + it) * 2 * C * K + ri[:, None] * K + ck[None, :]
        tl.store(Wp, _dot(J, a0, PREC))
        tl.store(Wp + C * K, _dot(tl.trans(J), b_C, PREC))


@triton.jit
def _load_pairs(pairs_ptr, ibh, it, NT, NM: tl.constexpr, DPLR: tl.constexpr, C: tl.constexpr):
    """_pairs_kernel's C × C matrices of chunk `it`: A_qk, A_qb, A_ak, M, M_z (RWKV6: A_qk alone,
    aliased as the others)."""
    p = _pair_block(pairs_ptr, ibh, it, NT, NM, C)
    A_qk = tl.load(p)
    if DPLR:
        A_qb = tl.load(p + C * C)
        A_ak = tl.load(p + 2 * C * C)
        M = tl.load(p + 3 * C * C)
        M_z = tl.load(p + 4 * C * C)
    else:
        A_qb = A_qk
        A_ak = A_qk
        M = A_qk
        M_z = A_qk
    return A_qk, A_qb, A_ak, M, M_z


@triton.jit
def _load_W(W_ptr, ibh, it, NT, C: tl.constexpr, K: tl.constexpr):
    """_pairs_kernel's W = J a₀ and W_z = Jᵀ b_C of chunk `it` (C, K each), RWKV7."""
    Wp = W_ptr + (ibh * NT + it) * 2 * C * K + tl.arange(0, C)[:, None] * K + tl.arange(0, K)[None, :]
    return tl.load(Wp), tl.load(Wp + C * K)


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(r_ptr, g_ptr, k_ptr, v_ptr, a_ptr, b_ptr, pairs_ptr, W_ptr, s0_ptr, states_ptr, sT_ptr, y_ptr, u_ptr,
                T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                NM: tl.constexpr, DPLR: tl.constexpr, HAS_S0: tl.constexpr, STORE: tl.constexpr, PREC: tl.constexpr):
    """Forward pass, one program per (V block, batch·head), sequential over chunks; per chunk
        Y = scale (q₀ S₀ + A_qk V + A_qb u),  S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u,
        u = J (a₀ S₀ + A_ak V) = W S₀ + M V  (DPLR only; W, M from _pairs_kernel).
    The output terms hang off the S₀ → S_C chain and overlap it, rather than a second kernel
    re-reading every chunk state. Writes the final state to sT; when STORE (a backward follows)
    also S₀ of every chunk at states[chunk] (_state_dtype) and, for DPLR, u (token-major like V,
    fp32) for _grad_kernel."""
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
        g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C = _chunk_prep(
            r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
        if STORE:
            tl.store(states_ptr + (ibh * NT + it) * K * V + kv, _cast(S, states_ptr, PREC))
        A_qk, A_qb, _, M, _ = _load_pairs(pairs_ptr, ibh, it, NT, NM, DPLR, C)    # the forward's three
        Y = _sdot(q0, S, PREC) + _dot(A_qk, v, PREC)
        S_C = tl.exp(gam_C)[:, None] * S + _dot(tl.trans(k_C), v, PREC)
        if DPLR:
            W, _ = _load_W(W_ptr, ibh, it, NT, C, K)
            u = _sdot(W, S, PREC) + _dot(M, v, PREC)   # u_i = a_iᵀ S_{i−1}
            Y += _dot(A_qb, u, PREC)
            S_C += _dot(tl.trans(b_C), u, PREC)
            if STORE:
                tl.store(u_ptr + offv, u, mask=m)
        tl.store(y_ptr + offv, _cast(Y * scale, y_ptr, PREC), mask=m)
        S = S_C
    tl.store(sT_ptr + ibh * K * V + kv, S)


# ---------------------------------------------------------------------------------------------
# Backward per chunk, with dS = ∂L/∂S_C from later chunks and dŶ = scale·dY (C, V):
#   dz = Jᵀ (A_qbᵀ dŶ + b_C dS) = M_zᵀ dŶ + W_z dS   (dz_i = b_iᵀ dS_i: the per-step gradient of u_i)
#   dV = A_qkᵀ dŶ + k_C dS + A_akᵀ dz
#   dS₀ = e^{γ_C} dS + q₀ᵀ dŶ + a₀ᵀ dz
#   dR = e^{γ} (dŶ S₀ᵀ) + e^{γ−ρ} [P_yv k⁻ + P_yu b⁻]                         (dr_i = S_i dŷ_i)
#   dK = e^{γ_C−γ} (V dSᵀ) + e^{ρ−γ} [P_yvᵀ q⁺ + P_zvᵀ a⁺]                    (dk_i = dS_i v_i)
#   dB = same as dK with u in place of V                                       (db_i = dS_i u_i)
#   dA = e^{ε} (dz S₀ᵀ) + e^{ε−ρ} [P_zv k⁻ + P_zu b⁻]                         (da_i = S_{i−1} dz_i)
#   with the V-side pair matrices P_yv = tril(dŶ Vᵀ), P_yu = tril(dŶ uᵀ), P_zv = stril(dz Vᵀ),
#   P_zu = stril(dz uᵀ), and
#   dg_i = c + Σ_{j≥i} (r dr − k dk − b db)_j + Σ_{j>i} (a da)_j,  c = rowsum(S_C ⊙ dS)
#   (from rowsum(S_i ⊙ dS_i) = dg_{i+1} + a_{i+1} da_{i+1} + r_i dr_i and
#    dg_i = rowsum(S_i ⊙ dS_i) − b_i db_i − k_i dk_i), where with S_C = e^{γ_C} S₀ + k_Cᵀ V + b_Cᵀ u
#   c = e^{γ_C} rowsum(S₀ ⊙ dS) + colsum(k_C ⊙ V dSᵀ) + colsum(b_C ⊙ u dSᵀ): no S_C needed.
# dV and dz need only chunk-local terms and dS, so the reverse pass writes them; dR, dK, dA, dB,
# dg need S₀ as well and are per key channel (sums over V, no K-contraction): _grad_kernel takes
# blocks of key channels with the whole V row, so no partial sums are added across programs.
# Both passes store a state for every chunk (S₀, and dS at its end) in bf16 for 16-bit inputs:
# the products that read them take bf16 operands anyway (_sdot), so only c's rowsum(S₀ ⊙ dS)
# sees the rounding, and _grad_kernel recomputes no state.
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _dstate_kernel(r_ptr, g_ptr, k_ptr, v_ptr, a_ptr, b_ptr, pairs_ptr, W_ptr, dy_ptr, dsT_ptr, dstates_ptr, ds0_ptr,
                   dv_ptr, dz_ptr, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr):
    """Reverse state pass, one program per (V block, batch·head), sequential from the last chunk:
    stores dS (gradient of chunk n's end state) at dstates[n] (_state_dtype),
    writes dV = A_qkᵀ dŶ + k_C dS + A_akᵀ dz and (DPLR) dz (fp32, token-major like V) off the dS
    chain, then dS ← dS₀ = e^{γ_C} dS + q₀ᵀ dŶ + a₀ᵀ dz."""
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
        g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C = _chunk_prep(
            r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
        tl.store(dstates_ptr + (ibh * NT + it) * K * V + kv, _cast(dS, dstates_ptr, PREC))
        dS0 = tl.exp(gam_C)[:, None] * dS + _dot(tl.trans(q0), dy, PREC)
        A_qk, _, A_ak, _, M_z = _load_pairs(pairs_ptr, ibh, it, NT, NM, DPLR, C)   # the backward's three
        dv = _dot(tl.trans(A_qk), dy, PREC) + _sdot(k_C, dS, PREC)
        if DPLR:
            _, W_z = _load_W(W_ptr, ibh, it, NT, C, K)
            dz = _dot(tl.trans(M_z), dy, PREC) + _sdot(W_z, dS, PREC)
            dS0 += _dot(tl.trans(a0), dz, PREC)
            dv += _dot(tl.trans(A_ak), dz, PREC)
            tl.store(dz_ptr + offv, dz, mask=m)
        tl.store(dv_ptr + offv, _cast(dv, dv_ptr, PREC), mask=m)
        dS = dS0
    tl.store(ds0_ptr + ibh * K * V + kv, dS)


@triton.jit(do_not_specialize=["T"])
def _vpairs_kernel(v_ptr, dy_ptr, u_ptr, dz_ptr, vpairs_ptr, T, scale, H: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """The V-side pair matrices of every chunk, one program per (chunk, batch·head), into vpairs[chunk]:
        P_yv = tril(dŶ Vᵀ)   and for RWKV7   P_yu = tril(dŶ uᵀ), P_zv = stril(dz Vᵀ), P_zu = stril(dz uᵀ).
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
    p = _pair_block(vpairs_ptr, ibh, it, tl.cdiv(T, C), NM, C)
    tl.store(p, tl.where(causal, _dot(dy, tl.trans(v), PREC), 0.0))
    if DPLR:
        u = tl.load(u_ptr + offv, mask=m, other=0.0)
        dz = tl.load(dz_ptr + offv, mask=m, other=0.0)
        tl.store(p + C * C, tl.where(causal, _dot(dy, tl.trans(u), PREC), 0.0))
        tl.store(p + 2 * C * C, tl.where(strict, _dot(dz, tl.trans(v), PREC), 0.0))
        tl.store(p + 3 * C * C, tl.where(strict, _dot(dz, tl.trans(u), PREC), 0.0))


@triton.jit(do_not_specialize=["T"])
def _grad_kernel(r_ptr, g_ptr, k_ptr, v_ptr, a_ptr, b_ptr, states_ptr, dstates_ptr, dy_ptr, u_ptr, dz_ptr, vpairs_ptr,
                 dr_ptr, dg_ptr, dk_ptr, da_ptr, db_ptr, T, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 NM: tl.constexpr, DPLR: tl.constexpr, PREC: tl.constexpr):
    """K-side gradients dR, dK, dA, dB, dg of BK key channels with the whole V row, one program per
    (chunk, K block, batch·head), all in parallel, from the chunk's S₀ (states) and the dS at its
    end (dstates), the forward's u, the reverse pass's dz and _vpairs_kernel's matrices P_··.
    Written in the gradients' dtypes. The V-side terms come first (the products with S₀ and dS,
    and the pair matrices), so their operands are dead before the key side is loaded."""
    it = tl.program_id(0)
    ik = tl.program_id(1)
    ibh = tl.program_id(2).to(tl.int64)
    NT = tl.cdiv(T, C)
    ck = ik * BK + tl.arange(0, BK)
    cv = tl.arange(0, V)
    kv = ck[:, None] * V + cv[None, :]                                # (BK, V) block of a state
    S0 = tl.load(states_ptr + (ibh * NT + it) * K * V + kv).to(tl.float32)
    dS = tl.load(dstates_ptr + (ibh * NT + it) * K * V + kv).to(tl.float32)
    m, offk, offv = _chunk_offsets(ibh // H, ibh % H, it, T, H, K, V, C, ck, cv)
    # Where the key side is loaded is a register-pressure choice: RWKV7 is faster loading it after
    # the V side, RWKV6, with fewer operands, loading it first (docs/kernels.md §3).
    if not DPLR:
        g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C = _chunk_prep(
            r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    v = tl.load(v_ptr + offv, mask=m, other=0.0).to(tl.float32)
    dy = (tl.load(dy_ptr + offv, mask=m, other=0.0).to(tl.float32) * scale).to(tl.float32)   # dŶ (see _dstate_kernel)
    v_dS = _sdot(v, tl.trans(dS), PREC)                # V dSᵀ: [i, d] = v_i · dS_d
    dy_S0 = _sdot(dy, tl.trans(S0), PREC)              # dŶ S₀ᵀ
    S0_dS = tl.sum(S0 * dS, axis=1)                    # rowsum(S₀ ⊙ dS)
    if DPLR:
        u = tl.load(u_ptr + offv, mask=m, other=0.0)
        dz = tl.load(dz_ptr + offv, mask=m, other=0.0)
        u_dS = _sdot(u, tl.trans(dS), PREC)
        dz_S0 = _sdot(dz, tl.trans(S0), PREC)
    p = _pair_block(vpairs_ptr, ibh, it, NT, NM, C)
    P_yv = tl.load(p)                                                 # from _vpairs_kernel
    if DPLR:
        P_yu = tl.load(p + C * C)
        P_zv = tl.load(p + 2 * C * C)
        P_zu = tl.load(p + 3 * C * C)
        g, r, k, a, b, gam, gam_C, rho, q_plus, k_minus, q0, k_C, a_plus, b_minus, a0, b_C = _chunk_prep(
            r_ptr, g_ptr, k_ptr, a_ptr, b_ptr, offk, m, DPLR, C)
    c = tl.exp(gam_C) * S0_dS + tl.sum(k_C * v_dS, axis=0)           # rowsum(S_C ⊙ dS)
    dr = tl.exp(gam) * dy_S0 + tl.exp(gam - rho[None, :]) * _dot(P_yv, k_minus, PREC)
    dk = tl.exp(gam_C[None, :] - gam) * v_dS
    dk_minus = _dot(tl.trans(P_yv), q_plus, PREC)                    # ∂L/∂k⁻
    if DPLR:
        c += tl.sum(b_C * u_dS, axis=0)
        dr += tl.exp(gam - rho[None, :]) * _dot(P_yu, b_minus, PREC)
        dk_minus += _dot(tl.trans(P_zv), a_plus, PREC)
        db = tl.exp(gam_C[None, :] - gam) * u_dS + \
            tl.exp(rho[None, :] - gam) * (_dot(tl.trans(P_yu), q_plus, PREC) + _dot(tl.trans(P_zu), a_plus, PREC))
        da = tl.exp(gam - g) * dz_S0 + tl.exp(gam - g - rho[None, :]) * (_dot(P_zv, k_minus, PREC) + _dot(P_zu, b_minus, PREC))
    dk += tl.exp(rho[None, :] - gam) * dk_minus
    x_ge = r * dr - k * dk                                            # summed over j ≥ i
    if DPLR:
        x_ge -= b * db
        x_gt = a * da                                                 # summed over j > i
        dg = c[None, :] + tl.sum(x_ge, axis=0)[None, :] - tl.cumsum(x_ge, axis=0) + x_ge \
            + tl.sum(x_gt, axis=0)[None, :] - tl.cumsum(x_gt, axis=0)
    else:
        dg = c[None, :] + tl.sum(x_ge, axis=0)[None, :] - tl.cumsum(x_ge, axis=0) + x_ge
    tl.store(dr_ptr + offk, _cast(dr, dr_ptr, PREC), mask=m)
    tl.store(dk_ptr + offk, _cast(dk, dk_ptr, PREC), mask=m)
    tl.store(dg_ptr + offk, _cast(dg, dg_ptr, PREC), mask=m)
    if DPLR:
        tl.store(da_ptr + offk, _cast(da, da_ptr, PREC), mask=m)
        tl.store(db_ptr + offk, _cast(db, db_ptr, PREC), mask=m)


@triton.jit(do_not_specialize=["T"])
def _step_kernel(r_ptr, g_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s_ptr, y_ptr, T, scale,
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
        g = tl.load(g_ptr + row * K + ck).to(tl.float32)
        r = tl.load(r_ptr + row * K + ck).to(tl.float32)
        k = tl.load(k_ptr + row * K + ck).to(tl.float32)
        v = tl.load(v_ptr + row * V + cv).to(tl.float32)
        if DPLR:
            a = tl.load(a_ptr + row * K + ck).to(tl.float32)
            b = tl.load(b_ptr + row * K + ck).to(tl.float32)
            aS = tl.sum(a[:, None] * S, axis=0)                        # a_tᵀ S (BV,)
            S = tl.exp(g)[:, None] * S + b[:, None] * aS[None, :] + k[:, None] * v[None, :]
        else:
            S = tl.exp(g)[:, None] * S + k[:, None] * v[None, :]
        y = tl.sum(r[:, None] * S, axis=0) * scale
        tl.store(y_ptr + row * V + cv, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + soff, S)


# Launch configuration, from H200 sweeps at the 7B shapes (docs/kernels.md §3). Chunks of C = 16:
# their mid-referenced factors stay within e^±40 for log w ≥ −5, and 32 rows spill registers. The
# sequential passes take V blocks of 64 with 4 warps, narrowed by _v_block; _grad_kernel takes 32
# key channels × the whole V row with 4 warps.
_C, _BV, _BV_STEP, _BK = 16, 64, 32, 32
_WARPS_SEQ, _WARPS_PAR, _WARPS_STEP = 4, 4, 4


@functools.lru_cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _v_block(B, H, N, device):
    """V block of the sequential passes (one program per V block per head, walking all chunks):
    halve it, down to 16, while twice the programs still fit on the SMs at once, so that a few
    heads of one long sequence still keep the GPU busy."""
    bv, sms = min(N, _BV), _sm_count(device)
    while bv > 16 and 2 * B * H * (N // bv) <= sms:
        bv //= 2
    return bv


def _prec(x):
    """Product precision, see _dot and _sdot: "tf32" for 16-bit inputs on a GPU (their own rounding
    dominates), "emu" for 16-bit inputs in the interpreter (its bf16 dots are wrong), "ieee" for
    fp32 inputs (exact to fp32, slower)."""
    if x.dtype == torch.float32:
        return "ieee"
    return "tf32" if x.is_cuda else "emu"


def _state_dtype(x):
    """dtype of the chunk states kept for the backward: bf16 for 16-bit inputs (the products that
    read them take bf16 operands anyway, _sdot), fp32 for fp32 inputs."""
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


def _pair_matrices(r, g, k, a, b):
    """_pairs_kernel launch: pairs (B, H, NT, NM, C, C) fp32, NM = 5 for RWKV7 (A_qk, A_qb, A_ak,
    M, M_z), 1 for RWKV6 (A_qk); W (B, H, NT, 2, C, N) fp32 (W, W_z) for RWKV7, pairs for RWKV6
    (unread). g = log w; a = None for RWKV6."""
    B, T, H, N = r.shape
    dplr = a is not None
    a, b = (a, b) if dplr else (r, r)                   # RWKV6: a, b never read
    NT, nm = triton.cdiv(T, _C), 5 if dplr else 1
    f32 = dict(device=r.device, dtype=torch.float32)
    pairs = torch.empty(B, H, NT, nm, _C, _C, **f32)
    W = torch.empty(B, H, NT, 2, _C, N, **f32) if dplr else pairs
    _pairs_kernel[(NT, B * H)](r, g, k, a, b, pairs, W, T, H=H, K=N, C=_C, NM=nm, DPLR=dplr, PREC=_prec(r),
                               num_warps=_WARPS_SEQ)
    return pairs, W


def _fwd(r, g, k, v, a, b, s0, scale, store):
    """Forward launches. Returns y (r's dtype), S_T (fp32) and, when store, (pairs, W) of
    _pair_matrices, the chunk states (B, H, NT, N, N) in _state_dtype, states[:, :, n] = S₀ of
    chunk n, and (RWKV7) u (B, T, H, N) fp32 (else None)."""
    B, T, H, N = r.shape
    dplr = a is not None
    pairs, W = _pair_matrices(r, g, k, a, b)
    a, b = (a, b) if dplr else (r, r)                   # RWKV6: a, b never read
    NT, bv = triton.cdiv(T, _C), _v_block(B, H, N, r.device)
    f32 = dict(device=r.device, dtype=torch.float32)
    sT = torch.empty(B, H, N, N, **f32)
    states = torch.empty(B, H, NT, N, N, device=r.device, dtype=_state_dtype(r)) if store else None
    u = torch.empty(B, T, H, N, **f32) if store and dplr else None
    y = torch.empty_like(r)
    _fwd_kernel[(N // bv, B * H)](r, g, k, v, a, b, pairs, W, sT if s0 is None else s0,
                                  sT if states is None else states, sT, y, y if u is None else u, T, scale,
                                  H=H, K=N, V=N, C=_C, BV=bv, NM=pairs.shape[3], DPLR=dplr,
                                  HAS_S0=s0 is not None, STORE=store, PREC=_prec(r), num_warps=_WARPS_SEQ)
    return y, sT, ((pairs, W) if store else None), states, u


def _bwd(r, g, k, v, a, b, pairs, W, states, u, dy, dsT, scale):
    """Backward launches. Returns dr, dg, dk, dv, da, db (the inputs' dtypes; None for RWKV6) and
    dS_0 (fp32)."""
    B, T, H, N = r.shape
    dplr = a is not None
    a, b = (a, b) if dplr else (r, r)
    NT, bv, bk = triton.cdiv(T, _C), _v_block(B, H, N, r.device), min(N, _BK)
    f32 = dict(device=r.device, dtype=torch.float32)
    dstates = torch.empty(B, H, NT, N, N, device=r.device, dtype=_state_dtype(r))   # ∂L/∂S at every chunk's end
    ds0 = torch.empty(B, H, N, N, **f32)
    dv = torch.empty_like(v)
    dz = torch.empty(B, T, H, N, **f32) if dplr else dv
    _dstate_kernel[(N // bv, B * H)](r, g, k, v, a, b, pairs, W, dy, ds0 if dsT is None else dsT, dstates, ds0,
                                     dv, dz, T, scale, H=H, K=N, V=N, C=_C, BV=bv, NM=pairs.shape[3], DPLR=dplr,
                                     HAS_DST=dsT is not None, PREC=_prec(r), num_warps=_WARPS_SEQ)
    u = u if dplr else dv                               # RWKV6: u never read
    nm = 4 if dplr else 1                               # P_yv (RWKV7: P_yu, P_zv, P_zu too)
    vpairs = torch.empty(B, H, NT, nm, _C, _C, **f32)
    _vpairs_kernel[(NT, B * H)](v, dy, u, dz, vpairs, T, scale, H=H, V=N, C=_C, NM=nm, DPLR=dplr,
                                PREC=_prec(r), num_warps=_WARPS_SEQ)
    dr, dg, dk = torch.empty_like(r), torch.empty_like(g), torch.empty_like(k)
    da, db = (torch.empty_like(a), torch.empty_like(b)) if dplr else (dr, dr)
    _grad_kernel[(NT, N // bk, B * H)](r, g, k, v, a, b, states, dstates, dy, u, dz, vpairs,
                                       dr, dg, dk, da, db, T, scale, H=H, K=N, V=N, C=_C, BK=bk, NM=nm,
                                       DPLR=dplr, PREC=_prec(r), num_warps=_WARPS_PAR)
    return dr, dg, dk, dv, (da if dplr else None), (db if dplr else None), ds0


class _TritonAttn(torch.autograd.Function):
    """(r, log_w, k, v, a, b, S_0, scale) -> (y, S_T) through the chunked kernels; a = b = None
    for RWKV6, S_0 = None for zeros. Saves the inputs, the pair matrices, the chunk states and
    (RWKV7) u."""

    @staticmethod
    def forward(ctx, r, g, k, v, a, b, s0, scale):
        ctx.set_materialize_grads(False)                  # an unused y or S_T costs nothing
        y, sT, (pairs, W), states, u = _fwd(r, g, k, v, a, b, s0, scale, store=True)
        ctx.save_for_backward(r, g, k, v, a, b, pairs, W, states, u)
        ctx.scale, ctx.has_s0 = scale, s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, g, k, v, a, b, pairs, W, states, u = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        grads = _bwd(r, g, k, v, a, b, pairs, W, states, u, dy, None if dsT is None else dsT.contiguous(), ctx.scale)
        return (*grads[:6], grads[6] if ctx.has_s0 else None, None)


def _launch_step(r, g, k, v, a, b, S, scale):
    """T recurrent steps without autograd, S (B, H, N, N) fp32 contiguous updated in place."""
    B, T, H, N = r.shape
    dplr = a is not None
    y = torch.empty_like(r)
    bv = min(N, _BV_STEP)
    _step_kernel[(N // bv, B * H)](r, g, k, v, a if dplr else r, b if dplr else r, S, y, T, scale,
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
# §4 Public entry points
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
        y, S = _recurrent(q, log_w, k, v, a, b, S)
    else:
        y, S = _chunked(q, log_w, k, v, a, b, S, CHUNK[variant])
    return y.to(r.dtype), S


def rwkv7_attn(r, log_w, k, v, a, b, state=None, scale=None, backend="auto"):
    """RAD-RWKV7 time mixing (docs/method.md §3), the DPLR / generalised delta rule, in [K, V] layout:

        S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ
        y_t = scale · S_tᵀ r_t

    r, log_w, k, v, a, b: (B, T, H, N), any float dtype; log_w ≤ 0 per key channel (RAD-RWKV7 keeps
        it in [−e^{−0.5}, 0); stronger decays also work, with a smaller chunk), a = −κ,
        b = κ ⊙ iclr, k = k̃ = k ⊙ (1 − w + iclr) (state balancing; iclr is the paper's a).
    state: (B, H, N, N) [K, V] initial state S_0, or None for zeros.
    scale: default N^-½.
    backend: "naive" (step by step, the reference), "torch" (chunked, autograd), "triton" (CUDA,
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
    """RAD-RWKV6 time mixing (docs/method.md §4; QLinAtt, §5, at log_w = 0), gated linear attention,
    in [K, V] layout:

        S_t = diag(e^{log_w_t}) S_{t-1} + k_t v_tᵀ
        y_t = scale · S_tᵀ r_t

    r, log_w, k, v: (B, T, H, N), any float dtype; log_w ≤ 0 per key channel (RAD-RWKV6 clamps it to
        [−5, 0); stronger decays also work, with a smaller chunk); k is already state-balanced.
    state, scale, backend and the results: as rwkv7_attn.
    """
    return _attn("rwkv6", r, log_w, k, v, None, None, state, scale, backend)
