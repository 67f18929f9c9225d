"""Shared pytest helpers: tiny random teachers for fast CPU tests.

- `tiny_teacher_config(arch)`: a TeacherConfig for a tiny plain-torch Teacher (random init).
- `make_hf_teacher(tmp_path, arch, tie=..., shard=..., rope_scaling=...)`: a tiny random
  transformers model (+ a tiny byte-level BPE tokenizer with a ChatML template) written with
  transformers' own save_pretrained; returns the folder. Reference logits: load it back with
  transformers.AutoModelForCausalLM.from_pretrained(folder).
- `make_gguf_teacher(hf_folder, path, arch=None, **meta)`: the same weights written as a GGUF file
  the way llama.cpp's convert_hf_to_gguf.py writes them (q/k rows permuted for llama, llama3
  RoPE scaling as rope_freqs.weight, tied head omitted); `meta` overrides metadata keys.

    python -m pytest -x -q test_teacher.py
"""
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from teacher import TeacherConfig

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


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def perturbed(model, seed=0, std=0.05):
    """Move every parameter off its init so that a wrong mapping or a skipped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model
