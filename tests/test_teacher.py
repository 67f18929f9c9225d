"""teacher.py's bad inputs: every one gives one clear TeacherError, and the CLI exits 2 without a
traceback. (teacher.py ≡ transformers is test_equivalence.py §1.)

    python -m pytest -x -q tests/test_teacher.py
"""
import json
import sys

import pytest

from conftest import make_gguf_teacher, make_hf_teacher
from teacher import SUPPORTED_ARCHS, TeacherError, TeacherNotFoundError, load_teacher, load_tokenizer, read_teacher

pytest.importorskip("transformers")   # make_hf_teacher writes its folders with transformers


# --------------------------------------------------------------------- clear errors

def test_error_missing_path(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="does not exist; pass a Hugging Face model folder"):
        load_teacher(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):   # also a FileNotFoundError for callers that catch that
        load_tokenizer(tmp_path / "nope.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(TeacherError, match="neither a folder nor a .gguf"):
        load_teacher(tmp_path / "w.bin")


def test_error_folder_contents(tmp_path):
    folder = make_hf_teacher(tmp_path, "llama")
    with pytest.raises(TeacherError, match="has no config.json"):
        load_teacher(tmp_path)
    (folder / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(TeacherError, match="has no tokenizer.json; save a fast tokenizer"):
        load_teacher(folder)
    (tmp_path / "tokenizer.json").rename(folder / "tokenizer.json")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])   # truncated
    with pytest.raises(TeacherError, match="model.safetensors .*corrupt or truncated"):
        load_teacher(folder)
    (folder / "model.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00garbage garbage")
    with pytest.raises(TeacherError, match="corrupt or truncated"):
        load_teacher(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(TeacherError, match=r"has no \*.safetensors weights"):
        load_teacher(folder)


def test_error_missing_shard_and_mismatch(tmp_path):
    folder = make_hf_teacher(tmp_path, "qwen2", shard=True)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(TeacherError, match="missing, corrupt or truncated"):
        read_teacher(folder)
    folder = make_hf_teacher(tmp_path / "b", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(TeacherError, match=r"do not fit its config: missing \['layers.2"):
        read_teacher(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(TeacherError, match="RoPE scaling .* not supported"):
        read_teacher(folder)


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_error_unsupported_arch(tmp_path, arch):
    folder = make_hf_teacher(tmp_path, "llama")
    gguf_path = make_gguf_teacher(folder, tmp_path / "m.gguf", **{"general.architecture": arch})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type=arch)))
    supported = ", ".join(SUPPORTED_ARCHS)
    for path in (folder, gguf_path):
        with pytest.raises(TeacherError, match=f"architecture '{arch}' is not supported; supported: {supported}"):
            load_teacher(path)


def test_error_bad_gguf(tmp_path):
    path = make_gguf_teacher(make_hf_teacher(tmp_path, "qwen3"), tmp_path / "m.gguf")
    data = path.read_bytes()
    for name, content in [("trunc.gguf", data[: len(data) * 2 // 3]), ("junk.gguf", b"GGUF" + bytes(100)),
                          ("notgguf.gguf", b"hello world" * 10)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TeacherError, match="corrupt or truncated: download it again"):
            load_teacher(tmp_path / name)
    sp = make_gguf_teacher(tmp_path / "hf_qwen3", tmp_path / "sp.gguf", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(TeacherError, match="GGUF tokenizer 'llama' .* not supported"):
        load_tokenizer(sp)


def test_cli(tmp_path, monkeypatch, capsys):
    import teacher
    folder = make_hf_teacher(tmp_path, "qwen2")
    monkeypatch.setattr(sys, "argv", ["teacher.py", "--teacher", str(folder), "--chat", "--prompt", "Hi",
                                      "--max-new-tokens", "4"])
    teacher.main()
    assert capsys.readouterr().out.strip()
    monkeypatch.setattr(sys, "argv", ["teacher.py", "--teacher", str(tmp_path / "missing"), "--prompt", "Hi"])
    with pytest.raises(SystemExit) as exit_:
        teacher.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: teacher path") and err.count("\n") == 1
    # bad flags are refused before the teacher loads (here: before a missing one is noticed)
    for flags, msg in [(["--prompt", ""], "--prompt is empty"),
                       (["--prompt", "Hi", "--max-new-tokens", "0"], "0 must be a whole number")]:
        with pytest.raises(SystemExit) as exit_:
            teacher.main(["--teacher", str(tmp_path / "missing"), *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and msg in err.splitlines()[-1], err
