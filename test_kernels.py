"""Parity tests for kernels.py (CPU, ~10 s): every backend of every recurrence against fp64 oracles.

The oracles: kernels.rwkv7_naive / rwkv6_naive, the recurrences as docs/method.md §3-§4 write them
(the paper's parameterisation, and RWKV7's S in the paper's [V, K] layout), so that a layout or
sign bug shared by the kernel-form backends cannot hide; and, for gradients, the step-by-step
kernel-form backend (`naive`), itself checked against them. Errors are relative RMS (fla's
metric), printed per tensor when a check fails.

    python -m pytest -x -q test_kernels.py

A new mixer adds one entry to VARIANTS (its entry point, an input maker and a paper-form oracle)
and the parametrised tests below cover it.
"""
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from kernels import CHUNK, _chunked, _safe_chunk, rwkv6_attn, rwkv6_naive, rwkv7_attn, rwkv7_naive

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Reusable parity machinery
# ---------------------------------------------------------------------------------------------

def rel_err(x, ref):
    """Relative RMS error ‖x − ref‖ / ‖ref‖ in fp64 (absolute where ref is all zero)."""
    x, ref = x.detach().to(F64), ref.detach().to(F64)
    den = ref.pow(2).mean().sqrt()
    return float((x - ref).pow(2).mean().sqrt() / (den if den > 0 else 1.0))


def check_close(got: dict, ref: dict, tol: float, what: str):
    """Compare every tensor in `ref` with `got`; on failure print all of them with their errors."""
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    bad = [n for n, e in errs.items() if not e <= tol]              # NaN fails too
    table = "\n".join(f"  {n:<8} rel err {e:.3e}{'  <-- > %.0e' % tol if n in bad else ''}"
                      for n, e in errs.items())
    assert not bad, f"{what}: {len(bad)} tensor(s) differ\n{table}"
    return errs


def fwd_bwd(fn, inputs: dict, cot: dict | None = None, **kw):
    """Run fn(**inputs) -> (y, S). With cotangents {"y", "S"}, also return the gradient of
    <y, cot_y> + <S, cot_S> with respect to every input (as "d" + name)."""
    xs = {n: x.detach().clone().requires_grad_(cot is not None) for n, x in inputs.items()}
    y, S = fn(**xs, **kw)
    out = {"y": y, "S": S}
    if cot is not None:
        grads = torch.autograd.grad([y, S], list(xs.values()), [cot["y"], cot["S"]])
        out |= {"d" + n: g for n, g in zip(xs, grads)}
    return out


def cotangents(out: dict, seed=1):
    """Random cotangents for y and the final state (a non-zero gradient into S_T)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(out[n].shape, generator=g, dtype=out[n].dtype) for n in ("y", "S")}


def run_stepwise(fn, inputs: dict):
    """The decode path: T calls with T = 1, carrying the state (auto routes them, no grad)."""
    seq = {n: x for n, x in inputs.items() if n != "state"}
    S, ys = inputs.get("state"), []
    with torch.no_grad():
        for t in range(inputs["r"].shape[1]):
            y, S = fn(**{n: x[:, t:t + 1] for n, x in seq.items()}, state=S)
            ys.append(y)
    return {"y": torch.cat(ys, 1), "S": S}


def slice_t(inputs: dict, lo, hi, state):
    return {n: (state if n == "state" else x[:, lo:hi]) for n, x in inputs.items()}


# ---------------------------------------------------------------------------------------------
# Inputs from the paper's parameterisation (docs/method.md §3-§4), and the paper-form oracles
# ---------------------------------------------------------------------------------------------

def _log_w(lo, decay, rnd, shape, g):
    """Decays in [lo, 0): 'random' spread over the range, 'strongest' all at lo, 'mixed' (and
    'adversarial') half the channels at lo and the rest spread up to nearly 1 (w = 1 − 1e-4)."""
    if decay == "strongest":
        return torch.full(shape, lo, dtype=F64)
    if decay == "random":
        return lo * torch.sigmoid(2 * rnd(*shape))
    assert decay in ("mixed", "adversarial"), decay
    spread = (lo * torch.rand(shape, generator=g, dtype=F64) ** 4).clamp(max=-1e-4)
    return torch.where(torch.rand(shape, generator=g, dtype=F64) < 0.5, lo, spread)


def make_rwkv7(B=2, T=17, H=2, N=24, decay="random", seed=0, loud=1.0):
    """RAD-RWKV7 inputs built from docs/method.md §3's quantities. Returns (kernel inputs, the
    paper-form quantities rwkv7_naive takes). decay='adversarial': near-identical κ over time with
    iclr ≈ 1 (the hard case for the triangular solve, docs/kernels.md §4)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    shape = (B, T, H, N)
    r, k, v = loud * rnd(*shape), loud * rnd(*shape), rnd(*shape)
    log_w = _log_w(-math.exp(-0.5), decay, rnd, shape, g)
    if decay == "adversarial":
        kk = F.normalize(rnd(B, 1, H, N) + 1e-3 * rnd(*shape), dim=-1)
        iclr = 1 - 1e-3 * torch.rand(shape, generator=g, dtype=F64)
    else:
        kk, iclr = F.normalize(rnd(*shape), dim=-1), torch.sigmoid(rnd(*shape))
    k_t = k * (1 - log_w.exp() + iclr)                                # state balancing
    state = 0.5 * rnd(B, H, N, N)                                     # [K, V]
    inputs = dict(r=r, log_w=log_w, k=k_t, v=v, a=-kk, b=kk * iclr, state=state)
    return inputs, dict(r=r, w=log_w.exp(), k=k_t, v=v, kk=kk, a=iclr, state=state.mT)   # S_0 [V, K]


