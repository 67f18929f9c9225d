"""Plain linear attention, the RADLADS paper's third student ("QLinAtt", arXiv 2505.03005 App. A.3).

Written the way a fork adds an architecture (README "How to add an architecture"): this file and
three lines in model.py (one import, `class LinAttTimeMix(LinearAttention, TimeMix)`, one MIXERS
entry), then `python distill.py --variant linatt ...`; sample.py and export.py need nothing.

The paper, per head: p_t = LayerNorm(RoPE(x_t W_q) RoPE(x_t W_k)ᵀ M (x_t W_v)),  o_t = p_t W_o,
M the causal mask; no feature map φ, no denominator, no decay, no gate. Its recurrent form, in
kernels.py's [K, V] layout:

    S_t = S_{t-1} + k_tᵀ v_t            (rwkv6_attn with log w = 0: no decay, no state balancing)
    y_t = LayerNorm_head(N^-½ · r_t S_t) ⊙ ln_w + ln_b
    out = o_proj(y)

with r = q_proj, k, v, o from the teacher, RoPE at the teacher's point, GQA heads repeated
(TimeMix does all that). Where the paper is silent, the choices here: the LayerNorm has a
per-channel affine (ln_w = 1, ln_b = 0 at init: PyTorch's LayerNorm defaults) and eps 1e-5 after
the N^-½ scale, which is RWKV's ln_x (GroupNorm eps 1e-5·8² on the unscaled y at N = 64); the
state starts at zero. With no decay S is a plain sum and grows with T (‖S_T‖ ≤ Σ‖k_t‖‖v_t‖; from
SmolLM2-135M, 1.3e5 per head after 1k tokens of text, so a few 1e6 at 16k: far inside fp32); the
LayerNorm divides that growth out, so the output stays O(1) at any length. What it cannot undo is that nothing is ever forgotten: token
t weighs 1/t of the state, the known weakness of plain linear attention.

    python -m pytest -q test_fork.py        # parity tests (shared with the built-ins) + 3-step CPU run
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class LinearAttention:
    """The linear-attention mixer, combined with model.TimeMix in model.py (TimeMix supplies
    q_proj/k_proj/v_proj/o_proj, copy_from_teacher, rkv() and the state S; it is not imported
    here, so that model.py can import this file)."""
    rope = True          # the paper applies RoPE as the teacher does

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)                     # TimeMix: the teacher's projections
        self.ln_w = nn.Parameter(torch.empty(self.D))        # LayerNorm per head, affine per channel
        self.ln_b = nn.Parameter(torch.empty(self.D))

    @torch.no_grad()
    def init_weights(self):
        """ln_w = 1, ln_b = 0 (PyTorch's LayerNorm defaults; the paper does not say)."""
        nn.init.ones_(self.ln_w)
        nn.init.zeros_(self.ln_b)

    def forward(self, x, state, ctx):
        B, T, _ = x.shape
        H, N = self.H, self.N
        r, k, v = self.rkv(x, x, x, ctx)                                     # (B, T, H, N)
        log_w = torch.zeros(r.shape, dtype=torch.float32, device=r.device)   # w = 1: no decay
        y, S = kernels.rwkv6_attn(r, log_w, k, v, state["S"], backend="auto")
        y = F.layer_norm(y.to(torch.promote_types(y.dtype, torch.float32)), (N,), eps=1e-5)
        y = y * self.ln_w.view(H, N) + self.ln_b.view(H, N)                 # (B, T, H, N)
        return self.o_proj(y.to(x.dtype).reshape(B, T, self.D)), {"S": S}
