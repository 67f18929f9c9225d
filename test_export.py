"""Tests of export.py: the exported folder loads with transformers (trust_remote_code) and agrees with
model.py and sample.py; the tokenizer round-trips; bad inputs fail with clear errors.

The independent side is transformers itself: AutoModelForCausalLM / AutoTokenizer / generate() and
its remote-code import check (dynamic_module_utils.get_imports) on the shipped files.

    python -m pytest -x -q test_export.py
"""
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.dynamic_module_utils import get_imports  # noqa: E402

import export  # noqa: E402
import sample  # noqa: E402
import teacher as teacher_lib  # noqa: E402
from conftest import make_hf_teacher, perturbed, rel_err  # noqa: E402
from export import ExportConfig, ExportError  # noqa: E402
from model import Student, StudentConfig  # noqa: E402

MIXED = "Hello, world! Café naïve 🙂 日本語 def f(x):\n\treturn x ** 2  # 12345 <|im_end|>"
ALLOWED = {"torch", "safetensors", "numpy", "transformers", "__future__"} | set(sys.stdlib_module_names)


def hf_load(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()


def greedy_both(hf_model, student, ids, n, eos_id):
    """(generate() greedy tokens up to EOS, sample.generate greedy tokens)."""
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos_id,
                            pad_token_id=eos_id)[0, len(ids):].tolist()
    out = out[:out.index(eos_id)] if eos_id in out else out
    new, _ = sample.generate(sample.StudentDecoder(student), torch.tensor([ids]),
                             sample.SampleConfig(max_new_tokens=n), eos_id)
    return out, new[0].tolist()


# ---------------------------------------------------------------- a tiny perturbed student

@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    return make_hf_teacher(tmp_path_factory.mktemp("teacher"), "llama")


@pytest.fixture(scope="module", params=["llama-rwkv7", "qwen3-rwkv6", "qwen2-rwkv7"])
def tiny(request, tmp_path_factory):
    """(student, tok, ckpt folder, export folder, transformers model) for a perturbed tiny student
    (qwen3: q/k norms and N != C/H; qwen2: q/k/v biases)."""
    arch, variant = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param)
    hf_teacher = make_hf_teacher(root, arch)
    teacher, tok = teacher_lib.load_teacher(hf_teacher)
    student = perturbed(Student.from_teacher(teacher, variant)).eval()
    student.save(root / "ckpt")
    out = export.export(ExportConfig(ckpt=str(root / "ckpt"), out=str(root / "hf"), teacher=str(hf_teacher)))
    return student, tok, root / "ckpt", out, hf_load(out)


def test_logits_and_state_equal_model_py(tiny):
    student, tok, _, _, hf = tiny
    ids = torch.tensor([tok.encode(MIXED)])
    with torch.no_grad():
        ref, _ = student(ids)
        got = hf(ids).logits
        first = hf(ids[:, :11])                                    # the state continues in HF too
        rest = hf(ids[:, 11:], state=first.state).logits
    print(f"{student.cfg.variant}: HF vs model.py logits rel err {rel_err(got, ref):.1e}")
    assert rel_err(got, ref) < 1e-6
    assert rel_err(rest, ref[:, 11:]) < 1e-5
    assert hf.model.cfg.to_dict() == student.cfg.to_dict()        # every field, none defaulted


def test_generate_equals_sample_py(tiny):
    student, tok, _, out, hf = tiny
    ids = tok.encode("The quick brown fox")
    got, ref = greedy_both(hf, student, ids, 12, tok.eos_id)
    assert got == ref and len(ref) > 0
    answers = sample.run(sample.SampleConfig(ckpt=str(out), prompt="The quick brown fox", max_new_tokens=12))
    assert answers["student"] == ref                # sample.py reads export folders too
    out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9,
                      temperature=0.8, pad_token_id=tok.eos_id)
    assert out.shape[1] <= len(ids) + 6 and out[0, :len(ids)].tolist() == ids


