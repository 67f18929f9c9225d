"""Shared test builders and the expensive fixtures built once per test run, for test_equivalence.py and tests/.

Builders (plain functions, imported by name):
- `tiny_teacher_config(arch)`: a TeacherConfig for a tiny plain-torch Teacher (random init).
- `make_hf_teacher(tmp_path, arch, tie=..., shard=..., rope_scaling=...)`: a tiny random
  transformers model (+ a tiny byte-level BPE tokenizer with a ChatML template) written with
  transformers' own save_pretrained; returns the folder. Reference logits: load it back with
  transformers.AutoModelForCausalLM.from_pretrained(folder).
- `make_gguf_teacher(hf_folder, path, arch=None, **meta)`: the same weights written as a GGUF file
  the way llama.cpp's convert_hf_to_gguf.py writes them (q/k rows permuted for llama, llama3
  RoPE scaling as rope_freqs.weight, tied head omitted); `meta` overrides metadata keys.
- `fp64_teacher(arch)` / `fp64_student(variant, arch)`: tiny fp64 plain-torch teachers (GQA; qwen2
  biases; qwen3 q/k norms) and students made from them, time-mix parameters moved off their init.
- `tiny_hf_teacher(folder)`: a tiny llama teacher folder written without transformers, with
  attention that matters and a peaked head (a student has much to learn): the distill tests' teacher.
- `distill_flags`, `distill_run`, `logged_losses`, `logged_evals`: run distill.py in-process, read its log.
- `rel_err`, `perturbed`.

Run-wide fixtures (each built once per run, whichever file asks first): `tiny_hf_llama` (a
make_hf_teacher folder, read only), `distill_env` (tiny_hf_teacher + token files), `three_steps`
(distill.py steps 1, 2, 3 on it), `default_teacher` and `default_students` (the embedded SmolLM2).

    python -m pytest -q                      # test_equivalence.py and tests/
"""
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data as data_lib
import distill
import teacher as teacher_lib
from model import Student
from teacher import Teacher, TeacherConfig

ROOT = Path(__file__).resolve().parent   # the repository: cwd of every subprocess the tests start
torch.set_num_threads(1)   # tiny tensors on a shared CPU: more threads only wait for each other

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n",
          "Café naïve façade, über Ångström.", "It was the best of times, it was the worst of times."]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_teacher_config(arch="llama", **overrides) -> TeacherConfig:
    """C=64, L=2, H=4, Hkv=2, N=16 (qwen3: N=24 != C/H), vocab 320."""
    cfg = TeacherConfig(arch=arch, vocab_size=320, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=24 if arch == "qwen3" else 16, intermediate_size=96, rope_theta=10000.0,
                        rms_eps=1e-5, tie_embeddings=False, attn_bias=arch == "qwen2",
                        qk_norm=arch == "qwen3", max_seq_len=256)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@lru_cache
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer)
    return tk.to_str()


def make_hf_teacher(tmp_path, arch="llama", tie=False, shard=False, rope_scaling=None, seed=0) -> Path:
    """A tiny random `arch` model saved by transformers in tmp_path/f"hf_{arch}"; returns the folder."""
    import transformers
    from tokenizers import Tokenizer
    c = tiny_teacher_config(arch)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    rope = dict(rope_scaling or {"rope_type": "default"}, rope_theta=c.rope_theta)
    config = config_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                        head_dim=c.head_dim, rms_norm_eps=c.rms_eps, max_position_embeddings=c.max_seq_len,
                        rope_parameters=rope, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():   # random everything (norms around 1, biases too) so a wrong mapping shows
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    folder = Path(tmp_path) / f"hf_{arch}"
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                               bos_token=SPECIALS[0], eos_token=SPECIALS[2], chat_template=CHATML)
    tok.save_pretrained(folder)
    return folder


def _llama3_rope_factors(theta, N, s):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, verbatim in substance."""
    freqs = 1.0 / (theta ** (torch.arange(0, N, 2, dtype=torch.float32) / N))
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def make_gguf_teacher(hf_folder, path, arch=None, **meta) -> Path:
    """Write the HF folder's weights + tokenizer as an F32 GGUF at `path` (llama.cpp conventions)."""
    import gguf
    from safetensors.torch import load_file
    hf_folder, path = Path(hf_folder), Path(path)
    cfg = json.loads((hf_folder / "config.json").read_text())
    arch = arch or cfg["model_type"]
    H, Hkv, N = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(N)
    w.add_value_length(N)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tj = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    tokens = [t for t, _ in vocab]   # llama.cpp pads the list to the model's vocab with unused [PADi]
    pads = [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_token_list(tokens + pads)
    w.add_token_types([3 if t in special else 1 for t in tokens] + [5] * len(pads))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for key, value in meta.items():   # overrides, e.g. general.architecture for error tests
        w.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType.get_type(value))
    sd = {}
    for f in sorted(hf_folder.glob("*.safetensors")):
        sd.update(load_file(f))
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg["rope_parameters"]["rope_theta"], N,
                                                               cfg["rope_parameters"]))
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        parts = name.removeprefix("model.").split(".")
        layer = parts[1] if parts[0] == "layers" else None
        module = ".".join(parts[2:-1] if layer else parts[:-1])
        gname = (f"blk.{layer}." if layer else "") + GGUF_NAMES[module] + "." + parts[-1]
        a = t.float().numpy()
        if arch in ("llama", "mistral") and module in ("self_attn.q_proj", "self_attn.k_proj"):
            a = _llamacpp_permute(a, H if module == "self_attn.q_proj" else Hkv)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rel_err(x, ref) -> float:
    """Relative error ‖x − ref‖ / ‖ref‖ (fla's metric) in fp64 on the CPU; absolute where ref is all zero."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    den = ref.norm()
    return float((x - ref).norm() / (den if den > 0 else 1.0))


def perturbed(model, seed=0, std=0.05):
    """Move every parameter off its init so that a wrong mapping or a skipped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


