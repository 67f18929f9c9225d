"""RADLADS distillation: a softmax-attention teacher -> a RAD-RWKV student, in three steps.

RADLADS (arXiv 2505.03005), ../shared/METHOD.md §5–§8:
  step 1  attention-output alignment: the teacher's residual stream, loss = mean over layers, batch
          and tokens of ‖y_T − y_S‖₂/√C; only time-mix parameters train.
  step 2  knowledge distillation: online frozen teacher, token-mean KL(p_T‖p_S) over the full
          vocabulary, temperature 1; every student parameter trains.
  step 3  context extension: cross-entropy only at long context; no teacher is loaded.
Each step starts from the previous one's student in --out (out/step1/student -> step 2), or --init.

    python distill.py                                    # CPU: a short demo of steps 1, 2, 3
    torchrun --nproc_per_node=8 distill.py --step 1      # then --step 2, --step 3 (GPU recipe)
    python distill.py --step 2 --resume                  # continue from out/step2/ckpt
    python distill.py --bench --step 2 --shape q3b       # tokens/s, memory, MFU on random weights

Distribution is FSDP2 (../shared/FSDP2.md): one fully_shard per block and a root, bf16 compute
with fp32 master weights on GPU, fp32 on CPU; the frozen teacher is its own sharded root.
Outputs per step in --out/stepN/: student/ (model.safetensors + config.json, read by model.py),
ckpt/ (torch.distributed.checkpoint, for --resume) and log.jsonl (every metric).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data as data_lib
import kernels
from export import tokenizer_files
import teacher as teacher_lib
from model import MIXERS, Student
from teacher import Teacher, TeacherConfig

# The paper's recipe at 7B (METHOD §5–§7). `tokens` is the 7B budget, scaled to the teacher by
# token_budget(); micro = sequences per forward on one GPU (the global batch is reached by
# gradient accumulation, so it does not depend on the number of GPUs). Step 3's batch is not in
# METHOD: 3 × 16384 keeps step 2's 49k tokens per update.
STEPS = {
    1: dict(tokens=100e6, ctx=512, batch=32, micro=8, lr=1e-3, lr_end=1e-5, ckpt_act=False),
    2: dict(tokens=500e6, ctx=512, batch=96, micro=8, lr=1e-5, lr_end=1e-5, ckpt_act=True),
    3: dict(tokens=100e6, ctx=16384, batch=3, micro=1, lr=1e-5, lr_end=1e-5, ckpt_act=True),
}
WARMUP = 50            # steps, lr *= 0.01 + 0.99·step/50 (METHOD §5); capped at a tenth of a short run
PAPER_PARAMS = 7.6e9   # Qwen2.5-7B, the teacher the budgets above were measured on
# A CPU has ~100 tokens/s of fwd+bwd for the 135M default (BENCHMARKS.md): minutes, not a conversion.
DEMO = {1: dict(tokens=20 * 8 * 128, ctx=128, batch=8),
        2: dict(tokens=15 * 4 * 128, ctx=128, batch=4),
        3: dict(tokens=10 * 2 * 256, ctx=256, batch=2)}
SHAPES = {  # --bench shapes with random weights
    "smol": TeacherConfig(),  # SmolLM2-135M, the default teacher
    "q3b": TeacherConfig(arch="qwen2", vocab_size=151936, hidden_size=2048, n_layers=36, n_heads=16,
                         n_kv_heads=2, head_dim=128, intermediate_size=11008, rope_theta=1e6,
                         attn_bias=True, tie_embeddings=True),
    "q7b": TeacherConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, n_layers=28, n_heads=28,
                         n_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6,
                         attn_bias=True, tie_embeddings=False),
    "q32b": TeacherConfig(arch="qwen2", vocab_size=152064, hidden_size=5120, n_layers=64, n_heads=40,
                          n_kv_heads=8, head_dim=128, intermediate_size=27648, rope_theta=1e6,
                          attn_bias=True, tie_embeddings=False),
    "tiny": TeacherConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, intermediate_size=128),
}


class Fail(Exception):
    """A problem the user can fix: printed as one line, exit code 2, no traceback. Printed by rank 0,
    or by the rank it happened on when `local` (the others may then wait on it)."""

    def __init__(self, msg, local=False):
        super().__init__(msg)
        self.local = local


def positive(kind):
    """An argparse type: a number of this kind above zero."""
    def parse(s):
        if kind(s) <= 0:
            raise argparse.ArgumentTypeError(f"{s} must be above zero")
        return kind(s)
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", type=int, choices=(1, 2, 3), help="which step (default: 1, 2, 3 in turn)")
    p.add_argument("--teacher", help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", help=f"token files from data.py (default: {data_lib.DEFAULT_DIR})")
    p.add_argument("--out", default="out", help="run folder: stepN/{student,ckpt,log.jsonl}")
    p.add_argument("--init", help="student folder to start from instead of the previous step's; 'teacher': "
                   "the teacher-initialised student (METHOD §4), i.e. skip the earlier steps (an ablation)")
    p.add_argument("--variant", default="rwkv7", choices=sorted(MIXERS), help="student mixer (model.MIXERS)")
    p.add_argument("--tokens", type=positive(float), help="training tokens (default: scaled to the teacher)")
    p.add_argument("--ctx", type=positive(int), help="tokens per sequence")
    p.add_argument("--batch", type=positive(int), help="sequences per optimizer step, over all GPUs")
    p.add_argument("--micro-batch", type=positive(int), help="sequences per forward on one device")
    p.add_argument("--lr", type=positive(float), help="peak learning rate")
    p.add_argument("--freeze-mlp", action="store_true", help="steps 2, 3: train only the time-mix and norms; "
                   "MLPs, embeddings and lm_head stay as they are (an ablation)")
    p.add_argument("--eval-every", type=positive(int), default=500, help="steps between eval + checkpoint")
    p.add_argument("--eval-windows", type=positive(int), help="held-out windows of ctx tokens (64; CPU demo 16)")
    p.add_argument("--resume", action="store_true", help="continue from --out/stepN/ckpt")
    p.add_argument("--stop-at", type=positive(int), help="stop after this step with a checkpoint (split a run)")
    # off by default: on H100/H200 it was slower at every shape timed (README) and failed at step 1
    p.add_argument("--compile", action="store_true", help="torch.compile each block (GPU)")
    p.add_argument("--no-ckpt-act", action="store_true", help="no activation checkpointing")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernels.py backend of every time-mix (auto: triton on CUDA, torch elsewhere); "
                   "rerun with torch to check the Triton kernels on a real run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (slower): repeated runs, and 1 vs N GPUs, comparable bit for bit")
    p.add_argument("--bench", action="store_true", help="time random-weight steps, print tokens/s, MFU")
    p.add_argument("--shape", default="smol", choices=sorted(SHAPES), help="--bench model shape")
    p.add_argument("--bench-steps", type=positive(int), default=8)
    return p.parse_args(argv)


def token_budget(step, n_params):
    """Training tokens for a teacher of n_params parameters. The paper's budgets scale down in
    proportion to the size (a smaller model has less to re-learn: tokens/param fixed), but not
    below a fifth of them: the time-mix LoRAs start from zero and need a minimum number of
    updates (a fifth of step 1 = 1.2k updates of 16k tokens), whatever the model size."""
    paper = STEPS[step]["tokens"]
    return int(max(paper / 5, paper * n_params / PAPER_PARAMS))


def lr_at(s, total, warmup, lr, lr_end):
    """METHOD §5: quarter cosine lr → lr_end over the run (flat when equal) and a linear warmup."""
    lr = lr_end + (lr - lr_end) * math.cos(math.pi / 2 * s / max(total - 1, 1))
    return lr * (0.01 + 0.99 * s / warmup) if s < warmup else lr


# ---------------------------------------------------------------- distributed setup

def init_dist():
    """One process group whatever the launch: torchrun's env, or a 1-rank group for `python`."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # gloo beside NCCL: DCP saves, object broadcasts
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:  # same code path as torchrun, without a port to collide on
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def on_rank0(fn):
    """Run fn (reading files once) on rank 0 only; every rank gets its small result, or its Fail.
    fn returns (small, big): big (full state dicts) stays on rank 0, others get None."""
    box = [None]
    big = None
    if dist.get_rank() == 0:
        try:
            small, big = fn()
            box = [("ok", small)]
        except (Fail, ValueError, OSError) as e:  # TeacherError, DataError: ValueErrors; missing files
            box = [("fail", str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "fail":
        raise Fail(box[0][1])
    return box[0][1], big


# ---------------------------------------------------------------- building the models

def student_init(args, step, src, teacher):
    """(StudentConfig, full student state dict) on rank 0: from the teacher for step 1, else the
    previous step's folder src (or --init)."""
    if (step == 1 and not args.init) or args.init == "teacher":
        if teacher is None:
            raise Fail("--init teacher needs the teacher, which step 3 does not load: pass a student folder")
        torch.manual_seed(args.seed)
        s = Student.from_teacher(teacher, args.variant)
    else:
        if not (src / "config.json").is_file():
            first = "" if args.init else f"run `python distill.py --step {step - 1} --out {args.out}` first, or "
            raise Fail(f"no student in {src}: {first}pass --init DIR (a folder written by Student.save)")
        s = Student.load(src, dtype=torch.float32)
    if teacher is not None:  # a student from another teacher cannot be distilled against this one
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(s.cfg, f) != getattr(teacher.cfg, f):
                raise Fail(f"student {f}={getattr(s.cfg, f)} but teacher {f}={getattr(teacher.cfg, f)}: "
                           "the student was made from another teacher; pass the matching --teacher")
    return s.cfg, s.state_dict()


class Distill(nn.Module):
    """The student and its loss in one forward: the FSDP root, holding the embedding, final norm
    and lm_head, so that they are gathered once per micro-batch and their gradients reduced once."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, x, y=None, hT=None, WT=None, taps=None, stats=False):
        """taps = the teacher's per-layer [(x, y_T)] -> per-layer alignment loss (L,) (step 1).
        Else x, y (B, T) -> token-mean KL to the teacher (hT (B·T, C) normed, WT (V, C)), or CE
        on y without one; with stats=True the eval sums instead."""
        if taps is not None:
            C = taps[0][0].shape[-1]
            ys = self.student.align([xt for xt, _ in taps])
            return torch.stack([((yt.float() - ys_.float()).norm(dim=-1) / C ** 0.5).mean()
                                for (_, yt), ys_ in zip(taps, ys)])
        h, _ = self.student.hidden(x)
        h = self.student.norm(h).flatten(0, 1)                                   # (B·T, C)
        return head_loss(h, self.student.lm_head.weight, y.flatten(), hT, WT, stats)


def _logprobs(h, W):
    """log_softmax of the logits h Wᵀ in at least fp32: (m, C), (V, C) -> (m, V)."""
    z = h @ W.T
    return F.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def _chunk_loss(h, W, y, hT, WT):
    logp = _logprobs(h, W)                                                       # student (m, V)
    if hT is None:
        return F.nll_loss(logp, y, reduction="sum")
    logq = _logprobs(hT, WT)                                                     # teacher (m, V)
    return F.kl_div(logp, logq, log_target=True, reduction="sum")               # Σ q (log q − log p)


def _chunk_stats(h, W, y, hT, WT):
    """Sums over the chunk: student NLL, teacher NLL, KL(T‖S), top-1 agreement (with the teacher's
    argmax, or with y without a teacher), tokens."""
    logp = _logprobs(h, W)
    zero = torch.zeros((), device=h.device, dtype=logp.dtype)
    nll_s, n = F.nll_loss(logp, y, reduction="sum"), zero + len(y)
    if hT is None:
        return torch.stack([nll_s, zero, zero, (logp.argmax(-1) == y).sum().to(zero), n])
    logq = _logprobs(hT, WT)
    return torch.stack([nll_s, F.nll_loss(logq, y, reduction="sum"),
                        F.kl_div(logp, logq, log_target=True, reduction="sum"),
                        (logp.argmax(-1) == logq.argmax(-1)).sum().to(zero), n])


def head_loss(h, W, y, hT=None, WT=None, stats=False, chunk=None):
    """Token-mean loss of the LM head on final-normed h (M, C), in chunks of tokens so that no (M, V)
    fp32 logits exist: each chunk's logits → log_softmax → loss (teacher's too) is recomputed in
    backward (torch.utils.checkpoint), so memory is one chunk's logits (~512 MiB at V=152k)."""
    M, chunk = h.shape[0], chunk or max(1, 2 ** 27 // W.shape[0])
    fn = _chunk_stats if stats else _chunk_loss
    total = 0
    for i in range(0, M, chunk):
        j = slice(i, i + chunk)
        t = None if hT is None else hT[j]
        total = total + (fn(h[j], W, y[j], t, WT) if stats else
                         checkpoint(fn, h[j], W, y[j], t, WT, use_reentrant=False))
    return total if stats else total / M


def shard_teacher(tcfg, sd, device, mp):
    """The frozen teacher: built on meta, bf16 on GPU, sharded per block with its own root;
    never in the optimizer, run under torch.no_grad()."""
    with torch.device("meta"):
        t = Teacher(tcfg)
    t.requires_grad_(False)
    if device.type == "cuda":
        t.to(torch.bfloat16)  # frozen: bf16 storage is enough (FSDP2.md 4)
    for block in t.layers:
        fully_shard(block, reshard_after_forward=True, mp_policy=mp)
    # Root = embed + final norm + lm_head (tied: one tensor). Kept gathered by an explicit
    # unshard() from the forward until after the student's backward: the KL chunks recompute the
    # teacher's logits in backward from lm_head.weight. reshard() after each micro-batch.
    fully_shard(t, reshard_after_forward=False, mp_policy=mp)
    register_fsdp_forward_method(t, "hidden")
    t.to_empty(device=device)
    t.inv_freq = teacher_lib.rope_inv_freq(tcfg).to(device)  # non-persistent buffer
    set_model_state_dict(t, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return t.eval()


def recomputed(forward):
    """Activation checkpointing: forward keeps only its inputs and runs again in backward."""
    return lambda *args: checkpoint(forward, *args, use_reentrant=False)


def shard_student(scfg, sd, step, device, mp, ckpt_act, compile_, freeze_mlp=False):
    """The student inside its Distill root: build on meta, requires_grad, activation checkpointing,
    compile, fully_shard bottom-up, to_empty, load (FSDP2.md "The order that works")."""
    with torch.device("meta"):
        model = Distill(Student(scfg))
    s = model.student
    # what trains is set before fully_shard, which copies requires_grad into the sharded parameters
    s.requires_grad_(step != 1)
    if freeze_mlp:
        for m in [s.embed_tokens, s.lm_head, *(blk.mlp for blk in s.layers)]:
            m.requires_grad_(False)
    units = [blk.time_mix for blk in s.layers] if step == 1 else list(s.layers)  # what forward calls
    for u in units:
        if step == 1:
            u.requires_grad_(True)
        if ckpt_act:  # an instance attribute, not a wrapper module: parameter names stay the same
            u.forward = recomputed(u.forward)
        if compile_:
            u.compile()
        fully_shard(u, mp_policy=mp)
    if step == 1:  # the frozen rest of each block, called only by the eval's full forward
        for blk in s.layers:
            fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    s.init_buffers()  # RoPE inv_freq, non-persistent
    sd = {f"student.{k}": v for k, v in sd.items()}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


# ---------------------------------------------------------------- checkpoints and export

def save_ckpt(path, model, opt, step, meta):
    """Model, optimizer, step (= data position) and RNG with torch.distributed.checkpoint, written
    to path.tmp and renamed: a crash mid-save leaves the previous checkpoint usable."""
    tmp, old = path.with_suffix(".tmp"), path.with_suffix(".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "rng": torch.get_rng_state()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))
        if path.exists():
            path.rename(old)          # between these renames, old is the usable checkpoint
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_ckpt(path, model, opt, meta):
    """The step to continue from; model and optimizer state loaded in place."""
    if not path.exists() and path.with_suffix(".old").exists():
        path = path.with_suffix(".old")  # a crash between the two renames of save_ckpt
    if not (path / "meta.json").exists():
        raise Fail(f"--resume: no checkpoint in {path}; run without --resume to start this step")
    saved = json.loads((path / "meta.json").read_text())
    diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if diff:
        raise Fail(f"--resume: {path} was written with other settings {diff} (saved, now); "
                   "pass the same flags as the interrupted run")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "rng": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    return saved["step"]


def export(model, scfg, tok, path):
    """The plain student folder (Student.save) that model.py loads without distributed code, with
    the tokenizer files beside it (as export.py writes them: sample.py and step 3 read them)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:  # the full dict lives on rank 0 only
        with torch.device("meta"):
            s = Student(scfg)
        s.load_state_dict({k.removeprefix("student."): v for k, v in sd.items()}, assign=True)
        s.save(path)
        for name, text in tokenizer_files(tok).items():
            (path / name).write_text(text)
    dist.barrier()


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def teacher_forward(teacher, x, step):
    """The frozen teacher on x: (hT (B·T, C) final-normed, WT (V, C), step 1's per-layer taps
    [(x, y_T)]), or Nones without a teacher. Leaves the root gathered, as the KL chunks read WT
    again in backward: teacher.reshard() after the backward."""
    if teacher is None:
        return None, None, None
    taps = [] if step == 1 else None
    teacher.unshard()
    h = teacher.hidden(x, taps)
    return teacher.norm(h).flatten(0, 1), teacher.lm_head.weight, taps


@torch.no_grad()
def evaluate(model, teacher, val, run, device):
    """Held-out metrics: student and teacher perplexity and ratio, token-mean KL(T‖S), top-1
    agreement (with the teacher; with the target token when there is none), step 1: per-layer
    alignment loss. Windows are split over ranks; every rank runs the same number of forwards."""
    rank, world, step = dist.get_rank(), dist.get_world_size(), run.step
    n = min((len(val) - 1) // run.ctx, run.eval_windows)  # the same number of forwards on every rank
    sums, align, n_batches = torch.zeros(5, device=device), 0, 0
    for x, y in data_lib.eval_windows(val, run.ctx, n - n % world, run.micro, rank, world):
        x, y = x.to(device), y.to(device)
        hT, WT, taps = teacher_forward(teacher, x, step)
        if step == 1:
            align = align + model(None, taps=taps).float()
        sums += model(x, y, hT, WT, stats=True).float()
        n_batches += 1
        if teacher is not None:
            teacher.reshard()
    dist.all_reduce(sums)
    nll_s, nll_t, kl, agree, n = sums.tolist()
    m = {"ppl_student": math.exp(nll_s / n), "top1_agree": agree / n, "eval_tokens": int(n)}
    if teacher is not None:
        m.update(ppl_teacher=math.exp(nll_t / n), kl=kl / n)
        m["ppl_ratio"] = m["ppl_student"] / m["ppl_teacher"]
    if step == 1:
        align = torch.as_tensor(align, device=device) / n_batches
        dist.all_reduce(align)
        align /= world
        m["align_loss_per_layer"] = [round(v, 5) for v in align.tolist()]
        m["align_loss"] = align.mean().item()
    return m


def table(step, first, last):
    """The student-vs-teacher table printed at the end of a step."""
    rows = [f"step {step} held-out eval ({last['eval_tokens']} tokens)       start        end"]
    for k, name in (("ppl_student", "student perplexity"), ("ppl_teacher", "teacher perplexity"),
                    ("ppl_ratio", "perplexity ratio S/T"), ("kl", "KL(T‖S) nats/token"),
                    ("top1_agree", "top-1 agreement" + ("" if "kl" in last else " (w/ target)")),
                    ("align_loss", "alignment loss (mean)")):
        if k in last:
            rows.append(f"  {name:<36}{first.get(k, float('nan')):>10.4g} {last[k]:>10.4g}")
    return "\n".join(rows)


# ---------------------------------------------------------------- one step of RADLADS

def micro_losses(model, teacher, x, y, step, accum):
    """Forward + backward of one micro-batch; returns its loss (detached)."""
    hT, WT, taps = teacher_forward(teacher, x, step)
    if step == 1:
        loss = model(None, taps=taps).mean()  # mean over layers of the per-layer token means
    else:
        loss = model(x, y, hT, WT)
    (loss / accum).backward()
    if teacher is not None:
        teacher.reshard()
    return loss.detach()


@dataclass
class Run:
    """The numbers of one step: the paper's defaults for it (STEPS), the CPU demo's, then the flags."""
    step: int
    ctx: int
    batch: int        # sequences per optimizer step, all devices together
    micro: int        # sequences per forward on one device
    accum: int        # micro-batches per device per step: batch = world · micro · accum
    lr: float
    lr_end: float
    total: int        # optimizer steps
    warmup: int
    ckpt_act: bool
    demo: bool
    eval_windows: int


def settings(args, step, world, n_params, cuda) -> Run:
    demo = not cuda and not args.bench and args.tokens is None and args.ctx is None and args.batch is None
    d = {**STEPS[step], **(DEMO[step] if demo else {"tokens": token_budget(step, n_params)})}
    ctx, batch = args.ctx or d["ctx"], args.batch or d["batch"]
    micro = min(args.micro_batch or (batch // world if demo else d["micro"]), max(batch // world, 1))
    if args.bench and not args.batch:  # time micro-batches, not accumulation
        batch = micro * world
    if batch % (world * micro):
        raise Fail(f"--batch {batch} must be a multiple of the {world} devices × --micro-batch {micro}")
    lr, lr_end = (args.lr, args.lr * d["lr_end"] / d["lr"]) if args.lr else (d["lr"], d["lr_end"])
    total = args.bench_steps if args.bench else max(1, math.ceil((args.tokens or d["tokens"]) / (batch * ctx)))
    # the paper's 50 warmup steps of ~6k; capped at a tenth of a short run so that it reaches its peak
    return Run(step, ctx, batch, micro, batch // (world * micro), lr, lr_end, total, min(WARMUP, total // 10),
               d["ckpt_act"] and not args.no_ckpt_act, demo, args.eval_windows or (16 if demo else 64))


def read_weights(args, step, device):
    """Rank 0: the teacher (not for step 3) and the student's starting point, full, on the CPU (bench:
    random weights made on the device), and the tokenizer: the teacher's, or for step 3 the one the
    previous step saved beside its student. Returns (teacher cfg, student cfg, size), (weights, Tok)."""
    tok = None
    if args.bench:
        torch.manual_seed(args.seed)
        with torch.device(device):
            t = Teacher(SHAPES[args.shape])
        s = Student.from_teacher(t, args.variant)
        scfg, ssd = s.cfg, s.state_dict()
    else:
        prev = Path(args.init or Path(args.out) / f"step{step - 1}" / "student")
        t, tok = teacher_lib.load_teacher(args.teacher) if step != 3 else (None, None)
        scfg, ssd = student_init(args, step, prev, t)
        tok = tok or teacher_lib.load_tokenizer(prev if (prev / "tokenizer.json").is_file() else args.teacher)
    n_params = sum(v.numel() for v in (t.parameters() if t is not None else ssd.values()))
    keep = t is not None and step != 3
    return (t.cfg if keep else None, scfg, n_params), (t.state_dict() if keep else {}, ssd, tok)


def open_data(args, run, tok, world):
    """Token files (the default corpus is prepared if missing), checked against the teacher's
    tokenizer on rank 0; every rank gets the error, if any. Returns (train Batches, val TokenData)."""
    path = Path(args.data or data_lib.DEFAULT_DIR)

    def check():
        t = tok
        if args.data is None and not (path / "meta.json").exists():
            print(f"preparing the default corpus into {path}")
            data_lib.prepare(data_lib.default_corpus(), t, path)
        data_lib.TokenData(path, "train").check_tokenizer(t)
        val = data_lib.TokenData(path, "val")
        if min((len(val) - 1) // run.ctx, run.eval_windows) < world:
            raise Fail(f"{path}: the held-out split has fewer windows of {run.ctx} tokens than the {world} "
                       "devices; lower --ctx or prepare the data with a larger --val-fraction")
        return None, None

    on_rank0(check)
    try:
        return data_lib.Batches(data_lib.TokenData(path, "train"), run.ctx, run.batch, args.seed), \
            data_lib.TokenData(path, "val")
    except data_lib.DataError as e:
        raise Fail(str(e)) from None


def run_step(args, step, rank, world, device):
    cuda = device.type == "cuda"
    out = Path(args.out) / f"step{step}"
    # --- build: full weights on rank 0 only; then the settings, which scale with the size
    (tcfg, scfg, n_params), big = on_rank0(lambda: read_weights(args, step, device))
    tsd, ssd, tok = big or ({}, {}, None)  # the other ranks receive the weights while sharding
    run = settings(args, step, world, n_params, cuda)
    if rank == 0:
        print(f"step {step}: {run.total} steps × {run.batch} seq × {run.ctx} tokens = "
              f"{run.total * run.batch * run.ctx / 1e6:.2f}M tokens, lr {run.lr:g}→{run.lr_end:g}, {world} device(s) "
              f"× micro-batch {run.micro} × {run.accum} accumulation, {'bf16/fp32 master' if cuda else 'fp32'}, "
              f"act-ckpt {run.ckpt_act}" + ("\nCPU demo: a few minutes to show the pipeline end to end, not a "
                                             "conversion (that is the GPU recipe: see README)" if run.demo else ""))
    batches, val = open_data(args, run, tok, world) if not args.bench else (None, None)
    # --- shard (bf16 compute, fp32 master weights on GPU), optimizer over the trainable ones only
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if cuda else MixedPrecisionPolicy()
    teacher = shard_teacher(tcfg, tsd, device, mp) if tcfg else None
    model = shard_student(scfg, ssd, step, device, mp, run.ckpt_act, cuda and args.compile, args.freeze_mlp)
    del tsd, ssd, big  # rank 0's full copies
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if args.bench:
        return bench(args, run, model, teacher, opt, tcfg or SHAPES[args.shape], scfg, device)
    meta = dict(step_kind=step, total=run.total, batch=run.batch, ctx=run.ctx, lr=run.lr, seed=args.seed,
                variant=scfg.variant, **({"freeze_mlp": True} if args.freeze_mlp else {}))  # older ckpts resume
    start = load_ckpt(out / "ckpt", model, opt, meta) if args.resume else 0
    first, last, s = train(args, run, model, teacher, opt, params, batches, val, out, meta, start, device)
    if s == run.total:
        export(model, scfg, tok, out / "student")
        if rank == 0:
            print(table(step, first, last) + f"\nstudent saved to {out / 'student'}")


def train(args, run, model, teacher, opt, params, batches, val, out, meta, start, device):
    """The loop, evaluation and checkpoint at the top of its body. Returns (first eval, last eval,
    the step it stopped at)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    first = last = None
    if start and rank == 0:  # resumed: drop what a killed run logged after its checkpoint
        recs = [json.loads(line) for line in (out / "log.jsonl").open()] if (out / "log.jsonl").exists() else []
        recs = [r for r in recs if r["step"] <= start]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        first = next((r["eval"] for r in recs if "eval" in r), None)
    log = open(out / "log.jsonl" if rank == 0 else os.devnull, "a", buffering=1)  # a line per record
    bar = tqdm(total=run.total, initial=start, disable=rank != 0, desc=f"step {run.step}", dynamic_ncols=True)
    with bar, log:
        for s in range(start, run.total + 1):
            done = s == run.total or s == args.stop_at
            if s == 0 or s > start and (s % args.eval_every == 0 or done):  # (a resumed start was done)
                last = evaluate(model, teacher, val, run, device)
                first = first or last
                log.write(json.dumps({"step": s, "eval": last}) + "\n")
                if rank == 0:
                    bar.write(f"eval at step {s}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                 if isinstance(v, float)))
            if s > start and (s % args.eval_every == 0 and s < run.total or s == args.stop_at):
                save_ckpt(out / "ckpt", model, opt, s, meta)
            if done:
                return first, last, s
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(s, run.total, run.warmup, run.lr, run.lr_end)
            x_all, y_all = batches.get(s, rank, world)  # this rank's rows of global batch s
            try:
                loss = sum(micro_losses(model, teacher, x.to(device), y.to(device), run.step, run.accum)
                           for x, y in zip(x_all.split(run.micro), y_all.split(run.micro))) / run.accum
            except torch.OutOfMemoryError:
                raise Fail(f"out of memory on rank {rank} in step {s} (micro-batch {run.micro} × ctx {run.ctx}): "
                           "lower --micro-batch (the global --batch stays, by accumulation)"
                           + ("" if run.ckpt_act else " or drop --no-ckpt-act"), local=True) from None
            dist.all_reduce(loss)  # the mean over ranks (gloo has no AVG)
            loss /= world
            if not torch.isfinite(loss):  # before the update: the weights and last checkpoint stay good
                raise Fail(f"loss is {loss.item()} at step {s} of step {run.step}; stopped before updating. Last "
                           f"good checkpoint: {out / 'ckpt'} (saved every --eval-every steps). Lower --lr, --resume")
            gnorm = nn.utils.clip_grad_norm_(params, 1.0)
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # DTensor under FSDP2
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec = {"step": s + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm.item(),
                   "tokens": (s + 1) * run.batch * run.ctx, "tok_s": run.batch * run.ctx / dt, "ms": 1e3 * dt}
            log.write(json.dumps(rec) + "\n")
            if rank == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_s']:.0f}")
                bar.update(1)


# ---------------------------------------------------------------- benchmark

def matmul_tflops(device):
    """The bf16 matmul ceiling of this device, measured now (8192³, do_bench median; BENCHMARKS.md)."""
    from triton.testing import do_bench  # GPU only
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / do_bench(lambda: a @ a, return_mode="median") / 1e9


def bench(args, run, model, teacher, opt, tcfg, scfg, device):
    """Tokens/s per device, peak memory and MFU of --bench-steps steps on random tokens.
    FLOPs per token (matmuls only; RWKV state updates and softmax are a few % and not counted):
      P_T, P_S = teacher / student matmul parameters (all Linear weights incl. lm_head),
      A = 2·L·ctx·H·N causal-attention FLOPs of the teacher per token,  VC = vocab × C.
      step 1: teacher trunk fwd 2(P_T − VC) + A, student time-mix fwd+bwd 6·P_tm
      step 2: teacher fwd 2·P_T + A + head recompute 2·VC, student fwd+bwd 6·P_S + recompute 2·P_S
      step 3: student 6·P_S + recompute 2·P_S
    (recompute: the blocks under activation checkpointing, the default, and the head chunks)."""
    rank, world, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    step, batch, micro, ctx = run.step, run.batch, run.micro, run.ctx
    lin = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))
    with torch.device("meta"):
        P_T, P_S = lin(Teacher(tcfg)), lin(Student(scfg))
        P_tm = sum(lin(b.time_mix) + sum(p.numel() for n, p in b.time_mix.named_parameters()
                                         if p.dim() == 2 and "proj" not in n) for b in Student(scfg).layers)
    VC, A = tcfg.vocab_size * tcfg.hidden_size, 2 * tcfg.n_layers * ctx * tcfg.n_heads * tcfg.head_dim
    flops = {1: 2 * (P_T - VC) + A + 6 * P_tm, 2: 2 * P_T + A + 2 * VC + 8 * P_S, 3: 8 * P_S}[step]
    formula = {1: "2(P_T-VC) + A + 6 P_tm", 2: "2 P_T + A + 2 VC + 8 P_S", 3: "8 P_S"}[step]
    ceiling = matmul_tflops(device) if cuda else float("nan")
    if cuda:  # the peak of training, not of building the full weights on the device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    times = []
    for s in range(args.bench_steps + 2):  # 2 warm-up steps (compile, allocator)
        x = torch.randint(0, tcfg.vocab_size, (batch // world, ctx + 1), generator=g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for xb in x.split(micro):
            micro_losses(model, teacher, xb[:, :-1].to(device), xb[:, 1:].to(device), step, run.accum)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sorted(times[2:])[len(times[2:]) // 2]
    tps = batch * ctx / dt / world
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    mfu = tps * flops / (ceiling * 1e12)
    if rank == 0:
        print(f"bench step {step} shape {args.shape}: {world} device(s), batch {batch} × ctx {ctx}, micro {micro}, "
              f"compile {cuda and args.compile}: "
              f"{tps:,.0f} tokens/s per device, {dt * 1e3:.0f} ms/step, peak memory {mem:.1f} GiB, "
              f"{flops / 1e9:.2f} GFLOP/token, matmul ceiling {ceiling:.0f} TFLOP/s, MFU {100 * mfu:.1f}%\n"
              f"  FLOP/token = {formula}: P_T {P_T / 1e6:.0f}M, P_S {P_S / 1e6:.0f}M, P_tm {P_tm / 1e6:.0f}M, "
              f"VC {VC / 1e6:.0f}M, A {A / 1e6:.0f}M (matmuls; see bench's docstring)")
    return {"tok_s_per_device": tps, "peak_gib": mem, "gflop_per_token": flops / 1e9, "mfu": mfu}


def main(argv=None):
    args = parse_args(argv)
    if args.deterministic:  # cuBLAS needs its workspace fixed before the first matmul; warn on ops without
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a deterministic kernel, don't stop
        torch.use_deterministic_algorithms(True, warn_only=True)
    rank, world, device = init_dist()
    try:
        if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Fail("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --backend torch")
        kernels.AUTO = args.backend
        for step in [args.step] if args.step else [1, 2, 3]:
            try:
                run_step(args, step, rank, world, device)
            except torch.OutOfMemoryError:  # outside the training loop: loading, sharding, evaluating
                raise Fail(f"out of memory on rank {rank} outside training in step {step}: use more GPUs (FSDP "
                           "shards the weights over them) or lower --micro-batch (also the eval's)", local=True)
    except Fail as e:
        if rank == 0 or e.local:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if e.local and world > 1:  # the other ranks wait in a collective: exit now, torchrun stops them
            os._exit(2)
        sys.exit(2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
