"""Tests of evaluate.py: held-out student-vs-teacher numbers on token folders.

A tiny random llama teacher (conftest.tiny_hf_teacher) and a perturbed RAD-RWKV7 student of it.
References are independent of evaluate.py and of distill.head_loss: full (B, T, V) logits of each
model's plain forward → fp64 log_softmax → F.cross_entropy / F.kl_div / argmax for the windows,
and teacher.generate_greedy (no KV cache, one sequence at a time; the student through its own
forward) + one teacher forward per continuation for the continuation numbers. ~15 s on 2 cores.

    python -m pytest -x -q tests/test_evaluate.py
"""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data as data_lib
import evaluate
import export
import teacher as teacher_lib
from conftest import ROOT, TRAIN_TEXT, perturbed, tiny_hf_teacher
from model import Student

CTX, WINDOWS, BATCH, PROMPTS, PROMPT_LEN, NEW = 32, 6, 4, 5, 8, 6     # 6 windows, 5 prompts: a partial batch each


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    """Teacher folder, token folder (4 documents, one held out), perturbed and unperturbed students."""
    root = tmp_path_factory.mktemp("evaluate")
    tiny_hf_teacher(root / "teacher")
    teacher, tok = teacher_lib.load_teacher(root / "teacher")
    docs = []
    for i in range(4):
        docs.append(root / f"doc{i}.txt")
        docs[-1].write_text(TRAIN_TEXT[i * len(TRAIN_TEXT) // 4:(i + 1) * len(TRAIN_TEXT) // 4])
    data_lib.prepare(docs, tok, root / "data", val_fraction=0.25, progress=False)
    Student.from_teacher(teacher, "rwkv7").save(root / "init")
    perturbed(Student.from_teacher(teacher, "rwkv7"), seed=1, std=0.02).save(root / "student")
    return root


def flags(eval_env, student="student", *extra):
    return ["--student", str(eval_env / student), "--teacher", str(eval_env / "teacher"), "--data", str(eval_env / "data"),
            "--ctx", str(CTX), "--windows", str(WINDOWS), "--batch", str(BATCH), "--prompts", str(PROMPTS),
            "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW), *extra]


@pytest.fixture(scope="module")
def result(eval_env):
    return evaluate.main(flags(eval_env, "student", "--json", str(eval_env / "eval.json")))


@pytest.fixture(scope="module")
def models(eval_env):
    teacher, _ = teacher_lib.load_teacher(eval_env / "teacher")
    return Student.load(eval_env / "student").eval(), teacher


def val_tokens(eval_env):
    meta = json.loads((eval_env / "data" / "meta.json").read_text())
    return np.fromfile(eval_env / "data" / "val.bin", dtype=meta["dtype"])


def rel(a, b):
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- the numbers against references

def test_window_numbers_match_full_logit_reference(eval_env, result, models):
    """ppl of both models, ratio, KL(T‖S), top-1 agreement == full-logit fp64 formulas on the same windows."""
    student, teacher = models
    toks = torch.from_numpy(val_tokens(eval_env).astype(np.int64))
    w = torch.stack([toks[i * CTX:i * CTX + CTX + 1] for i in range(WINDOWS)])          # (6, ctx+1)
    x, y = w[:, :-1], w[:, 1:].flatten()
    with torch.no_grad():
        logp = F.log_softmax(student(x)[0].double(), -1).flatten(0, 1)
        logq = F.log_softmax(teacher(x).double(), -1).flatten(0, 1)
    ref = {"ppl_student": math.exp(F.cross_entropy(logp, y).item()),
           "ppl_teacher": math.exp(F.cross_entropy(logq, y).item()),
           "kl": (logq.exp() * (logq - logp)).sum(-1).mean().item(),
           "top1_agree": (logp.argmax(-1) == logq.argmax(-1)).double().mean().item()}
    ref["ppl_ratio"] = ref["ppl_student"] / ref["ppl_teacher"]
    got = result["sets"]["data"]
    print({k: (got[k], v) for k, v in ref.items()})
    assert got["eval_tokens"] == WINDOWS * CTX
    for k, v in ref.items():
        assert rel(got[k], v) < 1e-5 if k != "top1_agree" else got[k] == v, k
    assert got["kl"] > 0.01 and 0 < got["top1_agree"] < 1          # a student that differs, not a trivial case


def greedy_reference(eval_env, decoder_model, teacher):
    """Per prompt: the greedy continuation by decoder_model (teacher.generate_greedy, no cache), the
    teacher's summed NLL of it from one plain forward over prompt + continuation."""
    toks, stride = val_tokens(eval_env).astype(np.int64), len(val_tokens(eval_env)) // PROMPTS
    conts, nll = [], 0.0
    for i in range(PROMPTS):
        prompt = toks[i * stride:i * stride + PROMPT_LEN].tolist()
        new = teacher_lib.generate_greedy(decoder_model, prompt, NEW)
        with torch.no_grad():
            logq = F.log_softmax(teacher(torch.tensor([prompt + new]))[0].double(), -1)
        nll -= sum(logq[PROMPT_LEN - 1 + j, t].item() for j, t in enumerate(new))
        conts.append(new)
    return conts, math.exp(nll / (PROMPTS * NEW))


def test_continuations_match_generate_greedy_loop(eval_env, result, models):
    """cont_ppl_teacher / cont_ppl_student / cont_prefix_match == an explicit one-sequence greedy loop."""
    student, teacher = models
    t_conts, t_ppl = greedy_reference(eval_env, teacher, teacher)
    s_conts, s_ppl = greedy_reference(eval_env, student, teacher)
    match = sum(next((j for j, (a, b) in enumerate(zip(s, t)) if a != b), NEW) for s, t in zip(s_conts, t_conts))
    got = result["sets"]["data"]
    print(got, t_ppl, s_ppl, match)
    assert rel(got["cont_ppl_teacher"], t_ppl) < 1e-5
    assert rel(got["cont_ppl_student"], s_ppl) < 1e-5
    assert got["cont_prefix_match"] == match / (PROMPTS * NEW)


def test_prefix_match_stops_at_the_first_divergence():
    """Tokens that agree again after a divergence do not count."""
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 2, 3, 4]])
    b = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    assert evaluate.prefix_match(a, b).tolist() == [2, 4, 0]


