"""Tests of QLinAtt (model.QLinAttTimeMix, variant "qlinatt"; paper App. A.3, docs/method.md §5): a
mixer added to model.py passes the built-in mixers' parity tests, reused from their files, not copied:
  kernel == naive        test_kernels.py's tests, run on the inputs QLinAtt hands to rwkv6_attn
                         (log w = 0, k not balanced) against kernels.rwkv6_naive at w = 1;
  parallel == recurrent  test_model.py's whole-model test (T at once == split == token by token).
Besides: the layer against an fp64 oracle written from the paper's quadratic form (App. A.3, eq. 33:
LayerNorm(RoPE(q) RoPE(k)ᵀ ⊙ mask · v) per head), independent of the recurrence and of TimeMix; its
numerics over a long sequence (no decay: the state grows, the output must not); and the users'
commands on a tiny random teacher: model.py and distill.py --step 1, 2, 3 with --variant qlinatt,
sample.py, export.py (loaded by transformers in a clean process without the checkout).

    python -m pytest -x -q test_fork.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data as data_lib
import kernels
import teacher as teacher_lib
import test_kernels as tk
import test_model as tm
from conftest import make_hf_teacher
from model import Student, StudentConfig
from teacher import TeacherConfig

HERE = Path(__file__).resolve().parent
F64 = torch.float64
VARIANT = "qlinatt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared CPU: one thread (as test_kernels.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- kernel == naive (test_kernels.py's tests)

def make_qlinatt(B=2, T=17, H=2, N=24, decay="none", seed=0, loud=1.0):
    """rwkv6_attn's inputs from QLinAtt: log w = 0 (no decay), k as projected (no state balancing,
    which would zero it at w = 1). `decay` is ignored: there is none. Returns (kernel inputs, the
    quantities the oracle reads)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    shape = (B, T, H, N)
    r, k, v = loud * rnd(*shape), loud * rnd(*shape), rnd(*shape)
    log_w, state = torch.zeros(shape, dtype=F64), 0.5 * rnd(B, H, N, N)
    return dict(r=r, log_w=log_w, k=k, v=v, state=state), dict(r=r, w=log_w.exp(), k=k, v=v, state=state)


def qlinatt_oracle(m):
    """QLinAtt's recurrence, S_t = S_{t-1} + k_tᵀ v_t: kernels.rwkv6_naive (docs/method.md §4) at w = 1."""
    y, S = kernels.rwkv6_naive(**m)
    return {"y": y, "S": S}


@pytest.fixture
def qlinatt_kernel(monkeypatch):
    """test_kernels.py's VARIANTS with QLinAtt's entry: its tests then run on it as they are."""
    monkeypatch.setitem(tk.VARIANTS, VARIANT,
                        tk.Variant(kernels.rwkv6_attn, make_qlinatt, qlinatt_oracle, ("none",)))


@pytest.mark.parametrize("T", tk.TS)
def test_kernel_paths_match_method(qlinatt_kernel, T):
    tk.test_forward_all_paths_match_method(VARIANT, T)


@pytest.mark.parametrize("T", tk.TS)
def test_kernel_gradients_chunked_match_naive(qlinatt_kernel, T):
    tk.test_gradients_chunked_match_naive(VARIANT, T)


def test_kernel_gradcheck_state_and_dtypes(qlinatt_kernel):
    tk.test_gradcheck_chunked(VARIANT)
    for split in [(37, 50), (32, 32), (1, 70)]:
        tk.test_state_carries_across_calls(VARIANT, split)
    tk.test_fp32_chunked_vs_fp64(VARIANT, "none", 1.0)
    tk.test_bf16_inputs_and_dtypes(VARIANT)


# ---------------------------------------------------------------- the mixer in the model

def test_parallel_equals_recurrent():
    """test_model.py's test: T tokens at once == 6 + 5 with the carried state == token by token."""
    tm.test_split_forward_and_token_loop_equal_parallel(VARIANT)


