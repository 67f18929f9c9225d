"""Tests of kernels.py's Triton backend against an fp64 step-by-step oracle: kernels.py's own
kernel-form loop (backend="naive"), which test_kernels.py checks against the paper-form
rwkv7_naive / rwkv6_naive and which shares no arithmetic with the Triton kernels.

    python -m pytest -x -q test_kernels_triton.py

On CPU the kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET once, when it is
imported, so `test_interpreter` re-runs this file in a subprocess with TRITON_INTERPRET=1 (other
test files in the same pytest process keep a normal Triton); the `interp` tests run only there.
The interpreter's fp32 `tl.dot` is exact (its bf16 dot is wrong, and its fp32 -> bf16 conversion
truncates where a GPU rounds to nearest), so most of those tests are fp32 with tight tolerances;
`test_interp_bf16_products` runs 16-bit inputs with the GPU's arithmetic emulated (kernels.py's
`_sdot`, `_tf32`, `_cast`), so that its errors match a GPU's (docs/kernels.md §4). On CUDA,
`test_gpu_*` checks bf16, fp16 and fp32 inputs and prints fla's errors on the same inputs next to
ours when fla is importable.
Errors are relative RMS ‖x − ref‖ / ‖ref‖ in fp64, printed per tensor.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
F32, F64 = torch.float32, torch.float64


def oracle(r, log_w, k, v, a=None, b=None, state=None):
    """fp64 step by step, [K, V] state: S_t = diag(e^{log_w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ,
    y_t = N^-½ · S_tᵀ r_t; a = b = None for RWKV6. Differentiable in every input, a and b included
    (the paper-form oracles take κ and the rate instead)."""
    import kernels
    if a is None:
        return kernels.rwkv6_attn(r, log_w, k, v, state=state, backend="naive")
    return kernels.rwkv7_attn(r, log_w, k, v, a, b, state=state, backend="naive")


def make_inputs(variant, B, T, H, N, log_w=None, seed=0, device="cpu"):
    """fp64 inputs in the model's ranges (docs/method.md §3-§4; RWKV7: log w ∈ [−e^{−0.5}, 0),
    a = −κ, b = κ·iclr; RWKV6: log w = −e^x clamped to [−5, 0)); `log_w` = a constant overrides
    the decay."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda: torch.randn(B, T, H, N, generator=g, dtype=F64)
    r, k, v = rn(), rn() / N ** 0.5, rn()
    if variant == "rwkv7":
        w = -0.6065306597126334 * torch.sigmoid(rn())
        kk, iclr = F.normalize(rn(), dim=-1), torch.sigmoid(rn())
        xs = dict(r=r, log_w=w, k=k, v=v, a=-kk, b=kk * iclr)
    else:
        xs = dict(r=r, log_w=(-rn().exp()).clamp(min=-5.0), k=k, v=v)
    if log_w is not None:
        xs["log_w"] = torch.full_like(r, log_w)
    return {n: x.to(device) for n, x in xs.items()}


def rel_err(x, ref):
    x, ref = x.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def run_case(variant, xs, state, dtype, backend="triton", call=None, w_dtype=F32):
    """Our y, S_T and gradients (of <y, dy> + <S_T, dS>) next to the oracle's; returns the errors.
    Inputs are cast to `dtype`, log w to `w_dtype` (fp32, as the model passes it); `call(inputs, s0)
    -> (y, S_T)` stands in for our kernel (fla's, on the GPU)."""
    import kernels
    fn = kernels.rwkv7_attn if variant == "rwkv7" else kernels.rwkv6_attn
    call = call or (lambda x, s0: fn(**x, state=s0, backend=backend))
    ref = {n: x.detach().cpu().clone().requires_grad_() for n, x in xs.items()}
    s_ref = None if state is None else state.detach().cpu().clone().requires_grad_()
    y, S = oracle(**ref, state=s_ref)
    gen = torch.Generator().manual_seed(1)
    dy, dS = torch.randn(y.shape, generator=gen, dtype=F64), torch.randn(S.shape, generator=gen, dtype=F64)
    torch.autograd.backward([y, S], [dy, dS])
    dev = next(iter(xs.values())).device
    ours = {n: x.detach().to(dtype if n != "log_w" else w_dtype).requires_grad_() for n, x in xs.items()}
    s_ours = None if state is None else state.detach().float().requires_grad_()
    y2, S2 = call(ours, s_ours)
    torch.autograd.backward([y2.float(), S2.float()], [dy.to(dev).float(), dS.to(dev).float()])
    errs = {"y": rel_err(y2, y), "S_T": rel_err(S2, S)}
    errs |= {"d" + n: rel_err(ours[n].grad, ref[n].grad) for n in xs}
    if state is not None:
        errs["dS_0"] = rel_err(s_ours.grad, s_ref.grad)
    return errs


def assert_errs(errs, tol, what, tol_dw=None):
    line = " ".join(f"{n}={e:.1e}" for n, e in errs.items())
    print(f"{what}: {line}")
    bad = [n for n, e in errs.items() if not e <= (tol_dw if n == "dlog_w" and tol_dw else tol)]
    assert not bad, f"{what}: {bad} above tolerance {tol}: {line}"


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter, run in a subprocess
# ---------------------------------------------------------------------------------------------

def test_interpreter():
    """Runs the `interp` tests below in a child pytest with TRITON_INTERPRET=1."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider",
                        __file__, "-k", "interp"], env=env, capture_output=True, text=True, timeout=600)
    print(p.stdout[-6000:], p.stderr[-2000:])
    assert p.returncode == 0, "interpreter tests failed:\n" + p.stdout[-6000:]


interp = pytest.mark.skipif(not INTERP, reason="runs inside test_interpreter's TRITON_INTERPRET=1 child")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 40, 64, 300])
def test_interp_any_T(variant, T):
    """Every T around the chunk (16), an odd (40: 3 chunks) and an even (64: 4) count of chunks
    and a long one, with an initial state: outputs, final state, every input gradient and the
    initial state's gradient."""
    B, H, N = (1, 1, 16) if T == 300 else (2, 2, 16)
    xs = make_inputs(variant, B, T, H, N, seed=T)
    state = torch.randn(B, H, N, N, dtype=F64)
    assert_errs(run_case(variant, xs, state, torch.float32), 1e-5, f"{variant} T={T}")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_interp_no_state_head64(variant):
    """No initial state (zeros inside the kernel), N = 64."""
    xs = make_inputs(variant, 1, 20, 1, 64, seed=3)
    assert_errs(run_case(variant, xs, None, torch.float32), 1e-5, f"{variant} N=64 no state")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_interp_narrow_v_blocks(variant, monkeypatch):
    """A GPU with many SMs per head narrows the sequential passes' V blocks to 16: N = 64 then
    runs as four V blocks, each adding its partial K-side gradients."""
    import kernels
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 10**6)
    assert kernels._v_block(1, 1, 64, torch.device("cpu")) == 16
    xs = make_inputs(variant, 1, 20, 1, 64, seed=5)
    state = torch.randn(1, 1, 64, 64, dtype=F64)
    assert_errs(run_case(variant, xs, state, torch.float32), 1e-5, f"{variant} V blocks of 16")


