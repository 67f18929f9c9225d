"""kernels.py's interface: chunk sizes, defaults, how `auto` picks a backend, the V-block rule, and
clear errors for bad inputs. (Every backend's numbers against the paper's loops: test_equivalence.py §2;
the inputs come from its VARIANTS.)

    python -m pytest -x -q tests/test_kernels.py
"""
import math

import pytest
import torch

import kernels
from kernels import CHUNK, _safe_chunk, rwkv6_attn, rwkv7_attn
from test_equivalence import VARIANTS, check_close, slice_t, triton_inputs


def test_chunk_not_shrunk_within_method_bounds():
    """At the parameterisations' strongest decays (docs/method.md §3-§4) the production chunk
    sizes are used as they are (so the parity tests exercise them), in fp32 as computed by the model."""
    rwkv6_bound = torch.clamp(-torch.tensor([1e3]).exp(), min=-5.0)
    rwkv7_bound = -math.exp(-0.5) * torch.sigmoid(torch.tensor([1e3]))
    assert _safe_chunk(rwkv6_bound, CHUNK["rwkv6"]) == CHUNK["rwkv6"] == 16
    assert _safe_chunk(rwkv7_bound, CHUNK["rwkv7"]) == CHUNK["rwkv7"]


def test_default_state_and_scale():
    """state=None is zeros; scale multiplies r (checked on rwkv7 against explicit arguments)."""
    inputs, _ = VARIANTS["rwkv7"].make(B=1, T=20, H=1, N=8, seed=2)
    zero = inputs | {"state": torch.zeros_like(inputs["state"])}
    no_state = {n: x for n, x in inputs.items() if n != "state"}
    check_close(dict(zip("yS", rwkv7_attn(**no_state))), dict(zip("yS", rwkv7_attn(**zero))), 0, "state=None")
    y1, _ = rwkv7_attn(**inputs, scale=0.3)
    y2, _ = rwkv7_attn(**(inputs | {"r": inputs["r"] * 0.3 * 8 ** 0.5}))
    check_close({"y": y1}, {"y": y2}, 1e-12, "scale")


def test_auto_routes_cpu_decode_to_one_step(monkeypatch):
    """auto on CPU: T = 1 without grad runs one kernel-form step; with grad or T > 1, the chunked
    path; kernels.AUTO pins what auto means."""
    used, recurrent, chunked = [], kernels._recurrent, kernels._chunked
    monkeypatch.setattr(kernels, "_recurrent", lambda *a: used.append("naive") or recurrent(*a))
    monkeypatch.setattr(kernels, "_chunked", lambda *a: used.append("torch") or chunked(*a))
    inputs, _ = VARIANTS["rwkv6"].make(B=1, T=3, H=1, N=8)
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
    inputs, _ = VARIANTS["rwkv7"].make(B=1, T=4, H=2, N=8)
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


def test_v_block_rule(monkeypatch):
    """On an H200 (132 SMs) each shape of docs/kernels.md §5 gets the V block timed fastest there
    (docs/kernels.md §3): 64 when B·H·N/64 programs fill the SMs, else narrower."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    want = {(16, 9, 64): 64, (2, 9, 64): 16, (32, 28, 128): 64, (4, 28, 128): 64, (1, 28, 128): 32}  # (B, H, N)
    for (B, H, N), bv in want.items():
        assert kernels._v_block(B, H, N, torch.device("cuda")) == bv, (B, H, N)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_picks_triton(monkeypatch):
    """backend="auto" on CUDA runs the Triton path (training and decoding)."""
    calls = []
    real = kernels._triton
    monkeypatch.setattr(kernels, "_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    xs = {n: x.float() for n, x in triton_inputs("rwkv7", 1, 40, 2, 64, device="cuda").items()}
    kernels.rwkv7_attn(**xs)
    with torch.no_grad():
        kernels.rwkv7_attn(**{n: x[:, :1] for n, x in xs.items()})
    assert len(calls) == 2, "auto did not pick the Triton backend on CUDA"
