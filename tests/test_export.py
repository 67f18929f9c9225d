"""export.py's plumbing: the shipped remote code is model.py and kernels.py as they are (imports made
relative) and fails clearly when it cannot be; bad inputs: an unknown variant, a damaged
checkpoint, an existing output folder, a config.json lacking a field. (The exported folder against
model.py and sample.py, loaded by transformers: test_equivalence.py §8.)

    python -m pytest -x -q tests/test_export.py
"""
import json
from pathlib import Path

import pytest

import export
import teacher as teacher_lib
from conftest import perturbed
from export import ExportConfig, ExportError
from model import Student, StudentConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tiny_hf_llama, tmp_path_factory):
    """A perturbed RAD-RWKV7 student of the tiny llama teacher, saved by Student.save."""
    teacher, _ = teacher_lib.load_teacher(tiny_hf_llama)
    folder = tmp_path_factory.mktemp("export") / "ckpt"
    perturbed(Student.from_teacher(teacher, "rwkv7")).save(folder)
    return folder


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

def test_unknown_variant(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text()) | {"variant": "rwkv9"}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="unknown student variant 'rwkv9'"):
        export.export(ExportConfig(ckpt=str(bad), out=str(tmp_path / "o")))
    with pytest.raises(ExportError, match="config.json is missing"):
        export.export(ExportConfig(ckpt=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))


def test_damaged_safetensors(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])     # truncated
    with pytest.raises(ExportError, match="damaged"):
        export.export(ExportConfig(ckpt=str(bad), out=str(tmp_path / "o")))


def test_existing_out_needs_force(ckpt, tiny_hf_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--ckpt", str(ckpt), "--out", str(out), "--teacher", str(tiny_hf_llama)]
    with pytest.raises(SystemExit) as e:
        export.main(args)
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export.main(args + ["--force"])
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "keep me"


def test_config_without_a_field_fails_to_load(ckpt, tiny_hf_llama, tmp_path):
    """A config.json lacking a StudentConfig field is an error, not a silent default."""
    out = export.export(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "hf"), teacher=str(tiny_hf_llama)))
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg["student"]) == set(StudentConfig.__dataclass_fields__)
    del cfg["student"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_theta"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