def test_json_and_table(eval_env, result, capsys):
    """--json holds what main() returns; the table names every number."""
    assert json.loads((eval_env / "eval.json").read_text()) == result
    assert result["student"] == str(eval_env / "student") and result["ctx"] == CTX and list(result["sets"]) == ["data"]
    m = result["sets"]["data"]
    assert set(m) >= {"ppl_student", "ppl_teacher", "ppl_ratio", "kl", "top1_agree", "eval_tokens",
                      "cont_ppl_student", "cont_ppl_teacher", "cont_prefix_match"}
    assert m["kl"] >= 0 and 0 <= m["top1_agree"] <= 1 and 0 <= m["cont_prefix_match"] <= 1
    r = evaluate.main(flags(eval_env, "student", "--windows", "2", "--prompts", "1"))   # fresh output to read
    out = capsys.readouterr().out
    for _, label, _ in evaluate.ROWS:
        assert label in out
    assert r["sets"]["data"]["eval_tokens"] == 2 * CTX


def test_other_student_other_numbers_same_teacher(eval_env, result):
    """The unperturbed teacher-initialised student gives other student numbers, the same teacher ones."""
    a, b = result["sets"]["data"], evaluate.main(flags(eval_env, "init"))["sets"]["data"]
    print(a, b)
    assert a["ppl_teacher"] == b["ppl_teacher"] and a["cont_ppl_teacher"] == b["cont_ppl_teacher"]
    assert a["ppl_student"] != b["ppl_student"] and a["kl"] != b["kl"]
    assert a["cont_ppl_student"] != b["cont_ppl_student"]