def test_tokenizer_round_trips(tiny):
    _, tok, _, out, _ = tiny
    auto = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert auto(MIXED, add_special_tokens=False).input_ids == tok.encode(MIXED)
    assert auto.decode(tok.encode(MIXED)) == tok.decode(tok.encode(MIXED))
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id, tok.eos_id)
    msgs = [{"role": "user", "content": "Hi!"}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.chat_prompt(msgs)


def test_shipped_code_needs_only_torch(tiny, tmp_path):
    """transformers' own import scan of every shipped file finds only allowed packages; a fresh
    process without the checkout on its path, with triton and gguf blocked, loads the folder and
    gets the same logits."""
    student, tok, _, out, _ = tiny
    shipped = sorted(out.glob("*.py"))
    assert {p.name for p in shipped} == {"modeling_radlads.py", "radlads_model.py", "radlads_kernels.py",
                                         "radlads_teacher.py"}
    for p in shipped:
        assert set(get_imports(p)) <= ALLOWED, (p.name, set(get_imports(p)) - ALLOWED)
    ids = tok.encode(MIXED)[:16]
    code = ("import sys, json, torch\n"
            "for m in ('triton', 'gguf', 'model', 'kernels', 'teacher'): sys.modules[m] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            f"print(json.dumps(m(torch.tensor([{ids}])).logits[0, -1].tolist()))\n")
    if (student.cfg.arch, student.cfg.variant) != ("llama", "rwkv7"):
        pytest.skip("the shipped files are the same for every teacher and variant: checked once")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        ref = student(torch.tensor([ids]))[0][0, -1]
    assert rel_err(got, ref) < 1e-6


def test_bf16_sharded_export(tiny, hf_teacher, tmp_path):
    student, tok, ckpt, _, _ = tiny
    out = export.export(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "hf"), dtype="bf16",
                                     max_shard_size="30KB", teacher=str(hf_teacher)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    hf = hf_load(out)
    ref_model = Student.load(ckpt, dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok.encode(MIXED)])
    with torch.no_grad():
        got, ref = hf(ids).logits, ref_model(ids)[0]
    assert hf.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 1e-6


def test_retie(tiny, hf_teacher, tmp_path):
    """--retie: one matrix serves as embedding and head, equal to the student's embedding."""
    student, tok, ckpt, _, _ = tiny
    out = export.export(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "hf"), retie=True,
                                     teacher=str(hf_teacher)))
    hf = hf_load(out)
    assert hf.model.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tied = Student.load(ckpt).eval()
    with torch.no_grad():
        tied.lm_head.weight.copy_(tied.embed_tokens.weight)
        ids = torch.tensor([tok.encode(MIXED)])
        assert rel_err(hf(ids).logits, tied(ids)[0]) < 1e-6
        assert rel_err(export.load_checkpoint(out)(ids)[0], tied(ids)[0]) < 1e-6


def test_shipped_files_are_our_files():
    """radlads_model.py and radlads_kernels.py are model.py and kernels.py line for line, except the
    project imports, which become relative (`from kernels import` -> `from .radlads_kernels import`)."""
    files = export.remote_code()
    for name in ("model", "kernels"):
        ours = (Path(export.__file__).parent / f"{name}.py").read_text().splitlines()
        shipped = files[f"radlads_{name}.py"].splitlines()[1:]          # after the "Copied by" line
        assert len(shipped) == len(ours)
        changed = [(a, b) for a, b in zip(ours, shipped) if a != b]
        for a, b in changed:
            indent, words = a[:len(a) - len(a.lstrip())], a.split()
            assert words[:3] in (["from", "kernels", "import"], ["from", "teacher", "import"]), a
            assert b == f"{indent}from .radlads_{words[1]} " + a.lstrip().split(" ", 2)[2], (a, b)
        assert name == "kernels" or changed


