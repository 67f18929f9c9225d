"""The RADLADS students: the teacher's decoder with every attention swapped for a recurrent time-mix.

RADLADS (arXiv 2505.03005), docs/method.md §2–§5. The student keeps the teacher's embedding, norms,
MLPs and (untied) LM head; each layer's attention becomes a time-mix fed by the teacher's q/k/v/o
projections (q_proj → r, k_proj → k, v_proj → v, o_proj → o). The paper's three students:

  RAD-RWKV7 (§3)  log_w = −e^-½ σ(w0 + tanh(x W1) W2);  a = σ(a0 + x A1 A2);  g = σ(x G1) G2
                  κ = k/‖k‖;  v += (v_first − v) ⊙ σ(v0 + x V1 V2) for ℓ > 0;  k̃ = k ⊙ (1 − w + a)
                  S_t = S_{t-1} (diag(w_t) − κ_tᵀ(a_t ⊙ κ_t)) + v_tᵀ k̃_t;  y_t = S_t r_tᵀ N^-½
                  out = o_proj(y ⊙ g)
  RAD-RWKV6 (§4)  x_* = x + (shift(x) − x) ⊙ (maa_* + m_*);  log_w = max(−exp(decay + tanh(x_w D1) D2), −5)
                  S_t = diag(w_t) S_{t-1} + (k_t ⊙ (1 − w_t))ᵀ v_t;  y_t = (r_t N^-½) S_t
                  out = o_proj(y ⊙ σ(gate(x_g)))
  QLinAtt (§5)    S_t = S_{t-1} + k_tᵀ v_t;  y_t = LayerNorm_head(r_t S_t N^-½) ⊙ ln_w + ln_b
                  out = o_proj(y)                                           (paper App. A.3)

Recurrences run in kernels.py ([K, V] state layout, fp32). One forward serves training (parallel,
chunked) and generation (T = 1 with a carried State); forward(a + b) == forward(a), forward(b, state),
the State advanced in place (State's docstring). sample.py captures the one-token step in a CUDA graph
through Student.blocks, with RoPE at a position read from a device tensor (Student.ctx).

Read from the leaves to the root: TimeMix (what every mixer shares) → RWKV7TimeMix → RWKV6TimeMix →
QLinAttTimeMix → MIXERS → Block → StudentConfig → State → Student.

A new sequence mixer (docs/forking.md) is one TimeMix subclass here plus one MIXERS entry, and its
oracle in test_equivalence.py: __init__(cfg, layer_idx) makes its parameters, init_weights()
initialises them, forward(x, state, ctx) -> (y, new_state) makes one kernels.py call; init_state(B,
device, dtype) declares its per-layer state (default: S) and `rope` its RoPE default. Data shared
across layers travels in Ctx. distill.py, sample.py and export.py pick the mixer by its MIXERS key.

    python model.py --variant rwkv7 --out out/rwkv7-init     # student from the default teacher
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels import rwkv6_attn, rwkv7_attn
from teacher import MLP, Attention, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


def lora_rank(C: int, e: float, m: float) -> int:
    """docs/method.md §2: rank(e, m) = max(1, round(C**e · m / 32)) · 32."""
    return max(1, round(C ** e * m / 32)) * 32


def fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16/fp32 -> fp32; fp64 stays fp64 (the fp64 oracle tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def write_atomic(path, write):
    """write(tmp) fills a file beside `path`, which is then renamed onto it: a crash or kill while
    writing leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ortho_(t: torch.Tensor, s: float) -> torch.Tensor:
    """docs/method.md §2 ortho(s): orthogonal, gain s·sqrt(rows/cols) if rows > cols else s."""
    rows, cols = t.shape
    return nn.init.orthogonal_(t, gain=s * math.sqrt(rows / cols) if rows > cols else s)


@dataclass
class Ctx:
    """Data one forward shares across layers (never globals)."""
    cos: torch.Tensor | None        # (T, N) RoPE at positions pos .. pos+T-1; None when RoPE is off
    sin: torch.Tensor | None
    v_first: torch.Tensor | None = None  # (B, T, H, N) RWKV7: layer 0's values, for the value residual


# ---------------------------------------------------------------- time-mix blocks (docs/method.md §2–§5)