def paper_layer(mix, x, S0, pos):
    """App. A.3 eq. 33 in its quadratic form, fp64: y_t = LN_head(N^-½ (r_t S0 + Σ_{j≤t} (r_t·k_j) v_j))
    ⊙ ln_w + ln_b, out = y W_oᵀ; the state after T tokens is S0 + Σ_j k_jᵀ v_j ([K, V]). r, k, v from
    test_model.project (projections, q/k norms, RoPE); query head h reads kv head h // G."""
    P = {n: p.detach().double() for n, p in mix.named_parameters()}
    cfg = mix.cfg
    B, T, C = x.shape
    H, N, G = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    r, k, v = (torch.stack(z, 1) for z in zip(*(tm.project(P, cfg, x[:, t], x[:, t], x[:, t], pos + t)
                                                 for t in range(T))))          # (B, T, H or Hkv, N)
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    A = torch.einsum("bthn,bjhn->bhtj", r, k).tril()                       # causal mask M
    y = (torch.einsum("bhtj,bjhn->bthn", A, v) + torch.einsum("bthk,bhkv->bthv", r, S0)) * N ** -0.5
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + 1e-5) * P["ln_w"].view(H, N) + P["ln_b"].view(H, N)
    S = S0 + torch.einsum("bthk,bthv->bhkv", k, v)
    return y.reshape(B, T, H * N) @ P["o_proj.weight"].T, S


@pytest.mark.parametrize("arch", sorted(tm.TINY))
def test_layer_matches_paper_form(arch):
    s = tm.tiny_student(VARIANT, arch)                 # GQA; qwen2 biases; qwen3 q/k norms
    cfg, B, T, pos = s.cfg, 2, 9, 5
    torch.manual_seed(2)
    x = torch.randn(B, T, cfg.hidden_size, dtype=F64)
    S0 = 0.3 * torch.randn(B, cfg.n_heads, cfg.head_dim, cfg.head_dim, dtype=F64)
    for mix in (s.layers[0].time_mix, s.layers[1].time_mix):
        want_y, want_S = paper_layer(mix, x, S0, pos)
        y, st = mix(x, {"S": S0}, tm.rope_ctx64(cfg, T, pos))
        tol = 2e-6 if cfg.qk_norm else 1e-10          # teacher.RMSNorm (q/k norms) runs in fp32
        assert tm.rel(y, want_y) < tol and tm.rel(st["S"], want_S) < tol, (tm.rel(y, want_y), tm.rel(st["S"], want_S))


def test_config_params_and_copies(tmp_path):
    """RoPE on by default (the mixer's `rope`); new parameters only ln_w, ln_b (D each per layer);
    the teacher's q/k/v/o bit for bit; save/load and bf16 (state stays fp32)."""
    t = tm.tiny_teacher("qwen2").float()   # fp32: Student.from_teacher rounds fp64 copies to fp32
    assert StudentConfig.from_teacher(t.cfg, VARIANT).rope is True
    assert StudentConfig.from_teacher(t.cfg, VARIANT, rope=False).rope is False
    s = Student.from_teacher(t, VARIANT)
    D, L = s.cfg.n_heads * s.cfg.head_dim, s.cfg.n_layers
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, s))
    assert n_s == n_t + t.cfg.vocab_size * t.cfg.hidden_size * t.cfg.tie_embeddings + 2 * D * L
    tsd, ssd = t.state_dict(), s.state_dict()
    assert all(torch.equal(ssd[k.replace("self_attn.", "time_mix.")], v) for k, v in tsd.items())
    m = s.layers[0].time_mix
    assert (m.ln_w == 1).all() and (m.ln_b == 0).all()
    tm.perturb_(s).save(tmp_path / "st")
    idx = torch.randint(0, 97, (2, 6))
    assert torch.equal(Student.load(tmp_path / "st")(idx)[0], s(idx)[0])
    b = Student.from_teacher(t, VARIANT).to(torch.bfloat16)
    b.init_buffers()
    logits, st = b(idx)
    assert logits.dtype == torch.bfloat16 and st.layers[0]["S"].dtype == torch.float32


