"""export.py's plumbing: the shipped remote code is model.py and kernels.py as they are (imports made
relative) and fails clearly when it cannot be; bad inputs: an unknown variant, a damaged
checkpoint, weights holding NaN or inf, a config.json that is not UTF-8 JSON or lacks a field, an
output folder that exists or cannot be one; a failed export leaves the previous one as it was. (The
exported folder against model.py and sample.py, loaded by transformers: test_equivalence.py §8.)

    python -m pytest -x -q tests/test_export.py
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import export
import model as model_lib
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
    # torch.compile leaves globals such as __import_teacher in model.py's module: not model.py's own use
    monkeypatch.setattr(model_lib, "__import_teacher", teacher_lib, raising=False)
    assert "def apply_rope" in export.remote_code()["radlads_teacher.py"]
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


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_config_and_out_are_one_line_errors(tmp_path, capsys):
    """config.json not UTF-8 or not an object; --out a file or under a file, refused before the
    checkpoint is read (a missing --ckpt would be the other error)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for config, msg in [(b"\xff\xfe{}", "UnicodeDecodeError"), (b"[1, 2]", "a JSON list, not an object")]:
        (bad / "config.json").write_bytes(config)
        assert msg in error_line(capsys, ["--ckpt", str(bad), "--out", str(tmp_path / "o")])
    (tmp_path / "f").write_text("x")
    for out, msg in [(tmp_path / "f", "is a file; pass a folder path"),
                     (tmp_path / "f" / "o", "is a file, not a folder")]:
        assert msg in error_line(capsys, ["--ckpt", str(tmp_path / "nowhere"), "--out", str(out)])


@pytest.mark.parametrize("exported", [False, True])
def test_non_finite_weights_are_refused(ckpt, tiny_hf_llama, tmp_path, capsys, exported):
    """A NaN or an inf in one weight (a Student.save folder, an export.py folder) is refused with a
    line naming the tensor, by export and by load_checkpoint (what evaluate.py and sample.py read)."""
    src = tmp_path / "src"
    if exported:
        export.export(ExportConfig(ckpt=str(ckpt), out=str(src), teacher=str(tiny_hf_llama)))
    else:
        shutil.copytree(ckpt, src)
    key = ("model." if exported else "") + "layers.1.mlp.up_proj.weight"
    sd = load_file(src / "model.safetensors")
    sd[key][3, 5] = float("inf") if exported else float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    err = error_line(capsys, ["--ckpt", str(src), "--out", str(tmp_path / "o"), "--teacher", str(tiny_hf_llama)])
    assert "weight layers.1.mlp.up_proj.weight holds 1 NaN or inf value" in err and not (tmp_path / "o").exists()
    with pytest.raises(ExportError, match="layers.1.mlp.up_proj.weight"):
        export.load_checkpoint(src)


def test_failed_export_leaves_the_previous_one(ckpt, tiny_hf_llama, tmp_path, monkeypatch):
    """--force over an earlier sharded export, killed while writing the weights: the earlier folder
    is byte for byte as it was, with no staging folder left; finished, the stale shards are gone."""
    out = tmp_path / "hf"
    export.export(ExportConfig(ckpt=str(ckpt), out=str(out), teacher=str(tiny_hf_llama), max_shard_size="100KB"))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert "model.safetensors.index.json" in before

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export(ExportConfig(ckpt=str(ckpt), out=str(out), teacher=str(tiny_hf_llama), force=True))
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not list(tmp_path.glob(".*"))
    export.export(ExportConfig(ckpt=str(ckpt), out=str(out), teacher=str(tiny_hf_llama), force=True))
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert torch.equal(export.load_checkpoint(out).lm_head.weight, export.load_checkpoint(ckpt).lm_head.weight)


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