class TimeMix(Attention):
    """What every mixer shares, inherited from the teacher's Attention: its projections under the
    teacher's names (so copies are by name), the optional q/k norms and project(); added here: RoPE
    from the Ctx, GQA head repetition, and an fp32 state S (B, H, N, N) per layer.

    A subclass adds its parameters in __init__(cfg, layer_idx) and defines init_weights() (the
    inits of those new parameters) and forward(x (B, T, C), state: dict, ctx: Ctx) -> (y (B, T, C),
    new state dict), one kernels.py call; T = 1 with a carried state is the recurrent step.
    It overrides init_state when it carries more than S (RWKV6: the last x), and `rope` when RoPE
    on r and k is its default (StudentConfig.rope = None takes it)."""
    rope = False

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg)                   # q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm)
        self.cfg, self.layer_idx = cfg, layer_idx
        self.D = self.H * self.N                # time-mix width: full, one state per query head

    @torch.no_grad()
    def copy_from_teacher(self, attn: nn.Module):
        """q/k/v/o (+ biases) and q/k norms from a teacher.Attention, bit for bit."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(self, name):
                getattr(self, name).load_state_dict(getattr(attn, name).state_dict())

    def init_state(self, B: int, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        return {"S": torch.zeros(B, self.H, self.N, self.N, device=device, dtype=dtype)}  # [K, V]

    def rkv(self, x_r, x_k, x_v, ctx: Ctx):
        """r, k, v (B, T, H, N): the teacher's projections and q/k norms, RoPE, then each kv head
        repeated G = H/Hkv times so query head i reads kv head i // G (docs/method.md §2)."""
        r, k, v = self.project(x_r, x_k, x_v)
        if ctx.cos is not None:
            r, k = apply_rope(r, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        G = self.H // self.Hkv
        return r, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)


class RWKV7TimeMix(TimeMix):
    """RAD-RWKV7 (docs/method.md §3): no token shift, RoPE on r and k, value residual, state balancing."""
    rope = True

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        C, D, Rd, Rv, Rg = cfg.hidden_size, self.D, cfg.rank_decay, cfg.rank_value, cfg.rank_gate
        P = lambda *shape: nn.Parameter(torch.empty(*shape))
        self.w0, self.w1, self.w2 = P(D), P(C, Rd), P(Rd, D)      # decay
        self.a0, self.a1, self.a2 = P(D), P(C, Rd), P(Rd, D)      # in-context learning rate
        # layer 0 has no value residual; a bool, not layer_idx, decides it in forward, so that
        # torch.compile makes one graph for every other layer (it specialises on integer attributes)
        self.first = layer_idx == 0
        if not self.first:
            self.v0, self.v1, self.v2 = P(D), P(C, Rv), P(Rv, D)
        self.g1, self.g2 = P(C, Rg), P(Rg, D)                     # output gate

    @torch.no_grad()
    def init_weights(self):
        L, l = self.cfg.n_layers, self.layer_idx
        n = torch.arange(self.D, dtype=torch.float64) / (self.D - 1)
        w0 = -6.5 + 5 * n ** (0.85 + math.sqrt(l / max(L - 1, 1)))   # w ∈ [0.895, 0.999]
        self.w0.copy_(w0)
        for p in (self.w1, self.a0, self.a1, self.g1):
            nn.init.zeros_(p)
        for p in (self.w2, self.a2, self.g2):
            ortho_(p, 0.1)
        if l > 0:
            nn.init.ones_(self.v0), nn.init.zeros_(self.v1), ortho_(self.v2, 0.1)

    def forward(self, x, state, ctx: Ctx):
        B, T, _ = x.shape
        H, N = self.H, self.N
        r, k, v = self.rkv(x, x, x, ctx)                                    # (B, T, H, N)
        d = self.w0 + torch.tanh(x @ self.w1) @ self.w2                     # (B, T, D)
        log_w = (-math.exp(-0.5) * torch.sigmoid(fp32(d))).view(B, T, H, N)  # fp32, ∈ (−0.61, 0)
        iclr = torch.sigmoid(self.a0 + x @ self.a1 @ self.a2).view(B, T, H, N)
        g = torch.sigmoid(x @ self.g1) @ self.g2                            # (B, T, D)
        if self.first:
            ctx.v_first = v                                    # not detached (docs/method.md §3)
        else:
            v = v + (ctx.v_first - v) * torch.sigmoid(self.v0 + x @ self.v1 @ self.v2).view(B, T, H, N)
        kk = F.normalize(fp32(k), dim=-1)                                 # κ, fp32
        k = (fp32(k) * (1 - log_w.exp() + fp32(iclr))).to(x.dtype)    # k̃: state balancing
        a, b = -kk, kk * fp32(iclr)                   # the rank-1 term in kernels.py's [K, V] form
        y, S = rwkv7_attn(r, log_w, k, v, a, b, state["S"], backend="auto")
        return self.o_proj(y.reshape(B, T, self.D) * g), {"S": S}


