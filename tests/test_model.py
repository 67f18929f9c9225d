"""model.py's students as objects: LoRA ranks and config errors, parameter counts against
docs/method.md §2-§4, meta-device build, save/load (atomic; non-finite weights refused), dtypes,
the State advanced in place, what from_teacher copies and how it initialises the new parameters (on
the embedded SmolLM2 teacher), and `python model.py`.
(The layers' and the whole model's numbers: test_equivalence.py §3-§4.)

    python -m pytest -x -q tests/test_model.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import teacher as teacher_lib
from conftest import ROOT, TINY_ARCHS, TINY_RANKS, fp64_student, fp64_teacher, perturb_time_mix_
from model import State, Student, StudentConfig, lora_rank
from teacher import TeacherConfig

NEW_PARAMS = {"rwkv7": {"w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2"},
              "rwkv6": {"maa_x", "maa_rkvwg", "m1", "m2", "decay", "d1", "d2", "gate.weight"}}
TINY = dict(vocab_size=64, hidden_size=32, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=64)
BUILTIN = sorted(NEW_PARAMS)   # the RWKV parameter formulas; QLinAtt's count is its own test below


# ---------------------------------------------------------------- config and shapes

def test_lora_ranks_and_config_errors():
    assert [lora_rank(576, *em) for em in ((0.5, 1.8), (0.5, 1.3), (0.8, 0.6))] == [32, 32, 96]
    assert [lora_rank(3584, *em) for em in ((0.5, 1.8), (0.5, 1.3), (0.8, 0.6))] == [96, 64, 416]
    cfg = StudentConfig.from_teacher(TeacherConfig(), "rwkv6")
    assert (cfg.rank_decay, cfg.rank_value, cfg.rank_gate, cfg.rope) == (32, 32, 96, False)
    assert StudentConfig.from_teacher(TeacherConfig(), "rwkv7").rope is True
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown student variant"):
        StudentConfig.from_teacher(TeacherConfig(), "mamba")
    with pytest.raises(ValueError, match="unknown StudentConfig fields"):
        StudentConfig.from_teacher(TeacherConfig(), "rwkv7", ropee=True)


def expected_params(cfg: StudentConfig, tied_teacher: bool):
    """(teacher, student) parameter counts from docs/method.md §2–§4."""
    C, L, H, Hkv, N, F, V = (cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                             cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    D, Rd, Rv, Rg = H * N, cfg.rank_decay, cfg.rank_value, cfg.rank_gate
    attn = 2 * C * D + 2 * C * Hkv * N + (D + 2 * Hkv * N) * cfg.attn_bias + 2 * N * cfg.qk_norm
    shell = V * C + C + L * (2 * C + 3 * C * F + attn)        # embed, final norm, layers
    teacher = shell + V * C * (not tied_teacher)
    if cfg.variant == "rwkv7":   # w0 W1 W2, a0 A1 A2, G1 G2 per layer; v0 V1 V2 for ℓ > 0
        new = L * (2 * (D + C * Rd + Rd * D) + C * Rg + Rg * D) + (L - 1) * (D + C * Rv + Rv * D)
    else:                        # maa_x, maa_rkvwg, M1, M2, decay, D1, D2, gate
        new = L * (C + 5 * C + 5 * C * Rd + 5 * Rd * C + D + C * Rd + Rd * D + C * D)
    return teacher, shell + V * C + new                        # the student's lm_head is its own


@pytest.mark.parametrize("variant", BUILTIN)
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_param_count_matches_method(variant, arch):
    t = fp64_teacher(arch)
    s = Student.from_teacher(t, variant)     # default ranks
    n_t, n_s = expected_params(s.cfg, t.cfg.tie_embeddings)
    assert sum(p.numel() for p in t.parameters()) == n_t
    assert sum(p.numel() for p in s.parameters()) == n_s


def test_meta_build_to_empty_init_weights():
    cfg = StudentConfig.from_teacher(fp64_teacher("qwen3").cfg, "rwkv7", **TINY_RANKS)
    with torch.device("meta"):
        s = Student(cfg)
    s.to_empty(device="cpu")
    s.init_weights()
    assert torch.equal(s.inv_freq, teacher_lib.rope_inv_freq(cfg))
    assert s.lm_head.weight.data_ptr() != s.embed_tokens.weight.data_ptr()
    logits, state = s(torch.randint(0, cfg.vocab_size, (2, 5)))
    assert torch.isfinite(logits).all() and state.pos == 5


# ---------------------------------------------------------------- save, load, dtypes

def test_state_save_load(tmp_path):
    s = fp64_student("rwkv6", "qwen3")
    idx = torch.randint(0, s.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    _, st = s(idx[:, :5])
    st.save(tmp_path / "state.safetensors")
    st2 = State.load(tmp_path / "state.safetensors")
    assert st2.pos == 5 and all(torch.equal(a[k], b[k]) for a, b in zip(st.layers, st2.layers) for k in a)
    assert torch.equal(s(idx[:, 5:], st)[0], s(idx[:, 5:], st2)[0])


def test_bf16_keeps_decay_and_state_fp32():
    s = fp64_student("rwkv7", "qwen3").to(torch.bfloat16)
    s.init_buffers()
    logits, st = s(torch.randint(0, s.cfg.vocab_size, (2, 6)))
    assert logits.dtype == torch.bfloat16 and st.layers[0]["S"].dtype == torch.float32
    assert s.inv_freq.dtype == torch.float32


def test_save_load_roundtrip_and_errors(tmp_path):
    s = fp64_student("rwkv7", "qwen2")
    idx = torch.randint(0, s.cfg.vocab_size, (1, 8))
    s.save(tmp_path / "st")
    s2 = Student.load(tmp_path / "st")
    assert s2.cfg == s.cfg
    assert torch.equal(s(idx)[0], s2(idx)[0])
    assert Student.load(tmp_path / "st", dtype=torch.float32).lm_head.weight.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="config.json"):
        Student.load(tmp_path / "nothing")
    (tmp_path / "st" / "config.json").write_text('{"variant": "rwkv9"}')
    with pytest.raises(ValueError, match="unknown student variant"):
        Student.load(tmp_path / "st")


# ---------------------------------------------------------------- state semantics, atomic save, finite load

@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_forward_advances_the_state_in_place(variant):
    """model.State's semantics, on CPU as on CUDA: forward(b, state) continues `state` and returns it,
    so two calls from one State read a then b (== forward(a + b)); State.copy() branches. Without
    autograd the tensors are overwritten (same addresses); with autograd the layers' dicts are replaced
    and the backward through the first call still works."""
    s = fp64_student(variant, "llama")
    idx = torch.randint(0, s.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    full, _ = s(idx)
    with torch.no_grad():
        st = s.init_state(2, dtype=torch.float64)
        ptrs = [t.data_ptr() for d in st.layers for t in d.values()]
        _, out = s(idx[:, :4], st)
        branch = st.copy()
        lb, _ = s(idx[:, 4:], st)
        lb2, _ = s(idx[:, 4:], branch)
    assert out is st and st.pos == 10 and branch.pos == 10
    assert [t.data_ptr() for d in st.layers for t in d.values()] == ptrs
    assert torch.equal(lb, lb2) and torch.allclose(lb, full[:, 4:], rtol=0, atol=1e-12)
    st = s.init_state(2, dtype=torch.float64)
    la, _ = s(idx[:, :4], st)
    lb, _ = s(idx[:, 4:], st)                         # replaces the dicts la's graph read
    (la.sum() + lb.sum()).backward()
    assert st.pos == 10 and s.lm_head.weight.grad is not None


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "qlinatt"])
def test_compiled_blocks_compile_once_for_all_layers(variant):
    """distill.py compiles every block: what torch.compile traces must not depend on the layer's
    index (it specialises on integer attributes and stops compiling after 8 variants), so a deeper
    student compiles no more graphs than a shallower one."""
    def graphs(n_layers):
        torch._dynamo.reset()
        n = []
        count = lambda gm, _: n.append(1) or gm.forward  # noqa: E731  (one backend for every block)
        student = Student(StudentConfig.from_teacher(TeacherConfig(**{**TINY, "n_layers": n_layers}), variant))
        for blk in student.layers:
            blk.compile(backend=count)
        student(torch.randint(0, 64, (1, 16)))[0].sum().backward()
        return len(n)
    assert graphs(6) == graphs(3) > 0


def test_save_is_atomic_and_load_rejects_non_finite(tmp_path, monkeypatch):
    """A save that dies while writing leaves the previous model.safetensors whole and no temporary
    file; a checkpoint holding a NaN fails to load with one line naming the tensor."""
    import model as model_lib
    s = fp64_student("rwkv7", "llama")
    s.save(tmp_path / "st")
    before = (tmp_path / "st" / "model.safetensors").read_bytes()

    def dies(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(model_lib, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        s.save(tmp_path / "st")
    monkeypatch.undo()
    assert (tmp_path / "st" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        s.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    s.save(tmp_path / "st")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
        Student.load(tmp_path / "st")


# ---------------------------------------------------------------- the embedded default teacher

def test_from_teacher_copies_bit_identical(default_teacher, default_students):
    t, _ = default_teacher
    tsd = t.state_dict()
    for variant, s in default_students.items():
        ssd = s.state_dict()
        assert torch.equal(ssd["lm_head.weight"], tsd["lm_head.weight"])   # tied -> from embedding
        assert s.lm_head.weight.data_ptr() != s.embed_tokens.weight.data_ptr()
        n = 0
        for name, want in tsd.items():
            if name == "lm_head.weight":
                continue
            got = ssd[name.replace("self_attn.", "time_mix.")]
            assert got.dtype == want.dtype and torch.equal(got, want), f"{variant}: {name}"
            n += 1
        assert n == 2 + 9 * t.cfg.n_layers   # embed, norm + per layer 2 norms, 3 MLP, 4 attn
        copied = {k.replace("self_attn.", "time_mix.") for k in tsd}
        new = {k.split("time_mix.")[1] for k in ssd if k not in copied}   # checked by the init test
        assert new == NEW_PARAMS[variant], new ^ NEW_PARAMS[variant]


def test_default_students_param_counts(default_teacher, default_students):
    t, _ = default_teacher
    for variant, s in default_students.items():
        n_t, n_s = expected_params(s.cfg, t.cfg.tie_embeddings)
        assert (s.cfg.rank_decay, s.cfg.rank_value, s.cfg.rank_gate) == (32, 32, 96)
        assert sum(p.numel() for p in t.parameters()) == n_t
        assert sum(p.numel() for p in s.parameters()) == n_s
        print(f"\n{variant}: teacher {n_t:,}  student {n_s:,}")


def test_default_students_init_values(default_students):
    s7, s6 = default_students["rwkv7"], default_students["rwkv6"]
    L, D = s7.cfg.n_layers, s7.cfg.n_heads * s7.cfg.head_dim
    n = torch.arange(D, dtype=torch.float64) / (D - 1)
    for l, blk in enumerate(s7.layers):
        m = blk.time_mix
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(m.w0.double()))
        assert 0.895 <= w.min() and w.max() <= 0.9992, (l, w.min(), w.max())
        assert torch.allclose(m.w0.double(), -6.5 + 5 * n ** (0.85 + math.sqrt(l / (L - 1))), atol=1e-6)
        for p in (m.w1, m.a0, m.a1, m.g1):
            assert not p.any()
        for p in (m.w2, m.a2, m.g2) + ((m.v2,) if l else ()):   # ortho(0.1): rows orthogonal, norm 0.1
            assert torch.allclose(p @ p.T, 0.01 * torch.eye(p.shape[0]), atol=1e-5)
        assert hasattr(m, "v0") == (l > 0)
        if l:
            assert (m.v0 == 1).all() and not m.v1.any()
    for l, blk in enumerate(s6.layers):
        m = blk.time_mix
        assert (m.maa_x == 1).all() and not m.maa_rkvwg.any() and not m.m1.any() and not m.d1.any()
        assert not m.gate.weight.any()
        assert m.m2.abs().max() <= 0.01 and m.d2.abs().max() <= 0.01 and m.m2.abs().max() > 0
        assert torch.allclose(m.decay.double(), -6 + 5 * n ** (0.7 + 1.3 * l / (L - 1)), atol=1e-6)


@torch.no_grad()
def test_rwkv6_token_shift_inert_at_init(default_students):
    """At init x_r = x_k = x_v = x_w = x_g = x exactly, whatever the carried last x."""
    s = default_students["rwkv6"]
    m, C = s.layers[3].time_mix, s.cfg.hidden_size
    x = torch.randn(2, 5, C)
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
             for mod in (m.q_proj, m.k_proj, m.v_proj, m.gate)]
    y0, _ = m(x, m.init_state(2), s.ctx(5))
    y1, _ = m(x, {**m.init_state(2), "x": torch.randn(2, C)}, s.ctx(5))
    for h in hooks:
        h.remove()
    assert len(seen) == 8 and all(torch.equal(z, x) for z in seen)
    assert torch.equal(y0, y1)




# ---------------------------------------------------------------- QLinAtt

def test_qlinatt_config_params_and_copies(tmp_path):
    """RoPE on by default (the mixer's `rope`); new parameters only ln_w, ln_b (D each per layer);
    the teacher's q/k/v/o bit for bit; save/load and bf16 (state stays fp32)."""
    t = fp64_teacher("qwen2").float()   # fp32: Student.from_teacher rounds fp64 copies to fp32
    assert StudentConfig.from_teacher(t.cfg, "qlinatt").rope is True
    assert StudentConfig.from_teacher(t.cfg, "qlinatt", rope=False).rope is False
    s = Student.from_teacher(t, "qlinatt")
    D, L = s.cfg.n_heads * s.cfg.head_dim, s.cfg.n_layers
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, s))
    assert n_s == n_t + t.cfg.vocab_size * t.cfg.hidden_size * t.cfg.tie_embeddings + 2 * D * L
    tsd, ssd = t.state_dict(), s.state_dict()
    assert all(torch.equal(ssd[k.replace("self_attn.", "time_mix.")], v) for k, v in tsd.items())
    m = s.layers[0].time_mix
    assert (m.ln_w == 1).all() and (m.ln_b == 0).all()
    perturb_time_mix_(s).save(tmp_path / "st")
    idx = torch.randint(0, 97, (2, 6))
    assert torch.equal(Student.load(tmp_path / "st")(idx)[0], s(idx)[0])
    b = Student.from_teacher(t, "qlinatt").to(torch.bfloat16)
    b.init_buffers()
    logits, st = b(idx)
    assert logits.dtype == torch.bfloat16 and st.layers[0]["S"].dtype == torch.float32


# ---------------------------------------------------------------- the command line

def test_model_cli_builds_qlinatt(tiny_hf_llama, tmp_path):
    """`python model.py --variant qlinatt` builds and saves the student."""
    r = subprocess.run([sys.executable, "model.py", "--variant", "qlinatt", "--teacher", str(tiny_hf_llama),
                        "--out", str(tmp_path / "init")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert Student.load(tmp_path / "init").cfg.variant == "qlinatt"