def oracle_rwkv7(m):
    """rwkv7_naive on make_rwkv7's paper-form quantities; its [V, K] state back to [K, V]."""
    y, S = rwkv7_naive(**m)
    return {"y": y, "S": S.mT}


def make_rwkv6(B=2, T=17, H=2, N=24, decay="random", seed=0, loud=1.0):
    """RAD-RWKV6 inputs built from docs/method.md §4's quantities (log w down to −5)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    shape = (B, T, H, N)
    r, k, v = loud * rnd(*shape), loud * rnd(*shape), rnd(*shape)
    log_w = _log_w(-5.0, decay, rnd, shape, g)
    k_b = k * (1 - log_w.exp())                                       # state balancing
    state = 0.5 * rnd(B, H, N, N)
    inputs = dict(r=r, log_w=log_w, k=k_b, v=v, state=state)
    return inputs, dict(r=r, w=log_w.exp(), k=k_b, v=v, state=state)


def oracle_rwkv6(m):
    """rwkv6_naive on make_rwkv6's paper-form quantities (its state is [K, V] already)."""
    y, S = rwkv6_naive(**m)
    return {"y": y, "S": S}


@dataclass
class Variant:
    attn: Callable      # public entry point: (**inputs, backend=...) -> (y, S)
    make: Callable      # (B, T, H, N, decay, seed, loud) -> (inputs incl. state, paper-form quantities)
    oracle: Callable    # paper-form quantities -> {"y", "S"}, S in the kernels' [K, V] layout
    decays: tuple       # decay regimes worth testing