class RWKV6TimeMix(TimeMix):
    """RAD-RWKV6 (docs/method.md §4): data-dependent token shift, LoRA decay, state balancing, sigmoid
    gate; RoPE only when cfg.rope. Its state also carries the last input x for the shift."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        C, D, R = cfg.hidden_size, self.D, cfg.rank_decay
        P = lambda *shape: nn.Parameter(torch.empty(*shape))
        self.maa_x, self.maa_rkvwg = P(C), P(5, C)               # rows: r, k, v, w, g
        self.m1, self.m2 = P(C, 5 * R), P(5, R, C)               # token-shift LoRA
        self.decay, self.d1, self.d2 = P(D), P(C, R), P(R, D)    # decay LoRA
        self.gate = nn.Linear(C, D, bias=False)

    @torch.no_grad()
    def init_weights(self):
        L, l = self.cfg.n_layers, self.layer_idx
        n = torch.arange(self.D, dtype=torch.float64) / (self.D - 1)
        self.decay.copy_(-6 + 5 * n ** (0.7 + 1.3 * l / max(L - 1, 1)))
        nn.init.ones_(self.maa_x)
        for p in (self.maa_rkvwg, self.m1, self.d1, self.gate.weight):   # shift inert, g = 0.5
            nn.init.zeros_(p)
        for p in (self.m2, self.d2):
            nn.init.uniform_(p, -0.01, 0.01)

    def init_state(self, B: int, device=None, dtype=torch.float32):
        return {**super().init_state(B, device, dtype),
                "x": torch.zeros(B, self.cfg.hidden_size, device=device, dtype=dtype)}

    def forward(self, x, state, ctx: Ctx):
        B, T, C = x.shape
        H, N = self.H, self.N
        dx = torch.cat([state["x"][:, None].to(x.dtype), x[:, :-1]], dim=1) - x   # shift(x) − x
        xx = x + dx * self.maa_x
        R = self.m1.shape[1] // 5
        m = torch.tanh(xx @ self.m1).view(B * T, 5, R).transpose(0, 1) @ self.m2   # (5, B·T, C)
        xs = x + dx * (self.maa_rkvwg[:, None, None] + m.view(5, B, T, C))         # (5, B, T, C)
        x_r, x_k, x_v, x_w, x_g = xs.unbind(0)
        r, k, v = self.rkv(x_r, x_k, x_v, ctx)                                       # (B, T, H, N)
        d = fp32(self.decay + torch.tanh(x_w @ self.d1) @ self.d2)
        log_w = torch.clamp(-torch.exp(d), min=-5.0).view(B, T, H, N)               # fp32, w ≥ e^-5
        k = (fp32(k) * (1 - log_w.exp())).to(x.dtype)                            # state balancing
        y, S = rwkv6_attn(r, log_w, k, v, state["S"], backend="auto")
        y = y.reshape(B, T, self.D) * torch.sigmoid(self.gate(x_g))
        return self.o_proj(y), {"S": S, "x": x[:, -1].to(state["x"].dtype)}


class QLinAttTimeMix(TimeMix):
    """QLinAtt, the paper's linear-attention baseline (paper App. A.3, eq. 33; docs/method.md §5):
    per head p_t = LayerNorm(RoPE(x_t W_q) RoPE(x_t W_k)ᵀ M (x_t W_v)), M the causal mask; no feature
    map, no denominator, no decay, no gate, no token shift. Recurrent form, [K, V] layout:

        S_t = S_{t-1} + k_tᵀ v_t        (rwkv6_attn with log w = 0; no state balancing: at w = 1
                                          the factor (1 − w) would zero k)
        y_t = LayerNorm_head(N^-½ · r_t S_t) ⊙ ln_w + ln_b,   out = o_proj(y)

    Where the paper is silent: the LayerNorm has a per-channel affine (ln_w, ln_b, the only new
    parameters), eps 1e-5 after the N^-½ scale (RWKV's ln_x, GroupNorm eps 1e-5·8² on the unscaled
    y, at N = 64); S_0 = 0. With no decay S is a plain sum that grows with T (‖S_T‖ ≤ Σ‖k_t‖‖v_t‖,
    far inside fp32 at any trained length); the LayerNorm divides the growth out of the output.
    What it cannot undo is that nothing is forgotten: token t weighs 1/t of the state."""
    rope = True          # the paper applies RoPE as the teacher does

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.ln_w = nn.Parameter(torch.empty(self.D))        # LayerNorm per head, affine per channel
        self.ln_b = nn.Parameter(torch.empty(self.D))

    @torch.no_grad()
    def init_weights(self):
        nn.init.ones_(self.ln_w)         # PyTorch's LayerNorm defaults (the paper does not say)
        nn.init.zeros_(self.ln_b)

    def forward(self, x, state, ctx: Ctx):
        B, T, _ = x.shape
        H, N = self.H, self.N
        r, k, v = self.rkv(x, x, x, ctx)                                     # (B, T, H, N)
        log_w = torch.zeros(r.shape, dtype=torch.float32, device=r.device)   # w = 1: no decay
        y, S = rwkv6_attn(r, log_w, k, v, state["S"], backend="auto")
        y = F.layer_norm(fp32(y), (N,), eps=1e-5) * self.ln_w.view(H, N) + self.ln_b.view(H, N)
        return self.o_proj(y.to(x.dtype).reshape(B, T, self.D)), {"S": S}


MIXERS = {"rwkv7": RWKV7TimeMix, "rwkv6": RWKV6TimeMix, "qlinatt": QLinAttTimeMix}


# ---------------------------------------------------------------- block, config, model

class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.time_mix = MIXERS[cfg.variant](cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, state, ctx: Ctx):
        y, state = self.time_mix(self.input_layernorm(h), state, ctx)
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h)), state


@dataclass
class StudentConfig:
    variant: str = "rwkv7"           # a key of MIXERS
    arch: str = "llama"              # the teacher's family (for export)
    vocab_size: int = 49152
    hidden_size: int = 576           # C
    n_layers: int = 30               # L
    n_heads: int = 9                 # H
    n_kv_heads: int = 3              # Hkv
    head_dim: int = 64               # N
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None
    rms_eps: float = 1e-5
    attn_bias: bool = False          # qwen2: biases on q, k, v
    qk_norm: bool = False            # qwen3: RMSNorm on r and k per head
    max_seq_len: int = 8192
    rope: bool | None = None         # RoPE on r, k; default: the mixer's `rope` (rwkv6: off)
    rank_decay: int | None = None    # decay / in-context rate / token shift: rank(0.5, 1.8)
    rank_value: int | None = None    # value residual: rank(0.5, 1.3)
    rank_gate: int | None = None     # RWKV7 gate: rank(0.8, 0.6)

    def __post_init__(self):
        if self.variant not in MIXERS:
            raise ValueError(f"unknown student variant {self.variant!r}: use one of {sorted(MIXERS)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope is None:
            self.rope = MIXERS[self.variant].rope
        C = self.hidden_size
        self.rank_decay = self.rank_decay or lora_rank(C, 0.5, 1.8)
        self.rank_value = self.rank_value or lora_rank(C, 0.5, 1.3)
        self.rank_gate = self.rank_gate or lora_rank(C, 0.8, 0.6)

    @classmethod
    def from_teacher(cls, tcfg, variant: str, **overrides) -> "StudentConfig":
        shape = {f.name: getattr(tcfg, f.name) for f in fields(cls) if hasattr(tcfg, f.name)}
        return cls.from_dict({**shape, "variant": variant, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown StudentConfig fields {sorted(unknown)}: "
                             f"valid ones are {[f.name for f in fields(cls)]}")
        return cls(**d)


@dataclass
class State:
    """Recurrent state after `pos` tokens. layers[i]: the mixer's dict of fp32 tensors — S (B, H, N, N)
    in kernels.py's [K, V] layout, RWKV6 also x (B, C), the last time-mix input. RoPE continues at pos.

    Student.forward(idx, state) advances `state` in place, on every device, and returns it: afterwards
    its tensors hold the state after idx and pos has grown by T. So forward(b, state) twice from one
    State reads b twice (the second call continues from the first); copy() first to branch. Without
    autograd the tensors themselves are overwritten, so their addresses never change (a captured decode
    step reads them); while autograd records, each layer's dict is replaced by a new one instead, so
    that the backward, and the recompute of a checkpointed block, still find the values they read."""
    layers: list[dict[str, torch.Tensor]]
    pos: int = 0

    def copy(self) -> "State":
        return State([{k: t.clone() for k, t in st.items()} for st in self.layers], self.pos)

    def save(self, path):
        tensors = {f"{i}.{k}": t.detach().contiguous().cpu()
                   for i, st in enumerate(self.layers) for k, t in st.items()}
        meta = {"pos": str(self.pos), "n_layers": str(len(self.layers))}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path, device="cpu") -> "State":
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "pos" not in meta:
                raise ValueError(f"{path} is not a State file (no 'pos' metadata): write it with State.save")
            layers = [{} for _ in range(int(meta["n_layers"]))]
            for key in f.keys():
                i, name = key.split(".", 1)
                layers[int(i)][name] = f.get_tensor(key)
        return cls(layers, int(meta["pos"]))


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied (docs/method.md §2)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_buffers(self):
        """Recompute the non-persistent RoPE inv_freq (fp32) — after to_empty() or .to(dtype)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (build on meta, to_empty, then this; FSDP2's flow).

        parameter                        init                                   source
        embed, lm_head, q/k/v/o, MLP     PyTorch defaults (the teacher's
                                         copies overwrite them)                 from_teacher
        RMSNorm weights                  1
        RWKV7 w0                         −6.5 + 5(n/(D−1))^(0.85+√(ℓ/(L−1)))    docs/method.md §3
        RWKV7 W1, A1, a0, G1 / V1        0 / 0 (ℓ > 0)                          docs/method.md §3
        RWKV7 W2, A2, G2, V2             ortho(0.1)                             docs/method.md §3
        RWKV7 v0                         1 (ℓ > 0; layer 0 has none)            docs/method.md §3
        RWKV6 maa_x / maa_{r,k,v,w,g}    1 / 0                                  docs/method.md §4
        RWKV6 M1, D1, gate               0                                      docs/method.md §4
        RWKV6 M2, D2                     U(−0.01, 0.01)                         docs/method.md §4
        RWKV6 decay                      −6 + 5(n/(D−1))^(0.7+1.3ℓ/(L−1))       docs/method.md §4
        QLinAtt ln_w / ln_b              1 / 0                                  docs/method.md §5
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.layers:
            block.time_mix.init_weights()
        self.init_buffers()

    @classmethod
    def from_teacher(cls, teacher: nn.Module, variant: str, **overrides) -> "Student":
        """The student of docs/method.md §2: teacher tensors copied bit for bit, new ones initialised."""
        cfg = StudentConfig.from_teacher(teacher.cfg, variant, **overrides)
        ref = teacher.embed_tokens.weight
        with torch.device("meta"):
            student = cls(cfg)
        # in the teacher's dtype before copying, so that copies stay bit-identical (fp64 teachers too)
        student.to_empty(device=ref.device).to(ref.dtype)
        for block in student.layers:            # the new parameters; everything else is copied
            block.time_mix.init_weights()
        with torch.no_grad():
            student.embed_tokens.weight.copy_(teacher.embed_tokens.weight)
            student.lm_head.weight.copy_(teacher.lm_head.weight)    # the embedding when tied
            student.norm.weight.copy_(teacher.norm.weight)
            for s, t in zip(student.layers, teacher.layers, strict=True):
                s.input_layernorm.load_state_dict(t.input_layernorm.state_dict())
                s.post_attention_layernorm.load_state_dict(t.post_attention_layernorm.state_dict())
                s.mlp.load_state_dict(t.mlp.state_dict())
                s.time_mix.copy_from_teacher(t.self_attn)
        student.init_buffers()
        return student

    def init_state(self, B: int, device=None, dtype=torch.float32) -> State:
        return State([blk.time_mix.init_state(B, device, dtype) for blk in self.layers], pos=0)

    def ctx(self, T: int, pos: int | torch.Tensor = 0) -> Ctx:
        """RoPE at positions pos .. pos+T-1; pos an int, or a (1,) integer tensor on the model's device
        (a captured decode step's position buffer)."""
        if not self.cfg.rope:
            return Ctx(None, None)
        return Ctx(*rope_cos_sin(self.inv_freq.float(), T, offset=pos))

    def blocks(self, h, state: State, ctx: Ctx):
        """h (B, T, C) embedded tokens through every block from `state`, which is updated in place
        (State's docstring; its pos is the caller's); returns h before the final norm."""
        for i, (block, st) in enumerate(zip(self.layers, state.layers, strict=True)):
            h, new = block(h, st, ctx)
            if any(t.requires_grad for t in new.values()):
                state.layers[i] = new    # the backward (and a checkpointed block's recompute) reads st
                continue
            for k, t in new.items():
                if t is not st[k]:       # the Triton decode step has already written S in place
                    st[k].copy_(t)
        return h

    def hidden(self, idx, state: State | None = None):
        """idx (B, T) -> (h (B, T, C) before the final norm, State after these tokens): `state`
        advanced in place, or a new State from zeros."""
        B, T = idx.shape
        h = self.embed_tokens(idx)
        if state is None:   # fp32 state (fp64 only when the whole model is fp64, for oracle tests)
            state = self.init_state(B, idx.device, fp32(h).dtype)
        h = self.blocks(h, state, self.ctx(T, state.pos))
        state.pos += T
        return h, state

    def forward(self, idx, state: State | None = None):
        """idx (B, T) -> (logits (B, T, V), State); continues from `state` (advanced in place) when given."""
        h, state = self.hidden(idx, state)
        return self.lm_head(self.norm(h)), state

    def align(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Step 1 (docs/method.md §6): each layer's time-mix output on the teacher's attention input
        xs[ℓ] (B, T, C), without the student's residual stream. v_first = layer 0 on xs[0]."""
        B, T, _ = xs[0].shape
        ctx = self.ctx(T)
        return [blk.time_mix(x, blk.time_mix.init_state(B, x.device, fp32(x).dtype), ctx)[0]
                for blk, x in zip(self.layers, xs, strict=True)]

    def save(self, path):
        """config.json + model.safetensors in the folder `path`, each written whole or not at all."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2)))

    @classmethod
    def load(cls, path, device="cpu", dtype=None) -> "Student":
        """A student written by save(); needs no teacher."""
        src = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (src / name).is_file():
                raise FileNotFoundError(f"{src / name} not found: Student.load expects a folder "
                                        "written by Student.save (config.json + model.safetensors)")
        cfg = StudentConfig.from_dict(json.loads((src / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(cfg)
        sd = load_file(str(src / "model.safetensors"), device=str(device))
        for name, t in sd.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{src / 'model.safetensors'}: tensor {name} holds NaN or inf; the "
                                 "training run diverged or the file is damaged: load an earlier checkpoint")
        model.load_state_dict(sd, assign=True)
        if dtype is not None:
            model.to(dtype)
        model.init_buffers()
        return model


def main():
    p = argparse.ArgumentParser(description="Build a RADLADS student from a teacher (docs/method.md §2).")
    p.add_argument("--variant", choices=sorted(MIXERS), default="rwkv7")
    p.add_argument("--teacher", default=None, help="GGUF or HF folder (default: embedded SmolLM2)")
    p.add_argument("--out", default=None, help="folder to save the student into")
    args = p.parse_args()
    from teacher import load_teacher      # here, not above: export.py ships teacher.py's modules only
    teacher, _ = load_teacher(args.teacher)
    student = Student.from_teacher(teacher, args.variant)
    count = lambda m: sum(t.numel() for t in m.parameters())
    print(f"teacher {count(teacher):,} params; {args.variant} student {count(student):,} params")
    if args.out:
        student.save(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