def test_export_folder_gives_the_same_numbers(eval_env, result):
    """An export.py folder (with the teacher's tokenizer.json beside it) reads as the Student.save one."""
    export.export(export.ExportConfig(ckpt=str(eval_env / "student"), out=str(eval_env / "hf"),
                                      teacher=str(eval_env / "teacher")))
    got = evaluate.main(flags(eval_env, "hf"))["sets"]["data"]
    assert {k: v for k, v in got.items() if k != "seconds"} == {
        k: v for k, v in result["sets"]["data"].items() if k != "seconds"}


def test_bf16_close_to_fp32(eval_env, result):
    """--dtype bf16 (weights only; the losses stay fp32) lands near the fp32 numbers."""
    a, b = result["sets"]["data"], evaluate.main(flags(eval_env, "student", "--dtype", "bf16"))["sets"]["data"]
    print(a, b)
    for k in ("ppl_student", "ppl_teacher", "kl"):
        assert rel(b[k], a[k]) < 0.05, k


# ---------------------------------------------------------------- errors: one line, exit 2

def error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_errors_name_what_to_lower(eval_env, tmp_path, capsys):
    n = len(val_tokens(eval_env))
    assert f"lower --ctx to {n - 1}" in error_line(capsys, flags(eval_env, "student", "--ctx", str(n)))
    err = error_line(capsys, flags(eval_env, "student", "--windows", str(n)))
    assert "lower --windows" in err and str(n) in err
    assert "lower --prompts" in error_line(capsys, flags(eval_env, "student", "--prompts", str(n)))
    assert "--student" in error_line(capsys, flags(eval_env, "nowhere"))
    tok = teacher_lib.load_tokenizer(eval_env / "teacher")
    data_lib.prepare([eval_env / "doc0.txt"], tok, tmp_path / "noval", val_fraction=0, progress=False)
    assert "no val split" in error_line(capsys, flags(eval_env) + ["--data", str(tmp_path / "noval")])


def test_bad_flags_fail_before_loading(eval_env, tmp_path, capsys):
    """--json that cannot be written, a --device that does not exist here, a student whose weights
    hold NaN: one line each, the first two before any model loads (here: before a missing teacher
    would be noticed)."""
    (tmp_path / "f").write_text("x")
    no_teacher = ["--teacher", str(tmp_path / "missing")]
    cases = [(["--json", str(tmp_path)], "is a folder"),
             (["--json", str(tmp_path / "nowhere" / "e.json")], "does not exist"),
             (["--json", str(tmp_path / "f" / "e.json")], "is a file, not a folder"),
             (["--device", "gpu0"], "is not a torch device"),
             (["--device", "cuda:7"], "no such CUDA device")]
    for extra, msg in cases:
        assert msg in error_line(capsys, flags(eval_env) + no_teacher + extra), extra
    shutil.copytree(eval_env / "student", tmp_path / "nan")
    sd = load_file(tmp_path / "nan" / "model.safetensors")
    sd["norm.weight"][0] = float("nan")
    save_file(sd, tmp_path / "nan" / "model.safetensors")
    err = error_line(capsys, flags(eval_env) + ["--student", str(tmp_path / "nan")])
    assert "weight norm.weight holds 1 NaN or inf" in err


def test_vocab_mismatch_is_an_error(eval_env, tmp_path, capsys):
    tiny_hf_teacher(tmp_path / "other", vocab=300)
    err = error_line(capsys, flags(eval_env) + ["--teacher", str(tmp_path / "other")])
    assert "vocabulary" in err and "--teacher" in err


@pytest.mark.parametrize("argv, message", [
    ([], "--student and --data are required (or --tasks"), (["--student", "s"], "--student and --data are required"),
    (["--tasks", "piqa", "--data", "d"], "separate runs: pass one")])
def test_flags_that_do_not_go_together(argv, message, capsys):
    """--data needs --student; --tasks (the benchmark suite) is a run of its own, --student optional."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_student(eval_env):
    """The command line itself: exit 2, one line."""
    p = subprocess.run([sys.executable, "evaluate.py", *flags(eval_env, "nowhere")], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --student") and p.stdout == "", p.stderr