def test_v_block_rule(monkeypatch):
    """On an H200 (132 SMs) each shape of docs/kernels.md §5 gets the V block timed fastest there
    (docs/kernels.md §3): 64 when B·H·N/64 programs fill the SMs, else narrower."""
    import kernels
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    want = {(16, 9, 64): 64, (2, 9, 64): 16, (32, 28, 128): 64, (4, 28, 128): 64, (1, 28, 128): 32}  # (B, H, N)
    for (B, H, N), bv in want.items():
        assert kernels._v_block(B, H, N, torch.device("cuda")) == bv, (B, H, N)


@interp
def test_interp_head128_split_v():
    """N = 128: two V blocks add their partial K-side gradients."""
    xs = make_inputs("rwkv7", 1, 17, 1, 128, seed=4)
    state = torch.randn(1, 1, 128, 128, dtype=F64)
    assert_errs(run_case("rwkv7", xs, state, torch.float32), 1e-5, "rwkv7 N=128")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_interp_strong_decay(variant):
    """log w = −5 everywhere: chunked forms with one reference per chunk overflow here. The decay
    gradient is a difference of nearly equal terms at this decay, hence its looser bound."""
    xs = make_inputs(variant, 1, 40, 2, 16, log_w=-5.0, seed=5)
    state = torch.randn(1, 2, 16, 16, dtype=F64)
    assert_errs(run_case(variant, xs, state, torch.float32), 1e-5, f"{variant} log w = -5", tol_dw=1e-3)


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_interp_bf16_inputs(variant):
    """bf16 inputs at N = 16 with a chunk tail (T = 70): the dtype conversions and the emulated
    bf16 products; the bound is the inputs' own bf16 rounding."""
    xs = make_inputs(variant, 1, 70, 2, 16, seed=9)
    state = torch.randn(1, 2, 16, 16, dtype=F64)
    assert_errs(run_case(variant, xs, state, torch.bfloat16), 2e-2, f"{variant} bf16 inputs")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_interp_bf16_products(variant):
    """bf16 inputs take bf16 products with the states and TF32 chunk-local ones (both emulated as a
    GPU does them): every error stays at the inputs' own rounding. Rounding the chunk-local
    products to bf16 as well fails this bound (RWKV6 d log w)."""
    xs = make_inputs(variant, 2, 100, 3, 32, seed=7)
    state = torch.randn(2, 3, 32, 32, dtype=F64)
    assert_errs(run_case(variant, xs, state, torch.bfloat16), 6e-3, f"{variant} bf16 products")