def test_remote_code_errors(tmp_path, monkeypatch):
    """A project import export.py cannot make relative, or a teacher.py name model.py uses that is
    not shipped, fails the export with a one-line error."""
    monkeypatch.setattr(export, "TEACHER_PIECES", tuple(n for n in export.TEACHER_PIECES if n != "MLP"))
    with pytest.raises(ExportError, match=r"model.py uses \['MLP'\] from teacher.py"):
        export.remote_code()
    monkeypatch.undo()
    (tmp_path / "model.py").write_text("import torch\nimport kernels\n")
    monkeypatch.setattr(export, "REPO", tmp_path)
    with pytest.raises(ExportError, match="write `from kernels import ...` rather than `import kernels`"):
        export.relative_imports("model")


# ---------------------------------------------------------------- bad inputs

def test_unknown_variant(tiny, tmp_path):
    _, _, ckpt, out, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text()) | {"variant": "rwkv9"}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="unknown student variant 'rwkv9'"):
        export.export(ExportConfig(ckpt=str(bad), out=str(tmp_path / "o")))
    with pytest.raises(ExportError, match="config.json is missing"):
        export.export(ExportConfig(ckpt=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))


def test_damaged_safetensors(tiny, tmp_path):
    _, _, ckpt, _, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])     # truncated
    with pytest.raises(ExportError, match="damaged"):
        export.export(ExportConfig(ckpt=str(bad), out=str(tmp_path / "o")))


def test_existing_out_needs_force(tiny, hf_teacher, tmp_path, capsys):
    _, _, ckpt, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--ckpt", str(ckpt), "--out", str(out), "--teacher", str(hf_teacher)]
    with pytest.raises(SystemExit) as e:
        export.main(args)
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export.main(args + ["--force"])
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "keep me"


def test_config_without_a_field_fails_to_load(tiny, hf_teacher, tmp_path):
    """A config.json lacking a StudentConfig field is an error, not a silent default."""
    _, _, ckpt, _, _ = tiny
    out = export.export(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "hf"), teacher=str(hf_teacher)))
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg["student"]) == set(StudentConfig.__dataclass_fields__)
    del cfg["student"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_theta"):
        hf_load(out)


# ---------------------------------------------------------------- the default teacher's student

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The default teacher's rwkv7 student at init, exported and loaded back (once per module)."""
    try:
        teacher, tok = teacher_lib.load_teacher()
    except teacher_lib.TeacherNotFoundError as e:
        pytest.skip(str(e))
    student = Student.from_teacher(teacher, "rwkv7").eval()
    del teacher
    root = tmp_path_factory.mktemp("smol")
    student.save(root / "ckpt")
    out = export.export(ExportConfig(ckpt=str(root / "ckpt"), out=str(root / "hf")))
    return student, tok, out, hf_load(out)


def test_default_teacher_student(smol):
    student, tok, out, hf = smol
    ids = tok.encode(MIXED)
    with torch.no_grad():
        got, ref = hf(torch.tensor([ids])).logits, student(torch.tensor([ids]))[0]
    print(f"SmolLM2 rwkv7 student: HF vs model.py logits rel err {rel_err(got, ref):.1e}")
    assert rel_err(got, ref) < 1e-6
    prompt = tok.encode(tok.chat_prompt([{"role": "user", "content": "What is 2+2?"}]))
    got, want = greedy_both(hf, student, prompt, 6, tok.eos_id)
    assert got == want
    auto = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert auto(MIXED, add_special_tokens=False).input_ids == tok.encode(MIXED)
    assert auto(MIXED).input_ids == tok.encode(MIXED)                       # SmolLM2 adds no BOS
    msgs = [{"role": "user", "content": "Hi!"}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.chat_prompt(msgs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["student"]["rope_theta"] == 100000.0 and cfg["student"]["rope"] is True
    assert (cfg["student"]["rank_decay"], cfg["student"]["rank_value"], cfg["student"]["rank_gate"]) == (32, 32, 96)
