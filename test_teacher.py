"""Tests for teacher.py against transformers (the independent reference), CPU only.

    python -m pytest -x -q test_teacher.py        # add -s to see the measured differences

1. tiny random llama / mistral / qwen2 / qwen3 teachers saved by transformers (tied, untied,
   sharded, llama3 RoPE scaling): our logits == transformers' logits (fp32);
2. the same weights as GGUF files written with llama.cpp's conventions: same logits, same tokens;
3. the real embedded SmolLM2-135M-Instruct Q4_1 GGUF vs transformers' own GGUF loader: logits,
   a 32-token greedy continuation, token ids on mixed text, the chat prompt;
4. every bad input gives one clear TeacherError, and the CLI exits 2 without a traceback.
"""
import json
import sys

import pytest
import torch

from conftest import LLAMA3_ROPE, make_gguf_teacher, make_hf_teacher, tiny_teacher_config
from teacher import (SUPPORTED_ARCHS, Teacher, TeacherError, TeacherNotFoundError, default_teacher_path,
                     generate_greedy, load_teacher, load_tokenizer, read_teacher)

transformers = pytest.importorskip("transformers")

MIXED = ("Hello, world! The year 2024 was 12.5% better than 1999.\n\n\tdef f(x):\n        return x ** 2"
         "  # squared\nCafé naïve façade — über Ångström, señor. 😀🚀 日本語 Привет\r\n  two  spaces   "
         "<|im_start|>user\nhi<|im_end|>\n")
CASES = [("llama", dict(tie=True)), ("llama", dict(shard=True)), ("llama", dict(rope_scaling=LLAMA3_ROPE)),
         ("mistral", {}), ("qwen2", dict(tie=True)), ("qwen2", dict(shard=True)), ("qwen3", {}),
         ("qwen3", dict(tie=True, shard=True))]


def case_id(case):
    arch, kw = case
    return "-".join([arch] + [k if v is True else "llama3rope" for k, v in kw.items()])


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(params=CASES, ids=case_id)
def hf_case(request, tmp_path):
    arch, kw = request.param
    folder = make_hf_teacher(tmp_path, arch, **kw)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return folder, ref, ids, ref(ids).logits


# --------------------------------------------------------------------- tiny HF folders and GGUFs

def test_hf_folder_matches_transformers(hf_case):
    folder, ref, ids, ref_logits = hf_case
    model, tok = load_teacher(folder)
    with torch.no_grad():
        d = max_diff(model(ids), ref_logits)
    print(f"{folder.name}: max |logit diff| {d:.2e}")
    assert d < 1e-4
    assert model.cfg.tie_embeddings == ref.config.tie_word_embeddings
    assert (model.lm_head.weight is model.embed_tokens.weight) == model.cfg.tie_embeddings
    # tokenizer and chat template from the folder behave like transformers' own
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.encode(MIXED) == ref_tok(MIXED, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(MIXED)) == MIXED
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    for gen in (True, False):
        assert tok.chat_prompt(msgs, gen) == ref_tok.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=gen)
    assert (tok.bos_id, tok.eos_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)