def test_long_sequence_numerics():
    """No decay: ‖S‖ grows with T, the LayerNorm keeps the output O(1), and fp32 (the model's
    chunked path) stays within 1e-5 of fp64 over 4096 tokens."""
    cfg = TeacherConfig(vocab_size=97, hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                        intermediate_size=32, rope_theta=1e4)
    torch.manual_seed(0)
    s = Student.from_teacher(teacher_lib.Teacher(cfg), VARIANT)
    mix, T = s.layers[0].time_mix, 4096
    x = torch.randn(1, T, 32)
    with torch.no_grad():
        y32, st32 = mix(x, mix.init_state(1), s.ctx(T))
        early = mix(x[:, :T // 16], mix.init_state(1), s.ctx(T // 16))[1]["S"]
        mix.double()
        y64, st64 = mix(x.double(), mix.init_state(1, dtype=F64), s.ctx(T))
    assert st32["S"].norm() > 2 * early.norm()                        # the sum keeps growing (~√T)
    assert y32[0, -64:].std() < 3 * y32[0, :64].std()                   # the output does not
    assert tm.rel(y32, y64) < 1e-5 and tm.rel(st32["S"], st64["S"]) < 1e-5, (tm.rel(y32, y64), tm.rel(st32["S"], st64["S"]))


# ---------------------------------------------------------------- the users' commands, unchanged

def sh(*argv, cwd=HERE, env=None, timeout=300):
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**(env or os.environ), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{argv[:2]} exit {r.returncode}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random llama teacher (Hugging Face folder) and token files made by data.py."""
    root = tmp_path_factory.mktemp("qlinatt")
    teacher = make_hf_teacher(root, "llama")
    text = data_lib.default_corpus()[0].read_text()
    docs = [root / "a.txt", root / "b.txt"]              # two documents: one is held out
    docs[0].write_text(text[:16000])
    docs[1].write_text(text[16000:24000])
    data_lib.prepare(docs, teacher_lib.load_tokenizer(teacher), root / "data", val_fraction=0.3, progress=False)
    return teacher, root / "data"


def test_model_cli_builds_qlinatt(env, tmp_path):
    """`python model.py --variant qlinatt` builds and saves the student."""
    sh("model.py", "--variant", VARIANT, "--teacher", env[0], "--out", tmp_path / "init")
    assert Student.load(tmp_path / "init").cfg.variant == VARIANT


def test_three_steps_sample_export(env, tmp_path):
    """distill.py --step 1, 2, 3 --variant qlinatt (a few updates each), sample.py and export.py on the
    result, as the README runs them; the exported folder loads with transformers in a process
    without the checkout and gives the student's logits."""
    teacher, data = env
    tok = teacher_lib.load_tokenizer(teacher)
    out = tmp_path / "run"
    common = ["--teacher", teacher, "--data", data, "--out", out, "--ctx", 32, "--batch", 4,
              "--micro-batch", 2, "--eval-windows", 4, "--eval-every", 1000, "--lr", "3e-3"]
    for step, updates in ((1, 8), (2, 3), (3, 3)):
        sh("distill.py", "--step", step, *(["--variant", VARIANT] if step == 1 else []), *common,
           "--tokens", updates * 4 * 32)
        log = [json.loads(line) for line in (out / f"step{step}" / "log.jsonl").open()]
        assert len([r for r in log if "loss" in r]) == updates
    evals = [r["eval"] for r in map(json.loads, (out / "step1" / "log.jsonl").open()) if "eval" in r]
    print(f"step 1 held-out align loss {evals[0]['align_loss']:.4f} -> {evals[-1]['align_loss']:.4f}")
    assert evals[-1]["align_loss"] < evals[0]["align_loss"], evals
    ckpt = out / "step3" / "student"
    assert json.loads((ckpt / "config.json").read_text())["variant"] == VARIANT

    student = Student.load(ckpt).eval()
    ids = [tok.bos_id] * tok.add_bos + tok.encode("The quick brown fox")
    with torch.no_grad():                  # greedy by re-running the parallel path: no state involved
        new = []
        for _ in range(8):
            new.append(int(student(torch.tensor([ids + new]))[0][0, -1].argmax()))
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    text = sh("sample.py", "--ckpt", ckpt, "--prompt", "The quick brown fox", "--max-new-tokens", 8)
    assert tok.decode(new) in text, (tok.decode(new), text)

    hf = tmp_path / "hf"
    sh("export.py", "--ckpt", ckpt, "--out", hf)
    code = ("import sys, json, torch\n"
            "for m in ('model', 'kernels', 'teacher', 'triton', 'gguf'): sys.modules[m] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(hf)!r}, trust_remote_code=True)\n"
            f"print(json.dumps(m(torch.tensor([{ids}])).logits[0].tolist()))\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = torch.tensor(json.loads(sh("-c", code, cwd=tmp_path, env=clean).strip().splitlines()[-1]))
    with torch.no_grad():
        ref = student(torch.tensor([ids]))[0][0]
    print(f"exported vs model.py logits rel err {tm.rel(got.double(), ref.double()):.1e}")
    assert tm.rel(got.double(), ref.double()) < 1e-6
