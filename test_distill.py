"""Tests for distill.py: the three RADLADS steps under FSDP2 on CPU (gloo).

Tiny random llama teachers saved as Hugging Face folders (config.json, model.safetensors, a small
BPE tokenizer.json trained here; no transformers import) and token files made by data.py.
References are independent of distill.py's training code: the full-logit formula for the chunked
loss, a plain-PyTorch loop without FSDP for step 2, a 1-process run for the 2-process one, an
uninterrupted run for a resumed one, a fresh Student.from_teacher for what step 1 may move.
The real default teacher (SmolLM2-135M GGUF) runs once, for step 1 end to end. ~2 min on 2 cores.

    python -m pytest -x -q test_distill.py
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data as data_lib
import distill
import teacher as teacher_lib
from model import Student
from teacher import Teacher, TeacherConfig

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)   # tiny models: more threads only contend on a shared 2-core machine
TEXT = "\n".join(sorted(Path(data_lib.default_corpus()[0]).parent.glob("*_gut.txt"))[i].read_text()[:40000]
                 for i in range(4))


def tiny_hf_teacher(folder, vocab=256, seed=0, **shape):
    """A tiny llama teacher saved as a Hugging Face folder that teacher.load_teacher reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    V = tk.get_vocab_size()
    cfg = {**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64), **shape}
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=V, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        eos_token_id=tk.token_to_id("<eos>"), max_position_embeddings=4096, **cfg)))
    torch.manual_seed(seed)
    t = Teacher(TeacherConfig(vocab_size=V, hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                              n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                              head_dim=cfg["head_dim"], intermediate_size=cfg["intermediate_size"],
                              rope_theta=10000.0, tie_embeddings=False))
    with torch.no_grad():   # attention that matters and a peaked head: a student has much to learn
        for blk in t.layers:
            blk.self_attn.v_proj.weight.mul_(3)
            blk.self_attn.o_proj.weight.mul_(3)
        t.lm_head.weight.normal_(0, 3 / cfg["hidden_size"] ** 0.5)
    sd = t.state_dict()
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_hf_teacher(root / "teacher")
    tok = teacher_lib.load_tokenizer(teacher)
    (root / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    (root / "b.txt").write_text(TEXT[len(TEXT) // 2:])
    data_lib.prepare([root / "a.txt", root / "b.txt"], tok, root / "data", val_fraction=0.3, progress=False)
    return root


def flags(env, out, *extra):
    return ["--teacher", str(env / "teacher"), "--data", str(env / "data"), "--out", str(out),
            "--ctx", "32", "--batch", "4", "--micro-batch", "2", "--eval-windows", "4", *extra]


def losses(out, step):
    return [r["loss"] for r in map(json.loads, (Path(out) / f"step{step}" / "log.jsonl").open()) if "loss" in r]


def evals(out, step):
    return [r["eval"] for r in map(json.loads, (Path(out) / f"step{step}" / "log.jsonl").open()) if "eval" in r]


def run(env, out, *extra):
    distill.main(flags(env, out, *extra))


def fails(capsys, *argv):
    """Run distill in-process, expect the clean exit 2; returns the one-line error."""
    with pytest.raises(SystemExit) as e:
        distill.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def falls(xs, factor):
    first, last = sum(xs[:5]) / 5, sum(xs[-5:]) / 5
    print(f"first 5 mean {first:.4f}, last 5 mean {last:.4f}")
    return last < factor * first


# ---------------------------------------------------------------- the chunked head loss

def test_head_loss_matches_full_logits():
    """Chunked KL / CE with recomputation == the plain full-logit formula, values and gradients."""
    g = torch.Generator().manual_seed(0)
    M, C, V = 37, 8, 50            # chunks of 5 tokens, the last one short
    h, W, hT, WT = (torch.randn(n, C, generator=g, dtype=torch.float64) for n in (M, V, M, V))
    y = torch.randint(0, V, (M,), generator=g)
    for teacher in (True, False):
        a, b = ([x.clone().requires_grad_() for x in (h, W)] for _ in range(2))
        logp = F.log_softmax(a[0] @ a[1].T, -1)
        if teacher:
            q = F.softmax(hT @ WT.T, -1)
            ref = (q * (q.log() - logp)).sum(-1).mean()
        else:
            ref = -logp.gather(1, y[:, None]).mean()
        got = distill.head_loss(b[0], b[1], y, hT if teacher else None, WT if teacher else None, chunk=5)
        ref.backward(), got.backward()
        assert torch.allclose(got, ref, rtol=1e-10), (teacher, got.item(), ref.item())
        for x, z in zip(a, b):
            assert torch.allclose(x.grad, z.grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- the three steps, one process

@pytest.fixture(scope="module")
def three_steps(env, tmp_path_factory):
    """Steps 1, 2, 3 in turn (30 updates each), counting teacher loads."""
    out = tmp_path_factory.mktemp("three")
    loads = []
    real = teacher_lib.load_teacher

    def counting(*a, **k):
        loads.append(a)
        return real(*a, **k)

    teacher_lib.load_teacher = counting
    try:
        run(env, out, "--tokens", str(30 * 4 * 32), "--lr", "3e-3", "--eval-every", "1000")
    finally:
        teacher_lib.load_teacher = real
    return out, loads


@pytest.mark.parametrize("step", [1, 2, 3])
def test_loss_falls(three_steps, step):
    out, _ = three_steps
    xs = losses(out, step)
    assert len(xs) == 30 and all(map(math.isfinite, xs))
    assert falls(xs, 0.9), xs
    key = {1: "align_loss", 2: "kl", 3: "ppl_student"}[step]   # what the step optimises, held out
    e = evals(out, step)
    assert e[-1][key] < e[0][key], (e[0], e[-1])


def test_step1_trains_only_time_mix(env, three_steps):
    """Against a fresh Student.from_teacher: everything outside time-mix bit-identical after step 1,
    every time-mix tensor moved (teacher copies q/k/v/o included)."""
    out, _ = three_steps
    torch.manual_seed(0)   # from_teacher's random inits use the seed distill uses (--seed 0)
    init = Student.from_teacher(teacher_lib.load_teacher(env / "teacher")[0], "rwkv7").state_dict()
    after = Student.load(out / "step1" / "student").state_dict()
    assert init.keys() == after.keys()
    moved = {k for k in init if not torch.equal(init[k], after[k])}
    time_mix = {k for k in init if ".time_mix." in k}
    assert moved <= time_mix, sorted(moved - time_mix)
    unmoved = time_mix - moved
    assert not unmoved, sorted(unmoved)


def test_step3_loads_no_teacher(env, three_steps, tmp_path):
    """Step 3 read no teacher in the 3-step run, and runs with none at all: the tokenizer for the
    data check comes from the previous step's student folder."""
    out, loads = three_steps
    assert len(loads) == 2, loads        # steps 1 and 2 only
    assert "kl" not in evals(out, 3)[-1]
    step2 = out / "step2" / "student"
    assert teacher_lib.load_tokenizer(step2).fingerprint == teacher_lib.load_tokenizer(env / "teacher").fingerprint
    run(env, tmp_path, "--step", "3", "--init", str(step2), "--teacher", str(tmp_path / "no-such-teacher"),
        "--tokens", str(2 * 4 * 32))
    assert len(losses(tmp_path, 3)) == 2 and (tmp_path / "step3" / "student" / "tokenizer.json").is_file()


def test_init_teacher_freeze_mlp(env, tmp_path):
    """The two ablation flags: step 2 from the teacher-initialised student (no step 1) with MLPs,
    embeddings and lm_head frozen. Against a fresh Student.from_teacher: those stay bit-identical,
    every time-mix tensor and norm moves."""
    run(env, tmp_path, "--step", "2", "--init", "teacher", "--freeze-mlp", "--tokens", str(3 * 4 * 32),
        "--lr", "1e-3", "--eval-every", "1000")
    torch.manual_seed(0)
    init = Student.from_teacher(teacher_lib.load_teacher(env / "teacher")[0], "rwkv7").state_dict()
    after = Student.load(tmp_path / "step2" / "student").state_dict()
    moved = {k for k in init if not torch.equal(init[k], after[k])}
    trained = {k for k in init if ".time_mix." in k or "norm" in k}
    assert moved == trained, (sorted(moved - trained), sorted(trained - moved))


# ---------------------------------------------------------------- against independent references

def test_step2_matches_plain_pytorch(env, three_steps, tmp_path):
    """3 updates of step 2 under FSDP2 + activation checkpointing + chunked KL + accumulation equal
    a plain loop: full logits, F.kl_div, no FSDP, same batches and AdamW."""
    init = three_steps[0] / "step1" / "student"
    run(env, tmp_path, "--step", "2", "--init", str(init), "--tokens", str(3 * 4 * 32), "--lr", "1e-3",
        "--eval-every", "1000")
    teacher, student = teacher_lib.load_teacher(env / "teacher")[0], Student.load(init)
    batches = data_lib.Batches(data_lib.TokenData(env / "data"), 32, 4, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    ref = []
    for u in range(3):    # 3 updates: warmup min(50, 3 // 10) = 0, flat lr
        x, y = batches.get(u)
        total = 0
        for xm in x.split(2):   # micro-batches of 2, accumulated
            with torch.no_grad():
                logq = F.log_softmax(teacher(xm), -1)
            loss = F.kl_div(F.log_softmax(student(xm)[0], -1), logq, log_target=True, reduction="none").sum(-1).mean()
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ref.append(total)
    got = losses(tmp_path, 2)
    print("distill", got, "plain", ref)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one(env, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) == one process, same global batch: 5 updates of each step."""
    extra = ("--tokens", str(5 * 4 * 32), "--lr", "3e-3", "--eval-every", "1000")
    run(env, tmp_path / "one", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           str(HERE / "distill.py"), *flags(env, tmp_path / "two", *extra)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in (1, 2, 3):
        one, two = losses(tmp_path / "one", step), losses(tmp_path / "two", step)
        print(step, one, two)
        assert len(one) == 5 and two == pytest.approx(one, rel=1e-5, abs=1e-6)
        e1, e2 = evals(tmp_path / "one", step)[-1], evals(tmp_path / "two", step)[-1]
        assert e2["ppl_student"] == pytest.approx(e1["ppl_student"], rel=1e-5)


def test_deterministic_flag_changes_nothing_on_cpu(env, tmp_path):
    """--deterministic (for bit-exact GPU comparisons) runs and, on a CPU, gives the same losses."""
    base = ("--step", "1", "--tokens", str(3 * 4 * 32))
    run(env, tmp_path / "a", *base)
    try:
        run(env, tmp_path / "b", *base, "--deterministic")
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses(tmp_path / "b", 1) == losses(tmp_path / "a", 1)


def test_resume_is_bit_for_bit(env, tmp_path):
    """6 updates in one go == 3 updates, a stop (and the leftovers of a crash mid-save), --resume."""
    base = ("--step", "1", "--tokens", str(6 * 4 * 32), "--eval-every", "3")
    run(env, tmp_path / "a", *base)
    run(env, tmp_path / "b", *base, "--stop-at", "3")
    ck = tmp_path / "b" / "step1" / "ckpt"
    ck.rename(ck.with_suffix(".old"))                  # killed between save_ckpt's two renames ...
    ck.with_suffix(".tmp").mkdir()                     # ... after a half-written new checkpoint
    run(env, tmp_path / "b", *base, "--resume")
    assert losses(tmp_path / "b", 1) == losses(tmp_path / "a", 1)
    a, b = (Student.load(tmp_path / x / "step1" / "student").state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_triton_backend_trains_like_torch(env, tmp_path):
    """Step 2 with the Triton kernels (in Triton's interpreter, fp32) and with the torch path: the
    same losses, gradient norms and held-out KL over 3 updates, to 1e-5 (they agree to ~1e-7): the same
    math, so on a GPU only 16-bit rounding can set them apart."""
    pytest.importorskip("triton")
    teacher = tiny_hf_teacher(tmp_path / "teacher", hidden_size=64, head_dim=16)   # Triton needs N >= 16
    for backend in ("torch", "triton"):
        argv = flags(env, tmp_path / backend, "--step", "2", "--init", "teacher", "--backend", backend,
                     "--tokens", str(3 * 4 * 32), "--eval-every", "3", "--teacher", str(teacher))
        r = subprocess.run([sys.executable, str(HERE / "distill.py"), *argv], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    grad_norms = lambda out: [r["grad_norm"] for r in map(json.loads, (out / "step2" / "log.jsonl").open()) if "loss" in r]
    seen = {x: losses(tmp_path / x, 2) + grad_norms(tmp_path / x) + [e["kl"] for e in evals(tmp_path / x, 2)]
            for x in ("torch", "triton")}
    print(seen)
    assert len(seen["torch"]) == 3 + 3 + 2, seen     # losses, gradient norms, evals at start and end
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(seen["torch"], seen["triton"])), seen


# ---------------------------------------------------------------- bad input and faults: exit 2, one line

def test_missing_previous_step_cli(env, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "distill.py"), *flags(env, tmp_path, "--step", "2")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--step 1" in r.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_triton_backend_without_gpu(env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = fails(capsys, *flags(env, tmp_path, "--step", "1", "--backend", "triton"))
    assert "CUDA" in err and "--backend torch" in err


def test_shape_and_tokenizer_mismatch(env, three_steps, tmp_path, capsys):
    wide = tiny_hf_teacher(tmp_path / "wide", hidden_size=48)            # same tokenizer, other shape
    init = str(three_steps[0] / "step1" / "student")
    err = fails(capsys, *flags(env, tmp_path / "o", "--step", "2", "--init", init), "--teacher", str(wide))
    assert "hidden_size" in err and "--teacher" in err
    other = tiny_hf_teacher(tmp_path / "other", vocab=300)               # another tokenizer
    err = fails(capsys, *flags(env, tmp_path / "o", "--step", "1"), "--teacher", str(other))
    assert "tokenised by" in err


def test_nan_and_oom_stop_cleanly(env, tmp_path, capsys, monkeypatch):
    real, calls = distill.forward_backward, []

    def nan_at_update_4(*a):   # 2 micro-batches per update: calls 7, 8 are update 4 (0-based 3)
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(distill, "forward_backward", nan_at_update_4)
    err = fails(capsys, *flags(env, tmp_path, "--step", "1", "--tokens", str(6 * 4 * 32), "--eval-every", "2"))
    assert "nan at update 3 of step 1" in err and "--lr" in err
    assert json.loads((tmp_path / "step1" / "ckpt" / "meta.json").read_text())["step"] == 2   # still good
    assert len(losses(tmp_path, 1)) == 3

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(distill, "forward_backward", oom)
    err = fails(capsys, *flags(env, tmp_path / "o", "--step", "1"))
    assert "out of memory" in err and "--micro-batch" in err


# ---------------------------------------------------------------- the real default teacher

def test_default_teacher_step1_end_to_end(tmp_path, capsys):
    """SmolLM2-135M (the embedded GGUF) on two Shakespeare plays: 2 updates at ctx 64, sane eval."""
    tok = teacher_lib.load_tokenizer()
    data_lib.prepare(data_lib.default_corpus()[:2], tok, tmp_path / "data", val_fraction=0.3, progress=False)
    distill.main(["--step", "1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--ctx", "64",
                  "--batch", "2", "--tokens", "256", "--eval-windows", "4", "--eval-every", "1000"])
    out = capsys.readouterr().out
    e = evals(tmp_path / "out", 1)[-1]
    print(out, e)
    assert "teacher perplexity" in out
    start = evals(tmp_path / "out", 1)[0]
    assert 5 < e["ppl_teacher"] < 300 and math.isfinite(e["ppl_student"]) and 0 <= e["kl"] < 20
    assert len(e["align_loss_per_layer"]) == 30 and 0 < e["align_loss"] < start["align_loss"]