VARIANTS = {
    "rwkv7": Variant(rwkv7_attn, make_rwkv7, oracle_rwkv7, ("random", "strongest", "mixed", "adversarial")),
    "rwkv6": Variant(rwkv6_attn, make_rwkv6, oracle_rwkv6, ("random", "strongest", "mixed")),
}
TS = (1, 15, 16, 17, 63, 64, 65, 300)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is faster, and on a shared CPU two OpenMP threads
    waiting for each other make this file far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_all_paths_match_method(variant, T):
    """fp64, non-zero S_0: naive, chunked and the T = 1 decode loop all equal the paper-form loop."""
    V = VARIANTS[variant]
    N = 64 if T in (16, 65) else 24
    inputs, m = V.make(B=2, T=T, H=2, N=N, seed=T)
    ref = V.oracle(m)
    for path, out in [("naive", fwd_bwd(V.attn, inputs, backend="naive")),
                      ("torch", fwd_bwd(V.attn, inputs, backend="torch")),
                      ("decode", run_stepwise(V.attn, inputs))]:
        assert out["y"].dtype == F64 and out["S"].dtype == F64
        check_close(out, ref, 1e-10, f"{variant} {path} T={T} N={N} vs paper form")


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_chunked_match_naive(variant, T):
    """fp64: gradients of every input and of S_0, with cotangents on y and on S_T, over every
    decay regime."""
    V = VARIANTS[variant]
    for decay in V.decays:
        inputs, _ = V.make(B=1, T=T, H=2, N=24, decay=decay, seed=100 + T)
        ref = fwd_bwd(V.attn, inputs, None, backend="naive")
        cot = cotangents(ref)
        ref = fwd_bwd(V.attn, inputs, cot, backend="naive")
        got = fwd_bwd(V.attn, inputs, cot, backend="torch")
        assert set(got) == set(ref) and len(got) == len(inputs) + 2
        check_close(got, ref, 1e-10, f"{variant} torch vs naive, T={T}, decay={decay}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_chunked(variant):
    """torch.autograd.gradcheck of the chunked form with chunk 4: three chunks, one padded."""
    inputs, _ = VARIANTS[variant].make(B=1, T=10, H=1, N=3, decay="mixed", seed=7)
    names = list(inputs)
    xs = [inputs[n].clone().requires_grad_() for n in names]

    def f(*xs):
        d = dict(zip(names, xs))
        a, b = d.get("a"), d.get("b")
        return _chunked(d["r"], d["log_w"], d["k"], d["v"], a, b, d["state"], chunk=4)

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("split", [(37, 50), (32, 32), (1, 70)])
def test_state_carries_across_calls(variant, split):
    """T = a then T = b with the carried state equals one call with T = a + b."""
    V = VARIANTS[variant]
    a, b = split
    inputs, _ = V.make(B=2, T=a + b, H=2, N=24, decay="mixed", seed=a)
    whole = fwd_bwd(V.attn, inputs, backend="torch")
    first = fwd_bwd(V.attn, slice_t(inputs, 0, a, inputs["state"]), backend="torch")
    second = fwd_bwd(V.attn, slice_t(inputs, a, a + b, first["S"]), backend="torch")
    check_close({"y": torch.cat([first["y"], second["y"]], 1), "S": second["S"]}, whole, 1e-10,
                f"{variant} split {split}")


# fp32 against fp64: bounds with margin over the errors measured on CPU (docs/kernels.md §4).
@pytest.mark.parametrize("variant,decay,loud", [
    ("rwkv7", "random", 1.0), ("rwkv7", "strongest", 1.0), ("rwkv7", "adversarial", 1.0),
    ("rwkv6", "random", 1.0), ("rwkv6", "strongest", 30.0), ("rwkv6", "mixed", 1.0)])
def test_fp32_chunked_vs_fp64(variant, decay, loud):
    """fp32 chunked path against the fp64 paper-form loop (forward) and fp64 naive (gradients), at
    N = 64 and T = 300. loud = 30 makes the anti-causal side of the pairwise matrices overflow
    fp32 at log w = −5: it must stay masked."""
    V = VARIANTS[variant]
    inputs, m = V.make(B=1, T=300, H=2, N=64, decay=decay, seed=3, loud=loud)
    ref = fwd_bwd(V.attn, inputs, None, backend="naive")
    cot = cotangents(ref)
    ref = fwd_bwd(V.attn, inputs, cot, backend="naive")
    check_close({"y": ref["y"], "S": ref["S"]}, V.oracle(m), 1e-10, f"{variant} naive vs paper form")
    got = fwd_bwd(V.attn, {n: x.float() for n, x in inputs.items()},
                  {n: c.float() for n, c in cot.items()}, backend="torch")
    assert got["y"].dtype == torch.float32 and got["S"].dtype == torch.float32
    check_close({n: got[n] for n in ("y", "S")}, {n: ref[n] for n in ("y", "S")}, 2e-6,
                f"{variant} fp32 forward, decay={decay}")
    check_close({n: got[n] for n in ref if n.startswith("d")},
                {n: ref[n] for n in ref if n.startswith("d")}, 1e-5,
                f"{variant} fp32 gradients, decay={decay}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_inputs_and_dtypes(variant):
    """bf16 in: y in bf16, state in fp32, close to fp64; an fp32 state may feed fp64 inputs."""
    V = VARIANTS[variant]
    inputs, m = V.make(B=2, T=40, H=2, N=32, seed=5)
    ref = V.oracle(m)
    low = {n: (x.float() if n == "state" else x.bfloat16()) for n, x in inputs.items()}
    for backend in ("naive", "torch"):
        y, S = V.attn(**low, backend=backend)
        assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
        # bf16 inputs differ from the fp64 ones by ~4e-3 relative; that error propagates
        check_close({"y": y, "S": S}, ref, 3e-2, f"{variant} bf16 {backend}")
    y, S = V.attn(**(inputs | {"state": inputs["state"].float()}), backend="torch")
    assert y.dtype == F64 and S.dtype == F64


def test_chunk_not_shrunk_within_method_bounds():
    """At the parameterisations' strongest decays (docs/method.md §3-§4) the production chunk
    sizes are used as they are (so the tests above exercise them), in fp32 as computed by the model."""
    rwkv6_bound = torch.clamp(-torch.tensor([1e3]).exp(), min=-5.0)
    rwkv7_bound = -math.exp(-0.5) * torch.sigmoid(torch.tensor([1e3]))
    assert _safe_chunk(rwkv6_bound, CHUNK["rwkv6"]) == CHUNK["rwkv6"] == 16
    assert _safe_chunk(rwkv7_bound, CHUNK["rwkv7"]) == CHUNK["rwkv7"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decays_beyond_the_parameterisation(variant):
    """log w = −40 (far past the parameterisations' bounds): the chunk shrinks and the result
    stays exact."""
    V = VARIANTS[variant]
    inputs, _ = V.make(B=1, T=50, H=2, N=24, seed=11)
    inputs["log_w"] = torch.where(inputs["log_w"] < inputs["log_w"].median(), -40.0, inputs["log_w"])
    ref = fwd_bwd(V.attn, inputs, backend="naive")
    check_close(fwd_bwd(V.attn, inputs, backend="torch"), ref, 1e-10, f"{variant} log w = −40")
    got32 = V.attn(**{n: x.float() for n, x in inputs.items()}, backend="torch")
    check_close(dict(zip(("y", "S"), got32)), ref, 1e-5, f"{variant} fp32 log w = −40")


def test_default_state_and_scale():
    """state=None is zeros; scale multiplies r (checked on rwkv7 against explicit arguments)."""
    inputs, _ = make_rwkv7(B=1, T=20, H=1, N=8, seed=2)
    zero = inputs | {"state": torch.zeros_like(inputs["state"])}
    no_state = {n: x for n, x in inputs.items() if n != "state"}
    check_close(dict(zip("yS", rwkv7_attn(**no_state))), dict(zip("yS", rwkv7_attn(**zero))), 0, "state=None")
    y1, _ = rwkv7_attn(**inputs, scale=0.3)
    y2, _ = rwkv7_attn(**(inputs | {"r": inputs["r"] * 0.3 * 8 ** 0.5}))
    check_close({"y": y1}, {"y": y2}, 1e-12, "scale")


def test_auto_routes_cpu_decode_to_one_step(monkeypatch):
    """auto on CPU: T = 1 without grad runs one kernel-form step; with grad or T > 1, the chunked
    path; kernels.AUTO pins what auto means."""
    import kernels
    used, recurrent, chunked = [], kernels._recurrent, kernels._chunked
    monkeypatch.setattr(kernels, "_recurrent", lambda *a: used.append("naive") or recurrent(*a))
    monkeypatch.setattr(kernels, "_chunked", lambda *a: used.append("torch") or chunked(*a))
    inputs, _ = make_rwkv6(B=1, T=3, H=1, N=8)
    one = slice_t(inputs, 0, 1, inputs["state"])
    with torch.no_grad():
        rwkv6_attn(**one)
        rwkv6_attn(**inputs)
    rwkv6_attn(**{n: x.clone().requires_grad_() for n, x in one.items()})
    monkeypatch.setattr(kernels, "AUTO", "torch")       # pinned for a run (distill.py --backend)
    with torch.no_grad():
        rwkv6_attn(**one)
    assert used == ["naive", "torch", "torch", "torch"]


def test_bad_inputs_raise_clear_errors():
    inputs, _ = make_rwkv7(B=1, T=4, H=2, N=8)
    with pytest.raises(ValueError, match="k has shape"):
        rwkv7_attn(**(inputs | {"k": inputs["k"][..., :4]}))
    with pytest.raises(ValueError, match="state has shape"):
        rwkv7_attn(**(inputs | {"state": inputs["state"][:, :1]}))
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        rwkv7_attn(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="T ≥ 1"):
        rwkv6_attn(*(inputs[n][:, :0] for n in ("r", "log_w", "k", "v")))
    with pytest.raises(NotImplementedError, match="Triton"):
        rwkv6_attn(*(inputs[n] for n in ("r", "log_w", "k", "v")), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["naive", "torch", "auto"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_fp32_vs_cpu_fp64(variant, backend, device="cuda"):
    """fp32 on the GPU (auto: the Triton kernels once they exist) against fp64 naive on CPU."""
    V = VARIANTS[variant]
    inputs, _ = V.make(B=2, T=100, H=2, N=64, decay="mixed", seed=9)
    ref = fwd_bwd(V.attn, inputs, None, backend="naive")
    cot = cotangents(ref)
    ref = fwd_bwd(V.attn, inputs, cot, backend="naive")
    got = fwd_bwd(V.attn, {n: x.to(device, torch.float32) for n, x in inputs.items()},
                  {n: c.to(device, torch.float32) for n, c in cot.items()}, backend=backend)
    assert got["y"].device.type == device and got["S"].dtype == torch.float32
    check_close({n: got[n].cpu() for n in ("y", "S")}, {n: ref[n] for n in ("y", "S")}, 1e-5,
                f"{variant} {backend} {device} forward")
    check_close({n: got[n].cpu() for n in ref if n.startswith("d")},
                {n: ref[n] for n in ref if n.startswith("d")}, 1e-4, f"{variant} {backend} {device} gradients")