# ---------------------------------------------------------------- tiny fp64 students (plain torch)

TINY_ARCHS = {   # D = H·N = 32 ≠ C = 40, so time-mix width and hidden size are never confused
    "llama": dict(arch="llama", n_heads=4, n_kv_heads=2),
    "qwen2": dict(arch="qwen2", n_heads=4, n_kv_heads=2, attn_bias=True, tie_embeddings=False),
    "qwen3": dict(arch="qwen3", n_heads=4, n_kv_heads=1, qk_norm=True),
}
TINY_RANKS = dict(rank_decay=8, rank_value=4, rank_gate=12)   # small, distinct ranks catch shape mix-ups
TEACHER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def fp64_teacher(arch, n_layers=3, seed=0) -> Teacher:
    torch.manual_seed(seed)
    cfg = TeacherConfig(vocab_size=97, hidden_size=40, n_layers=n_layers, head_dim=8,
                        intermediate_size=56, rope_theta=1000.0, **TINY_ARCHS[arch])
    t = Teacher(cfg).double()
    with torch.no_grad():   # norms away from 1, biases non-zero: copies must be real copies
        for name, p in t.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    return t


def perturb_time_mix_(student, seed=1):
    """Move the new time-mix parameters away from their init so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in student.layers:
            for name, p in blk.time_mix.named_parameters():
                if name.split(".")[0] in TEACHER_NAMES:
                    continue
                scale = 2.0 if name == "decay" else 0.5 if p.dim() == 1 else 0.3
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return student


def fp64_student(variant, arch="llama", **kw) -> Student:
    return perturb_time_mix_(Student.from_teacher(fp64_teacher(arch), variant, **{**TINY_RANKS, **kw}))


# ---------------------------------------------------------------- distill.py on a tiny teacher

TRAIN_TEXT = "\n".join(sorted(Path(data_lib.default_corpus()[0]).parent.glob("*_gut.txt"))[i].read_text()[:40000]
                       for i in range(4))


def tiny_hf_teacher(folder, vocab=256, seed=0, **shape) -> Path:
    """A tiny llama teacher saved as a Hugging Face folder that teacher.load_teacher reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([TRAIN_TEXT], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
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


def distill_flags(env, out, *extra):
    return ["--teacher", str(env / "teacher"), "--data", str(env / "data"), "--out", str(out),
            "--ctx", "32", "--batch", "4", "--micro-batch", "2", "--eval-windows", "4", *extra]


def distill_run(env, out, *extra):
    distill.main(distill_flags(env, out, *extra))


def logged_losses(out, step):
    return [r["loss"] for r in map(json.loads, (Path(out) / f"step{step}" / "log.jsonl").open()) if "loss" in r]


def logged_evals(out, step):
    return [r["eval"] for r in map(json.loads, (Path(out) / f"step{step}" / "log.jsonl").open()) if "eval" in r]


# ---------------------------------------------------------------- run-wide fixtures

once_per_run = pytest.fixture(scope="package")   # this folder, the repo root, and all below it: one build per test run


@once_per_run
def tiny_hf_llama(tmp_path_factory):
    """make_hf_teacher(arch="llama"): read by data, sample, export and command-line tests; never written to."""
    return make_hf_teacher(tmp_path_factory.mktemp("tiny_hf_llama"), "llama")


@once_per_run
def distill_env(tmp_path_factory):
    """A folder with teacher/ (tiny_hf_teacher) and data/ (its token files, one document held out)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_hf_teacher(root / "teacher")
    tok = teacher_lib.load_tokenizer(teacher)
    (root / "a.txt").write_text(TRAIN_TEXT[: len(TRAIN_TEXT) // 2])
    (root / "b.txt").write_text(TRAIN_TEXT[len(TRAIN_TEXT) // 2:])
    data_lib.prepare([root / "a.txt", root / "b.txt"], tok, root / "data", val_fraction=0.3, progress=False)
    return root


@once_per_run
def three_steps(distill_env, tmp_path_factory):
    """Steps 1, 2, 3 in turn (30 updates each), counting teacher loads. Returns (out folder, loads)."""
    out = tmp_path_factory.mktemp("three")
    loads = []
    real = teacher_lib.load_teacher

    def counting(*a, **k):
        loads.append(a)
        return real(*a, **k)

    teacher_lib.load_teacher = counting
    try:
        distill_run(distill_env, out, "--tokens", str(30 * 4 * 32), "--lr", "3e-3", "--eval-every", "1000")
    finally:
        teacher_lib.load_teacher = real
    return out, loads


@once_per_run
def default_teacher():
    """The embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32): (Teacher, Tok), loaded once."""
    return teacher_lib.load_teacher()


@once_per_run
def default_students(default_teacher):
    """Its RAD-RWKV7 and RAD-RWKV6 students at init (default ranks); tests only read them."""
    t, _ = default_teacher
    return {v: Student.from_teacher(t, v) for v in ("rwkv7", "rwkv6")}