@interp
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("T", [1, 5])
def test_interp_decode(variant, T):
    """No grad and short T: the recurrent kernel, state updated in place and continued exactly."""
    import kernels
    fn = kernels.rwkv7_attn if variant == "rwkv7" else kernels.rwkv6_attn
    xs = make_inputs(variant, 3, 2 * T, 2, 32, seed=6)
    state = torch.randn(3, 2, 32, 32, dtype=F64)
    y_ref, S_ref = oracle(**xs, state=state)
    S = state.float().clone()
    ys = []
    with torch.no_grad():
        for half in (slice(0, T), slice(T, 2 * T)):
            y, S_out = fn(**{n: x[:, half].float() for n, x in xs.items()}, state=S, backend="triton")
            assert S_out.data_ptr() == S.data_ptr(), "decode must update the state in place"
            ys.append(y)
    assert_errs({"y": rel_err(torch.cat(ys, 1), y_ref), "S_T": rel_err(S, S_ref)}, 1e-5, f"{variant} decode T={T}")


# ---------------------------------------------------------------------------------------------
# CUDA: bf16 and fp32 against the oracle, fla's error on the same inputs when it is installed
# ---------------------------------------------------------------------------------------------

def fla_call(variant, N):
    """fla's chunked kernel with our calling convention, or None when fla is not installed."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError:
        return None
    if variant == "rwkv7":
        return lambda x, s0: chunk_rwkv7(x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5,
                                         initial_state=s0, output_final_state=True)
    return lambda x, s0: chunk_gla(x["r"], x["k"], x["v"], x["log_w"], scale=N ** -0.5, initial_state=s0,
                                   output_final_state=True)


def fla_errs(variant, xs, state, dtype):
    """fla's errors on our inputs, keyed by log w's dtype: fp32 (as ours get it), then `dtype`;
    {} without fla. A failing fla call is printed, not raised: the test is of our kernels."""
    call, errs = fla_call(variant, xs["r"].shape[-1]), {}
    for w in dict.fromkeys((F32, dtype)) if call else ():
        try:
            errs[str(w)[6:]] = run_case(variant, xs, state, dtype, call=call, w_dtype=w)
        except Exception as e:
            print(f"{variant} {dtype}: fla with {w} log w failed: {e!r}")
    return errs


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("dtype,N", [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 128),
                                     (torch.float32, 128), (torch.float16, 128)])
def test_gpu_vs_oracle(variant, dtype, N):
    """fp32 inputs run IEEE fp32 dots (~1e-6); 16-bit inputs run bf16 products with the states and
    TF32 chunk-local ones, and add their own rounding (~3e-3). When fla is installed its errors on
    the same inputs (log w in fp32, as ours) are printed beside ours, then with log w in `dtype`."""
    xs = make_inputs(variant, 2, 300, 3, N, seed=7, device="cuda")
    # drawn on the CPU, so that the interpreter can rerun these exact inputs
    state = torch.randn(2, 3, N, N, dtype=F64, generator=torch.Generator().manual_seed(0)).cuda()
    errs = run_case(variant, xs, state, dtype)
    what = f"{variant} {str(dtype)[6:]} N={N}"
    fla = fla_errs(variant, xs, state, dtype)
    if fla:
        print(f"{what}, ours / fla with log w in {' / '.join(fla)}: " + " ".join(
            f"{n}={e:.1e}/" + "/".join(f"{f[n]:.1e}" for f in fla.values()) for n, e in errs.items()))
        w, ref = next(iter(fla.items()))
        print(f"{what}: ours above fla's (log w in {w}) on {[n for n, e in errs.items() if e > ref[n]] or 'none'}")
    assert_errs(errs, 1e-4 if dtype == F32 else 1e-2, f"ours {what}")


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_picks_triton(monkeypatch):
    """backend="auto" on CUDA runs the Triton path (training and decoding)."""
    import kernels
    calls = []
    real = kernels._triton
    monkeypatch.setattr(kernels, "_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    xs = {n: x.float() for n, x in make_inputs("rwkv7", 1, 40, 2, 64, device="cuda").items()}
    kernels.rwkv7_attn(**xs)
    with torch.no_grad():
        kernels.rwkv7_attn(**{n: x[:, :1] for n, x in xs.items()})
    assert len(calls) == 2, "auto did not pick the Triton backend on CUDA"


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_strong_decay():
    """RWKV6 at log w = −5 on the GPU: finite and accurate except the cancelling decay gradient."""
    xs = make_inputs("rwkv6", 2, 300, 3, 128, log_w=-5.0, seed=8, device="cuda")
    state = torch.randn(2, 3, 128, 128, dtype=F64, device="cuda")
    errs = run_case("rwkv6", xs, state, torch.bfloat16)
    assert_errs(errs, 1e-2, "ours rwkv6 bf16 log w = -5", tol_dw=0.5)