def test_gguf_file_matches_transformers(hf_case, tmp_path):
    folder, ref, ids, ref_logits = hf_case
    path = make_gguf_teacher(folder, tmp_path / "tiny.gguf")
    model, tok = load_teacher(path)
    with torch.no_grad():
        d = max_diff(model(ids), ref_logits)
    print(f"{folder.name} as GGUF: max |logit diff| {d:.2e}")
    assert d < 1e-4
    assert tok.encode(MIXED) == transformers.AutoTokenizer.from_pretrained(folder)(MIXED).input_ids
    assert load_tokenizer(path).fingerprint == tok.fingerprint != load_tokenizer(folder).fingerprint  # [PADi]
    assert tok.chat_prompt([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_load_bf16(tmp_path):
    folder = make_hf_teacher(tmp_path, "qwen2", tie=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, _ = load_teacher(folder, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.embed_tokens.weight
    assert model.inv_freq.dtype == torch.float32   # RoPE frequencies stay fp32
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours, theirs = model(ids).float(), ref(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 3e-2


def test_llama3_rope_scaling_matters(tmp_path):
    """The llama3 case above can fail: the same weights without the scaling give other logits."""
    folder = make_hf_teacher(tmp_path, "llama", rope_scaling=LLAMA3_ROPE)
    cfg, sd, _ = read_teacher(folder)
    assert cfg.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 300, (1, 40))
    scaled, plain = Teacher(cfg), Teacher(tiny_teacher_config("llama", rope_scaling=None))
    scaled.load_state_dict(sd)
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert max_diff(scaled(ids), plain(ids)) > 1e-3


def test_taps_match_transformers_attention(tmp_path):
    """Teacher.hidden taps = per layer (attention input, attention output), read from transformers'
    self_attn modules with forward hooks."""
    folder = make_hf_teacher(tmp_path, "qwen3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    seen = []
    for layer in ref.model.layers:
        layer.self_attn.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append((kwargs["hidden_states"], out[0])), with_kwargs=True)
    model, _ = load_teacher(folder)
    ids = torch.randint(0, 300, (2, 11))
    taps = []
    with torch.no_grad():
        ref(ids)
        h = model.hidden(ids, taps)
    assert len(taps) == len(seen) == 2 and h.shape == (2, 11, 64)
    for (x, y), (rx, ry) in zip(taps, seen):
        assert max_diff(x, rx) < 1e-5 and max_diff(y, ry) < 1e-5


# --------------------------------------------------------------------- the real default teacher

@pytest.fixture(scope="module")
def real():
    """Ours and transformers' loading of the embedded SmolLM2-135M-Instruct Q4_1 GGUF (slow: once)."""
    path = default_teacher_path()
    model, tok = load_teacher()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok, ref, ref_tok


def test_real_config_and_tokens(real):
    model, tok, ref, ref_tok = real
    c = model.cfg
    assert (c.arch, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size,
            c.vocab_size, c.rope_theta, c.tie_embeddings) == ("llama", 30, 576, 9, 3, 64, 1536, 49152, 1e5, True)
    assert abs(c.rms_eps - 1e-5) < 1e-9
    assert (tok.name, tok.bos_id, tok.eos_id, tok.vocab_size) == ("SmolLM2-135M-Instruct", 1, 2, 49152)
    assert tok.encode(MIXED) == ref_tok(MIXED, add_special_tokens=False).input_ids
    assert tok.encode_batch([MIXED, "a b"]) == [tok.encode(MIXED), tok.encode("a b")]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert len(tok.fingerprint) == 64
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.chat_prompt(msgs) == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_real_logits_and_greedy(real):
    """transformers generates 32 greedy tokens (with its KV cache); one forward of ours over prompt +
    continuation must give the same argmax at every step, i.e. the same greedy continuation."""
    model, tok, ref, ref_tok = real
    prompt = tok.encode("The capital of France is")
    seq = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_id,
                       pad_token_id=tok.eos_id)
    with torch.no_grad():
        ours, theirs = model(seq), ref(seq).logits
    d = max_diff(ours, theirs)
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF vs transformers, {seq.shape[1]} tokens: max |logit diff| {d:.2e}")
    print("greedy:", repr(tok.decode(seq[0, len(prompt):])))
    assert d < 1e-3
    assert seq.shape[1] - len(prompt) >= 16
    assert ours[0, len(prompt) - 1:-1].argmax(-1).tolist() == seq[0, len(prompt):].tolist()
    assert "Paris" in tok.decode(seq[0, len(prompt):])


def test_generate_greedy_matches_transformers(tmp_path):
    folder = make_hf_teacher(tmp_path, "llama", tie=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, tok = load_teacher(folder)
    prompt = tok.encode("The quick brown fox")
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    assert generate_greedy(model, prompt, 12) == theirs
    # stopping: with eos_id = the 5th token, generation ends before it
    assert generate_greedy(model, prompt, 12, eos_id=theirs[4]) == theirs[:theirs.index(theirs[4])]


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
