"""RADLADS distillation: a softmax-attention teacher -> a RAD-RWKV student, in three steps.

RADLADS (arXiv 2505.03005), docs/method.md §6-§8:
  step 1  attention alignment (§6): each student time-mix reads the teacher's attention input of its
          layer; loss = mean over layers, batch and tokens of ‖y_T − y_S‖₂/√C; only time-mix trains.
  step 2  distillation (§7): online frozen teacher, token-mean KL(p_T‖p_S) over the full vocabulary,
          temperature 1; every student parameter trains.
  step 3  context extension (§8): cross-entropy only, at long context; no teacher is loaded.
Each step starts from the previous one's student in --out (out/step1/student -> step 2), or --init.
In this file `step` is always one of these three; one optimizer step is an `update`.

    python distill.py                                    # CPU: a short demo of steps 1, 2, 3
    python distill.py                                    # GPU: the embedded teacher converted (EMBEDDED)
    torchrun --nproc_per_node=8 distill.py --step 1 --teacher T --data D   # then --step 2, --step 3
    python distill.py --step 2 --resume                  # continue from out/step2/ckpt
    python distill.py --step 2 --overwrite               # start step 2 again, deleting the earlier run

Distribution is FSDP2 (docs/method.md §11): one fully_shard per block and a root, bf16 compute
with fp32 master weights on GPU, fp32 on CPU; the frozen teacher is its own sharded root.
Outputs per step in --out/stepN/: student/ (model.safetensors + config.json, read by model.py),
ckpt/ (torch.distributed.checkpoint, for --resume; trusted input, as it is unpickled) and
log.jsonl (every metric). A fresh run never writes over an earlier one, a resumed one refuses other
inputs, and a diverging one stops before it updates or saves the weights (docs/method.md §11).
Throughput on random weights is measured by `python bench.py train`, not here.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
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
from teacher import Teacher

# ---------------------------------------------------------------- the numbers of each step

# The paper's recipe at 7B (docs/method.md §6-§8). tokens: the 7B budget, scaled to the teacher by
# token_budget(). batch: sequences per update over all devices, reached by gradient accumulation
# of micro-batches, so that it does not depend on the number of GPUs. micro, ckpt_act: sequences
# per forward on one device and activation checkpointing; on a GPU fit_micro fills the memory
# instead (never below micro), on a CPU step_config takes the largest divisor of the per-device
# rows up to micro.
STEPS = {
    1: dict(tokens=100e6, ctx=512, batch=32, micro=8, lr=1e-3, lr_end=1e-5, ckpt_act=False),
    2: dict(tokens=500e6, ctx=512, batch=96, micro=8, lr=1e-5, lr_end=1e-5, ckpt_act=True),
    3: dict(tokens=100e6, ctx=16384, batch=96, micro=1, lr=1e-5, lr_end=1e-5, ckpt_act=True),
}
# Step 3's 96 sequences of 16k make 64 updates of its 100M tokens at 7B. A smaller budget (a smaller
# teacher, --tokens) or a ctx capped at the teacher's window takes fewer sequences per update, so
# that the step still makes at least this many updates (docs/method.md §8, §12).
STEP3_UPDATES = 60
WARMUP = 50            # updates, lr × (0.01 + 0.99·u/50) (docs/method.md §6)
PAPER_PARAMS = 7.6e9   # Qwen2.5-7B, the teacher the budgets above were measured on
# Activation memory of one training token, per block and channel of the student, in bytes: what
# torch.cuda.max_memory_allocated gave for RAD-RWKV7 at the SmolLM2-135M shape on an H200, eager (a
# compiled block keeps about a third less) (docs/results.md, Training throughput). With activation
# checkpointing a block keeps only its bf16 input, and one block at a time holds all of its own.
ACT_BYTES = 128
# The GPU default for the embedded teacher (`python distill.py` on a GPU without --teacher, --data,
# --tokens, --ctx or --batch): the conversion of docs/results.md, 9.5 minutes on one H200. Data: the
# shipped corpus and GEN_TOKENS sampled from the teacher (made once, into MIX_DIR). Step 2 and 3
# at a flat lr 1e-4, as a 135M student needs with few updates (docs/method.md §12).
EMBEDDED = {1: dict(tokens=2e6, batch=32),
            2: dict(tokens=16e6, batch=96, lr=1e-4, lr_end=1e-4),
            3: dict(tokens=1e6, ctx=4096, batch=8, lr=1e-4, lr_end=1e-4)}
GEN_TOKENS = 3e6
GEN_DIR, MIX_DIR = data_lib.DEFAULT_DIR.parent / "generated", data_lib.DEFAULT_DIR.parent / "default+generated"
# The CPU demo (`python distill.py` without a GPU, --tokens, --ctx or --batch): sized to show the
# pipeline end to end in minutes; it is not a conversion.
DEMO = {1: dict(tokens=20 * 8 * 128, ctx=128, batch=8),
        2: dict(tokens=15 * 4 * 128, ctx=128, batch=4),
        3: dict(tokens=10 * 2 * 256, ctx=256, batch=2)}


@dataclass
class StepConfig:
    """The numbers of one step, as step_config() settles them."""
    step: int         # 1, 2 or 3
    ctx: int          # tokens per sequence
    batch: int        # sequences per update, all devices together
    micro: int        # sequences per forward on one device
    accum: int        # micro-batches per device per update: batch = world · micro · accum
    lr: float         # peak learning rate
    lr_end: float     # at the last update (quarter cosine; flat when equal to lr)
    updates: int      # optimizer updates of the step
    warmup: int       # updates of linear warmup
    ckpt_act: bool    # activation checkpointing of every block
    compile: bool     # torch.compile of every block (teacher and student)
    demo: bool        # the CPU demo's sizes
    eval_windows: int  # held-out windows of ctx tokens per evaluation


def token_budget(step, n_params):
    """Training tokens for a teacher of n_params parameters. The paper's budgets scale down in
    proportion to the size (a smaller model has less to re-learn: tokens/param fixed), but not
    below a fifth of them: the time-mix LoRAs start from zero and need a minimum number of
    updates (a fifth of step 1 = 1.2k updates of 16k tokens), whatever the model size."""
    paper = STEPS[step]["tokens"]
    return int(max(paper / 5, paper * n_params / PAPER_PARAMS))


def multiples(n, world):
    """The multiples of world nearest n, for an error message: "30 or 36"."""
    lo = n - n % world
    return f"{lo} or {lo + world}" if lo else str(world)


def activation_bytes(scfg, ctx, ckpt_act):
    """Bytes of training activations per sequence of ctx tokens on one device (ACT_BYTES)."""
    L, C = scfg.n_layers, scfg.hidden_size
    return ctx * C * (ACT_BYTES + (2 * L if ckpt_act else ACT_BYTES * L))


def fit_micro(rows, ctx, scfg, free, ckpt_act, paper):
    """The micro-batch that fills a GPU with `free` bytes for activations. Activation checkpointing:
    ckpt_act when a flag set it; else none when all the rows fit without it (one forward per
    update), else the paper's choice for the step. Then the largest divisor of the rows whose
    activations fit, and at least the paper's micro-batch (activation_bytes errs on the large side:
    what fits by it surely fits). paper: the step's STEPS entry. Returns (micro, ckpt_act)."""
    fits = lambda m, ckpt: m * activation_bytes(scfg, ctx, ckpt) <= free  # noqa: E731
    if ckpt_act is None:
        ckpt_act = paper["ckpt_act"] and not fits(rows, False)
    micro = max(m for m in range(1, rows + 1) if rows % m == 0 and (m <= paper["micro"] or fits(m, ckpt_act)))
    return micro, ckpt_act


def embedded_default(args, cuda):
    """`python distill.py` on a GPU with the embedded teacher and nothing that sizes the run: EMBEDDED."""
    return cuda and not (args.teacher or args.data or args.tokens or args.ctx or args.batch)


def data_dir(args, cuda):
    """The token files a run reads: --data, MIX_DIR for the embedded default on a GPU, else the shipped
    corpus (data.py's DEFAULT_DIR)."""
    return Path(args.data) if args.data else MIX_DIR if embedded_default(args, cuda) else data_lib.DEFAULT_DIR


def step_config(args, step, world, n_params, cuda, window=None, scfg=None, free=None) -> StepConfig:
    """Every flag the user set wins; the rest comes from the paper (STEPS, its token budget scaled
    to the teacher), on a CPU without --tokens, --ctx or --batch from the demo (DEMO), on a GPU with
    the embedded teacher and none of them from its measured conversion (EMBEDDED). window:
    the teacher's context window, which a default ctx is capped at and --ctx may not pass. On a GPU
    (free: bytes of its memory for activations, scfg: the student's config) the micro-batch and
    activation checkpointing fill the memory (fit_micro) unless set."""
    demo, embedded = not cuda and args.tokens is None and args.ctx is None and args.batch is None, \
        embedded_default(args, cuda)
    d = {**STEPS[step], **(DEMO[step] if demo else EMBEDDED[step] if embedded else
                           {"tokens": token_budget(step, n_params)})}
    tokens, ctx = args.tokens or d["tokens"], args.ctx or d["ctx"]
    if window and ctx > window:
        if args.ctx:
            raise Fail(f"--ctx {ctx} is longer than the teacher's context window of {window} tokens: "
                       f"pass --ctx {window} or less")
        ctx = window
    batch = args.batch or d["batch"]
    if step == 3 and not (demo or embedded or args.batch):  # at least STEP3_UPDATES updates, a sequence per device
        batch = max(world, min(batch, int(tokens // (ctx * STEP3_UPDATES))) // world * world)
    if batch % world:
        what = f"--batch {batch}" if args.batch else f"step {step}'s default batch of {batch} sequences"
        raise Fail(f"{what} is not a multiple of the {world} devices: pass --batch {multiples(batch, world)}")
    rows = batch // world  # sequences per device and update
    ckpt_act, fill = args.ckpt_act, free is not None and not demo
    if args.micro_batch:   # as asked, or all the rows when it asks for more
        micro = min(args.micro_batch, rows)
        if rows % micro:
            *fits, last = [str(m) for m in range(1, rows + 1) if rows % m == 0]
            raise Fail(f"--micro-batch {micro} does not divide the {rows} sequences each device takes per update "
                       f"(--batch {batch}): pass --micro-batch {', '.join(fits)} or {last}")
        if fill and ckpt_act is None:
            ckpt_act = d["ckpt_act"] and micro * activation_bytes(scfg, ctx, False) > free
    elif fill:
        micro, ckpt_act = fit_micro(rows, ctx, scfg, free, ckpt_act, STEPS[step])
    else:  # the largest divisor of the rows up to the step's micro-batch (the demo: one forward per device)
        micro = max(m for m in range(1, min(rows, d["micro"] if not demo else rows) + 1) if rows % m == 0)
    # --lr moves the whole schedule: lr_end keeps its ratio to the peak, unless --lr-end sets it
    lr, lr_end = (args.lr, args.lr * d["lr_end"] / d["lr"]) if args.lr else (d["lr"], d["lr_end"])
    if args.lr_end:
        if args.lr_end > lr:
            raise Fail(f"--lr-end {args.lr_end:g} is above the peak lr {lr:g}: the schedule only decays; "
                       f"pass --lr-end {lr:g} or less")
        lr_end = args.lr_end
    updates = max(1, math.ceil(tokens / (batch * ctx)))
    # the paper's 50 warmup updates of ~6k; at most a tenth of a short run, so that it reaches its peak
    return StepConfig(step, ctx, batch, micro, rows // micro, lr, lr_end, updates,
                      min(WARMUP, updates // 10), d["ckpt_act"] if ckpt_act is None else ckpt_act,
                      cuda and args.compile is not False, demo,
                      args.eval_windows or max(16 if demo else 64, world))


# ---------------------------------------------------------------- command line

class Fail(Exception):
    """A problem the user can fix: printed as one line, exit code 2, no traceback. Printed by rank 0,
    or by the rank it happened on when `local` (the others may then wait on it)."""

    def __init__(self, msg, local=False):
        super().__init__(msg)
        self.local = local


def positive(kind):
    """An argparse type: a finite number of this kind above zero."""
    def parse(s):
        x = kind(s)
        if not (math.isfinite(x) and x > 0):
            raise argparse.ArgumentTypeError(f"{s} must be a finite number above zero")
        return x
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def seed_int(s):
    """An argparse type: a seed that torch and numpy both take."""
    x = int(s)
    if not 0 <= x < 2 ** 32:
        raise argparse.ArgumentTypeError(f"{s} must be an integer from 0 to 2^32 - 1")
    return x


seed_int.__name__ = "int"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", type=int, choices=(1, 2, 3), help="which step (default: 1, 2, 3 in turn)")
    p.add_argument("--teacher", help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", help=f"token files from data.py (default: {data_lib.DEFAULT_DIR})")
    p.add_argument("--out", default="out", help="run folder: stepN/{student,ckpt,log.jsonl}")
    p.add_argument("--init", help="with --step: student folder to start from instead of the previous step's; "
                   "'teacher': the teacher-initialised student (docs/method.md §2), i.e. skip the earlier steps "
                   "(an ablation)")
    p.add_argument("--variant", choices=sorted(MIXERS), help="student mixer (model.MIXERS; default rwkv7), "
                   "where a student is made from the teacher: step 1, or --init teacher")
    p.add_argument("--tokens", type=positive(float), help="training tokens (default: scaled to the teacher)")
    p.add_argument("--ctx", type=positive(int), help="tokens per sequence (at most the teacher's window)")
    p.add_argument("--batch", type=positive(int), help="sequences per update, over all GPUs")
    p.add_argument("--micro-batch", type=positive(int), help="sequences per forward on one device")
    p.add_argument("--lr", type=positive(float), help="peak learning rate (may change on --resume)")
    p.add_argument("--lr-end", type=positive(float), help="learning rate at the last update (quarter cosine "
                   "from the peak; default: the step's, in proportion to --lr)")
    p.add_argument("--freeze-mlp", action="store_true", help="steps 2, 3: train only the time-mix and norms; "
                   "MLPs, embeddings and lm_head stay as they are (an ablation)")
    p.add_argument("--eval-every", type=positive(int), default=500, help="updates between eval + checkpoint")
    p.add_argument("--eval-windows", type=positive(int), help="held-out windows of ctx tokens (64; CPU demo 16)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from --out/stepN/ckpt (a trusted folder: "
                       "its metadata is unpickled)")
    again.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out/stepN first "
                       "(without it, a fresh run refuses to write over one)")
    p.add_argument("--stop-at", type=positive(int), metavar="UPDATE",
                   help="stop after this update with a checkpoint (split a run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile every block (default: on a GPU; the first update compiles for a minute)")
    p.add_argument("--ckpt-act", action=argparse.BooleanOptionalAction,
                   help="activation checkpointing (default: on a GPU where a full micro-batch does not fit "
                        "without it, see fit_micro; on a CPU as the paper: steps 2 and 3)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernels.py backend of every time-mix (auto: triton on CUDA, torch elsewhere); "
                   "rerun with torch to check the Triton kernels on a real run")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (slower): repeated runs, and 1 vs N GPUs, comparable bit for bit")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """The flag combinations argparse cannot check; p.error exits 2 with the reason."""
    if args.init and not args.step:
        p.error("--init replaces the starting student of one step: pass --step too")
    if args.init == "teacher" and args.step == 3:
        p.error("--init teacher needs the teacher, which step 3 does not load: pass a student folder")
    if args.variant and args.step in (2, 3) and args.init != "teacher":
        p.error(f"--variant does not apply to step {args.step}, which continues its starting student's variant: "
                "drop --variant (it picks the mixer in step 1, or with --init teacher)")


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


# ---------------------------------------------------------------- build: full weights on rank 0

def start_point(args, step):
    """Where the step's student starts: None for the teacher (step 1, --init teacher), else the
    folder: --init, or the previous step's student in --out."""
    if (step == 1 and not args.init) or args.init == "teacher":
        return None
    return Path(args.init or Path(args.out) / f"step{step - 1}" / "student")


def first_line(e):
    """An exception as one short line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def check_student(src, step, args):
    """The starting student's config.json, read before any weights: it must exist, parse, and be of
    --variant when that is given."""
    if not (src / "config.json").is_file():
        first = "" if args.init else f"run `python distill.py --step {step - 1} --out {args.out}` first, or "
        raise Fail(f"no student in {src}: {first}pass --init DIR (a folder written by Student.save)")
    try:
        variant = json.loads((src / "config.json").read_text())["variant"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Fail(f"{src / 'config.json'} is not a student config ({first_line(e)}); pass a folder "
                   "written by Student.save or distill.py") from None
    if args.variant and variant != args.variant:
        raise Fail(f"{src} holds a {variant} student but --variant is {args.variant}: drop --variant, or "
                   f"start from a {args.variant} student")


def student_init(args, step, teacher):
    """(StudentConfig, full student state dict) on rank 0: from the teacher for step 1, else the
    previous step's folder (or --init), whose config check_start has read."""
    src = start_point(args, step)
    if src is None:
        torch.manual_seed(args.seed)
        s = Student.from_teacher(teacher, args.variant or "rwkv7")
    else:
        try:
            s = Student.load(src, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # damaged or foreign files
            raise Fail(f"cannot load the student in {src} ({first_line(e)}); pass a folder written by "
                       "Student.save or distill.py") from None
    if teacher is not None:  # a student from another teacher cannot be distilled against this one
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(s.cfg, f) != getattr(teacher.cfg, f):
                raise Fail(f"student {f}={getattr(s.cfg, f)} but teacher {f}={getattr(teacher.cfg, f)}: "
                           "the student was made from another teacher; pass the matching --teacher")
    return s.cfg, s.state_dict()


def read_weights(args, step):
    """Rank 0: the teacher (not for step 3) and the student's starting point, full, on the CPU, and
    the tokenizer: the teacher's, or for step 3 the one the previous step saved beside its student.
    Returns (teacher cfg, student cfg, size), (weights, Tok)."""
    t, tok = teacher_lib.load_teacher(args.teacher) if step != 3 else (None, None)
    scfg, ssd = student_init(args, step, t)
    src = start_point(args, step)
    tok = tok or teacher_lib.load_tokenizer(src if (src / "tokenizer.json").is_file() else args.teacher)
    n_params = sum(v.numel() for v in (t.parameters() if t is not None else ssd.values()))
    keep = t is not None and step != 3
    return (t.cfg if keep else None, scfg, n_params), (t.state_dict() if keep else {}, ssd, tok)


# ---------------------------------------------------------------- before loading: --out, and what a run reads

RUN_FILES = ("log.jsonl", "ckpt", "ckpt.old", "ckpt.tmp", "student")  # what a step writes in --out/stepN


def check_out(args, steps):
    """Rank 0, before anything is loaded: --out is a writable folder, and a fresh run never writes
    over an earlier one's checkpoint, log or student (--overwrite deletes them first)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise Fail(f"--out {out} is a file: pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise Fail(f"--out {out} is not a writable folder ({e.strerror}): pass another --out") from None
    if args.resume:
        return
    for step in steps:
        d = out / f"step{step}"
        found = [name for name in RUN_FILES if (d / name).exists()]
        if found and not args.overwrite:
            raise Fail(f"{d} holds an earlier run ({', '.join(found)}): pass --resume to continue it, another "
                       "--out, or --overwrite to replace it")
        for name in found:
            shutil.rmtree(d / name) if (d / name).is_dir() else (d / name).unlink()


def digest(paths):
    """A cheap identity of files of any size: their names, sizes and a sha256 over 256 blocks of
    4 KiB at evenly spaced offsets of each (the whole file when smaller). A copy has the same
    digest; weights trained or written again differ in some block. None when a file is missing."""
    h = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            return None
        size = path.stat().st_size
        h.update(f"{path.name} {size}\n".encode())
        with path.open("rb") as f:
            if size <= 256 * 4096:
                h.update(f.read())
                continue
            for i in range(256):
                f.seek(i * (size - 4096) // 255)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def fingerprints(args, step):
    """What a step reads, as digests recorded in its checkpoint: --resume refuses other inputs (the
    same flags on different files). data: the token files; teacher (steps 1, 2): its config,
    tokenizer and weight files; init: the starting student's files, or 'teacher'."""
    data = data_dir(args, torch.cuda.is_available())
    if data.is_dir():   # data.py's meta.json and token files, or Megatron train/val .bin/.idx
        files = sorted(f for f in data.iterdir() if f.suffix in (".json", ".bin", ".idx"))
    else:               # a Megatron prefix
        base = data.with_suffix("") if data.suffix in (".bin", ".idx") else data
        files = [Path(f"{base}.bin"), Path(f"{base}.idx")]
    fp = {"data": digest(files)}
    if step != 3:
        try:
            t = Path(args.teacher).expanduser() if args.teacher else teacher_lib.default_teacher_path()
        except teacher_lib.TeacherError as e:
            raise Fail(str(e)) from None
        fp["teacher"] = digest(sorted(f for f in t.iterdir() if f.suffix in (".json", ".safetensors"))
                               if t.is_dir() else [t])
    src = start_point(args, step)
    fp["init"] = "teacher" if src is None else digest([src / "config.json", src / "model.safetensors"])
    return fp


def usable_ckpt(out):
    """The step's checkpoint folder, or the one a crash between save_ckpt's renames left; None."""
    ckpt = out / "ckpt"
    for path in (ckpt, ckpt.with_suffix(".old")):
        if (path / "meta.json").is_file():
            return path
    return None


def resume_point(out):
    """usable_ckpt for --resume, or the Fail that says how to start instead."""
    path = usable_ckpt(out)
    if path is None:
        earlier = [name for name in RUN_FILES if (out / name).exists()]
        raise Fail(f"--resume: no checkpoint in {out / 'ckpt'}: start the step without --resume"
                   + (f", with --overwrite (the folder holds {', '.join(earlier)})" if earlier else ""))
    return path


def ckpt_meta(path):
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise Fail(f"--resume: {path / 'meta.json'} is unreadable ({first_line(e)}); the checkpoint is damaged: "
                   "start the step again with --overwrite") from None


def check_start(args, step):
    """Rank 0, before the step loads weights: the starting student's config (and --variant), and on
    --resume a checkpoint that exists and was written from the same inputs. Returns the inputs'
    fingerprints."""
    src = start_point(args, step)
    if src is not None:
        check_student(src, step, args)
    inputs = fingerprints(args, step)
    if args.resume:
        path = resume_point(Path(args.out) / f"step{step}")
        check_inputs(path, ckpt_meta(path).get("inputs"), inputs)
    return inputs


INPUTS = {"data": ("other token files", "--data"), "teacher": ("another teacher", "--teacher"),
          "init": ("another starting student", "--init")}


def check_inputs(path, saved, now):
    """Refuse to continue a checkpoint on other inputs. Checkpoints older than the fingerprints
    carry none and are not checked; an input not yet made (the default corpus) is checked later."""
    for k, v in now.items():
        if saved is not None and v is not None and saved.get(k) != v:
            what, flag = INPUTS[k]
            raise Fail(f"--resume: {path} was trained from {what} (digest {saved.get(k)}, now {v}): pass "
                       f"the {flag} of the interrupted run, or start the step again with --overwrite")


# ---------------------------------------------------------------- data

def default_data(tok, path, device):
    """Rank 0, no --data: the shipped corpus, prepared if missing; for the embedded default on a GPU
    (path MIX_DIR) also GEN_TOKENS sampled from the teacher on this GPU, and the two merged, each
    made once and kept for later runs."""
    if not (data_lib.DEFAULT_DIR / "meta.json").exists():
        print(f"preparing the default corpus into {data_lib.DEFAULT_DIR}")
        data_lib.prepare(data_lib.default_corpus(), tok, data_lib.DEFAULT_DIR)
    if path == MIX_DIR and not (MIX_DIR / "meta.json").exists():
        if not (GEN_DIR / "meta.json").exists():
            print(f"sampling {GEN_TOKENS:.0e} tokens from the teacher into {GEN_DIR} (docs/method.md §9)")
            data_lib.generate(None, int(GEN_TOKENS), GEN_DIR, batch=1024, seed=1, device=device)
        data_lib.merge([data_lib.DEFAULT_DIR, GEN_DIR], MIX_DIR)


def open_data(args, cfg, tok, world, device):
    """Token files (data_dir; the default ones are made if missing, default_data), checked against the
    teacher's tokenizer on rank 0; every rank gets the error, if any. Returns (train Batches, val
    TokenData)."""
    path = data_dir(args, device.type == "cuda")

    def check():
        t = tok
        if args.data is None:
            default_data(t, path, device)
        data_lib.TokenData(path, "train").check_tokenizer(t)
        val = data_lib.TokenData(path, "val")
        if cfg.eval_windows < world:  # every rank evaluates at least one window
            raise Fail(f"--eval-windows {cfg.eval_windows} is fewer than the {world} devices: pass --eval-windows "
                       f"{world} or more")
        if (len(val) - 1) // cfg.ctx < world:
            raise Fail(f"{path}: the held-out split holds {(len(val) - 1) // cfg.ctx} windows of {cfg.ctx} tokens, "
                       f"fewer than the {world} devices; lower --ctx or prepare the data with a larger "
                       "--val-fraction")
        return None, None

    on_rank0(check)
    try:
        return data_lib.Batches(data_lib.TokenData(path, "train"), cfg.ctx, cfg.batch, args.seed), \
            data_lib.TokenData(path, "val")
    except data_lib.DataError as e:
        raise Fail(str(e)) from None


# ---------------------------------------------------------------- the losses

def _logprobs(h, W):
    """log_softmax of the logits h Wᵀ in at least fp32: (m, C), (V, C) -> (m, V)."""
    z = h @ W.T
    return F.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def logit_grad(z, target):
    """One chunk of the head's loss and its gradient: student logits z (m, V) against the teacher's
    logits (m, V) or the next tokens (m,). Returns (Σ_rows loss, ∂loss/∂z (m, V)), in at least fp32:
    KL(q‖p) = Σ q (log q − log p) has ∂/∂z = p − q, and −log p_y has p − onehot(y)."""
    logp = F.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
    p = logp.exp()
    if target.dtype == torch.long:
        return -logp.gather(1, target[:, None]).sum(), p.scatter_add(1, target[:, None], -torch.ones_like(p[:, :1]))
    logq = F.log_softmax(target.to(logp.dtype), dim=-1)
    q = logq.exp()
    return (q * (logq - logp)).sum(), p - q


class HeadLoss(torch.autograd.Function):
    """Token-mean loss of the LM head whose gradients are made in the forward, chunk by chunk, from
    logit_grad: ∂/∂h = G W and ∂/∂W = Gᵀ h for each chunk's G = ∂loss/∂z, so that the (m, V) logits
    are computed once and never kept for a backward (docs/method.md §7)."""

    @staticmethod
    def forward(ctx, h, W, y, hT, WT, chunk, grad_fn):
        M = h.shape[0]
        need_h, need_W = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(W.dtype, torch.float32)   # ∂/∂W summed over the chunks in at least fp32
        dW = torch.zeros(W.shape, device=W.device, dtype=acc) if need_W else None
        loss = 0
        for i in range(0, M, chunk):
            j = slice(i, i + chunk)
            total, G = grad_fn(h[j] @ W.T, y[j] if hT is None else hT[j] @ WT.T)
            loss, G = loss + total, (G / M).to(h.dtype)
            if need_h:
                dh[j] = G @ W
            if need_W:
                dW += (G.T @ h[j]).to(dW.dtype)
        ctx.save_for_backward(dh, None if dW is None else dW.to(W.dtype))
        return loss / M

    @staticmethod
    def backward(ctx, grad):
        dh, dW = ctx.saved_tensors
        return (None if dh is None else dh * grad.to(dh.dtype), None if dW is None else dW * grad.to(dW.dtype),
                None, None, None, None, None)


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


def head_loss(h, W, y, hT=None, WT=None, stats=False, chunk=None, grad_fn=logit_grad):
    """Token-mean loss of the LM head on final-normed h (M, C): KL(p_T‖p_S) to the teacher's head
    (hT (M, C) final-normed, WT (V, C)), or cross-entropy on the targets y (M,) without one (HeadLoss;
    grad_fn: logit_grad, or a compiled copy of it); with stats=True the sums of _chunk_stats
    instead. In chunks of tokens so that no (M, V) fp32 logits exist: memory is one chunk's logits
    and their gradient (~512 MiB each at V=152k)."""
    M, chunk = h.shape[0], chunk or max(1, 2 ** 27 // W.shape[0])
    if not stats:
        return HeadLoss.apply(h, W, y, hT, WT, chunk, grad_fn)
    total = 0
    for i in range(0, M, chunk):
        j = slice(i, i + chunk)
        total = total + _chunk_stats(h[j], W, y[j], None if hT is None else hT[j], WT)
    return total


class Distill(nn.Module):
    """The student as the FSDP root, holding the embedding, final norm and lm_head, so that they are
    gathered once per micro-batch and their gradients reduced once. Its methods are the losses of
    the three steps; shard_student registers each as an FSDP forward."""
    LOSSES = ("alignment_loss", "distill_loss", "ce_loss", "eval_sums")

    def __init__(self, student, compile_=False):
        super().__init__()
        self.student = student
        self.grad_fn = torch.compile(logit_grad) if compile_ else logit_grad  # the head's elementwise work, fused

    def alignment_loss(self, taps):
        """Step 1 (docs/method.md §6). taps = the teacher's per-layer [(x, y_T)], each (B, T, C);
        y_S = the student's time-mix of that layer on the same x. Returns per layer ℓ the token mean
        of ‖y_T − y_S‖₂/√C: (L,)."""
        C = taps[0][0].shape[-1]
        ys = self.student.align([xt for xt, _ in taps])
        return torch.stack([((yt.float() - ys_.float()).norm(dim=-1) / C ** 0.5).mean()
                            for (_, yt), ys_ in zip(taps, ys)])

    def _normed_hidden(self, x):
        """x (B, T) -> the student's final-normed hidden state (B·T, C)."""
        h, _ = self.student.hidden(x)
        return self.student.norm(h).flatten(0, 1)

    def distill_loss(self, x, hT, WT):
        """Step 2 (docs/method.md §7): token-mean KL(p_T‖p_S) on x (B, T), the teacher's head given
        by hT (B·T, C) final-normed and WT (V, C)."""
        return head_loss(self._normed_hidden(x), self.student.lm_head.weight, None, hT, WT, grad_fn=self.grad_fn)

    def ce_loss(self, x, y):
        """Step 3 (docs/method.md §8): token-mean cross-entropy of the next tokens y (B, T)."""
        return head_loss(self._normed_hidden(x), self.student.lm_head.weight, y.flatten(), grad_fn=self.grad_fn)

    def eval_sums(self, x, y, hT=None, WT=None):
        """The held-out sums of _chunk_stats on x, y (B, T), against the teacher's head if given."""
        return head_loss(self._normed_hidden(x), self.student.lm_head.weight, y.flatten(), hT, WT, stats=True)


@torch.no_grad()
def teacher_forward(teacher, x, step):
    """The frozen teacher on x: (hT (B·T, C) final-normed, WT (V, C), step 1's per-layer taps
    [(x, y_T)]), or Nones without a teacher. Leaves the root gathered, as the student's head loss
    reads WT: teacher.reshard() after it."""
    if teacher is None:
        return None, None, None
    taps = [] if step == 1 else None
    teacher.unshard()
    h = teacher.hidden(x, taps)
    return teacher.norm(h).flatten(0, 1), teacher.lm_head.weight, taps


def forward_backward(model, teacher, x, y, step, accum):
    """One micro-batch of x, y (B, T): the teacher, the student's loss of this step, its backward
    (scaled by 1/accum: the update's gradient is the mean over micro-batches). Returns the loss,
    detached."""
    hT, WT, taps = teacher_forward(teacher, x, step)
    if step == 1:
        loss = model.alignment_loss(taps).mean()  # mean over layers of the per-layer token means
    elif step == 2:
        loss = model.distill_loss(x, hT, WT)
    else:
        loss = model.ce_loss(x, y)
    if teacher is not None:  # HeadLoss made its gradients in the forward: the backward reads no WT
        teacher.reshard()
    (loss / accum).backward()
    return loss.detach()


# ---------------------------------------------------------------- shard (FSDP2) and optimizer

def mixed_precision(device):
    """bf16 compute, fp32 master weights and gradient reduction on GPU; plain fp32 on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def shard_teacher(tcfg, sd, device, compile_=False):
    """The frozen teacher: built on meta, bf16 on GPU, each block compiled if asked and sharded,
    with its own root; never in the optimizer, run under torch.no_grad()."""
    mp = mixed_precision(device)
    with torch.device("meta"):
        t = Teacher(tcfg)
    t.requires_grad_(False)
    if device.type == "cuda":
        t.to(torch.bfloat16)  # frozen: no master weights to keep, bf16 storage is enough
    for block in t.layers:
        if compile_:
            block.compile()
        fully_shard(block, reshard_after_forward=True, mp_policy=mp)
    # Root = embed + final norm + lm_head (tied: one tensor). Kept gathered by an explicit
    # unshard() from the forward until the student's head loss has read lm_head.weight; reshard()
    # then, in each micro-batch.
    fully_shard(t, reshard_after_forward=False, mp_policy=mp)
    register_fsdp_forward_method(t, "hidden")
    t.to_empty(device=device)
    t.inv_freq = teacher_lib.rope_inv_freq(tcfg).to(device)  # non-persistent buffer
    set_model_state_dict(t, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return t.eval()


def recomputed(forward):
    """Activation checkpointing: forward keeps only its inputs and runs again in backward."""
    return lambda *args: checkpoint(forward, *args, use_reentrant=False)


def shard_student(scfg, sd, step, device, ckpt_act, compile_, freeze_mlp=False):
    """The student inside its Distill root, in the order FSDP2 needs: build on meta, requires_grad,
    activation checkpointing, compile, fully_shard bottom-up, to_empty, load (docs/method.md §11)."""
    mp = mixed_precision(device)
    with torch.device("meta"):
        model = Distill(Student(scfg), compile_)
    s = model.student
    # what trains is set before fully_shard, which copies requires_grad into the sharded parameters
    s.requires_grad_(step != 1)
    if freeze_mlp:
        for m in [s.embed_tokens, s.lm_head, *(blk.mlp for blk in s.layers)]:
            m.requires_grad_(False)
    units = [blk.time_mix for blk in s.layers] if step == 1 else list(s.layers)  # what the loss calls
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
    for name in Distill.LOSSES:  # each gathers the root's parameters, as forward would
        register_fsdp_forward_method(model, name)
    model.to_empty(device=device)
    s.init_buffers()  # RoPE inv_freq, non-persistent
    sd = {f"student.{k}": v for k, v in sd.items()}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def make_optimizer(model, lr):
    """AdamW over the trainable parameters only (docs/method.md §6): (those parameters, optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type == "cuda"  # one kernel for all the parameters instead of a few per tensor
    return params, torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=fused)


# ---------------------------------------------------------------- schedule

def lr_at(u, updates, warmup, lr, lr_end):
    """docs/method.md §6: quarter cosine lr → lr_end over the updates (flat when equal) and a
    linear warmup."""
    lr = lr_end + (lr - lr_end) * math.cos(math.pi / 2 * u / max(updates - 1, 1))
    return lr * (0.01 + 0.99 * u / warmup) if u < warmup else lr


# ---------------------------------------------------------------- evaluation

def perplexity(nll):
    """exp(token-mean NLL); inf for a diverged model, where math.exp would overflow (nan stays nan)."""
    return math.inf if nll > 709 else math.exp(nll)


@torch.no_grad()
def evaluate(model, teacher, val, cfg, device):
    """Held-out metrics: student and teacher perplexity and ratio, token-mean KL(T‖S), top-1
    agreement (with the teacher; with the target token when there is none), step 1: per-layer
    alignment loss. Windows are split over ranks; every rank runs the same number of forwards."""
    rank, world, step = dist.get_rank(), dist.get_world_size(), cfg.step
    n = min((len(val) - 1) // cfg.ctx, cfg.eval_windows)  # the same number of forwards on every rank
    sums, align, n_batches = torch.zeros(5, device=device), 0, 0
    for x, y in data_lib.eval_windows(val, cfg.ctx, n - n % world, cfg.micro, rank, world):
        x, y = x.to(device), y.to(device)
        hT, WT, taps = teacher_forward(teacher, x, step)
        if step == 1:
            align = align + model.alignment_loss(taps).float()
        sums += model.eval_sums(x, y, hT, WT).float()
        n_batches += 1
        if teacher is not None:
            teacher.reshard()
    dist.all_reduce(sums)
    nll_s, nll_t, kl, agree, n = sums.tolist()
    m = {"ppl_student": perplexity(nll_s / n), "top1_agree": agree / n, "eval_tokens": int(n)}
    if teacher is not None:
        m.update(ppl_teacher=perplexity(nll_t / n), kl=kl / n)
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


# ---------------------------------------------------------------- checkpoints and export
# log.jsonl records and the checkpoint's meta.json name the update count "step" (and the paper's
# step "step_kind"): the keys that existing logs, --resume and recipes/plot.py read.

def save_ckpt(path, model, opt, update, meta):
    """Model, optimizer, update (= data position) and RNG with torch.distributed.checkpoint, written
    to path.tmp and renamed: a crash mid-save leaves the previous checkpoint usable."""
    tmp, old = path.with_suffix(".tmp"), path.with_suffix(".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "rng": torch.get_rng_state()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": update}))
        if path.exists():
            path.rename(old)          # between these renames, old is the usable checkpoint
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_ckpt(out, model, opt, meta):
    """The update to continue from; model and optimizer state loaded in place from out/ckpt (or
    ckpt.old). Checkpoints are trusted input: DCP unpickles their .metadata. Every setting in meta
    must be as saved except lr: a new --lr continues the schedule at that peak (after a divergence)."""
    path = resume_point(out)
    saved = ckpt_meta(path)
    diff = {k: (saved.get(k), v) for k, v in meta.items() if k not in ("lr", "inputs") and saved.get(k) != v}
    if diff:
        raise Fail(f"--resume: {path} was written with other settings {diff} (saved, now); "
                   "pass the same flags as the interrupted run")
    check_inputs(path, saved.get("inputs"), meta["inputs"])
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "rng": torch.get_rng_state()}
    try:   # a failed read raises the same CheckpointException on every rank
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, dcp.CheckpointException) as e:  # truncated, missing or foreign files
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        raise Fail(f"--resume: cannot read the checkpoint {path} ({first_line(cause)}): it is damaged or "
                   "incomplete; start the step again with --overwrite") from None
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


# ---------------------------------------------------------------- the loop

def diverged(what, u, cfg, out):
    """The Fail of a non-finite loss, gradient norm or held-out perplexity. It is raised before the
    update or the save, so the last checkpoint, if any, holds weights that were still finite; the
    advice continues from it at a lower peak (load_ckpt accepts a new --lr)."""
    lower = f"--lr {cfg.lr / 10:g}"
    path = usable_ckpt(out)
    how = (f"continue from the last good checkpoint, {path} (update {ckpt_meta(path)['step']}), with the same "
           f"flags plus --resume {lower}" if path else
           f"no checkpoint was saved: start the step again with the same flags plus --overwrite {lower}")
    return Fail(f"{what} at update {u} of step {cfg.step}: training diverged and stopped before updating or "
                f"saving the weights; {how}")


def train(args, cfg, model, teacher, opt, params, batches, val, out, meta, start, device):
    """Updates start .. cfg.updates, with evaluation and checkpoint at the top of the loop body.
    Returns (first eval, last eval, the update it stopped at)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    first = last = None
    if start and rank == 0:  # resumed: drop what a killed run logged after its checkpoint
        recs = [json.loads(line) for line in (out / "log.jsonl").open()] if (out / "log.jsonl").exists() else []
        recs = [r for r in recs if r["step"] <= start]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        first = next((r["eval"] for r in recs if "eval" in r), None)
    log = open(out / "log.jsonl" if rank == 0 else os.devnull, "a", buffering=1)  # a line per record
    bar = tqdm(total=cfg.updates, initial=start, disable=rank != 0, desc=f"step {cfg.step}", dynamic_ncols=True)
    with bar, log:
        for u in range(start, cfg.updates + 1):
            done = u == cfg.updates or u == args.stop_at
            if u == 0 or u > start and (u % args.eval_every == 0 or done):  # (a resumed start was done)
                last = evaluate(model, teacher, val, cfg, device)
                first = first or last
                log.write(json.dumps({"step": u, "eval": last}) + "\n")
                if rank == 0:
                    bar.write(f"eval at update {u}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                   if isinstance(v, float)))
                if not math.isfinite(last["ppl_student"]):  # before saving or exporting these weights
                    if u == 0:
                        raise Fail(f"the starting student's held-out perplexity is {last['ppl_student']} before "
                                   "any update: its weights are broken; start from another student (--init)")
                    raise diverged(f"held-out perplexity is {last['ppl_student']}", u, cfg, out)
            if u > start and (u % args.eval_every == 0 and u < cfg.updates or u == args.stop_at):
                save_ckpt(out / "ckpt", model, opt, u, meta)
            if done:
                return first, last, u
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(u, cfg.updates, cfg.warmup, cfg.lr, cfg.lr_end)
            x_all, y_all = batches.get(u, rank, world)  # this rank's rows of global batch u
            try:
                loss = sum(forward_backward(model, teacher, x.to(device), y.to(device), cfg.step, cfg.accum)
                           for x, y in zip(x_all.split(cfg.micro), y_all.split(cfg.micro))) / cfg.accum
            except torch.OutOfMemoryError:
                raise Fail(f"out of memory on rank {rank} in update {u} of step {cfg.step} (micro-batch "
                           f"{cfg.micro} × ctx {cfg.ctx}): lower --micro-batch (the global --batch stays, by "
                           "accumulation)" + ("" if cfg.ckpt_act else " or pass --ckpt-act"), local=True) from None
            dist.all_reduce(loss)  # the mean over ranks (gloo has no AVG)
            loss /= world
            if not torch.isfinite(loss):  # before the update: the weights and last checkpoint stay good
                raise diverged(f"loss is {loss.item()}", u, cfg, out)
            gnorm = nn.utils.clip_grad_norm_(params, 1.0)
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # DTensor under FSDP2
            if not torch.isfinite(gnorm):  # clipping by a non-finite norm would poison every weight
                raise diverged(f"gradient norm is {gnorm.item()}", u, cfg, out)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec = {"step": u + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm.item(),
                   "tokens": (u + 1) * cfg.batch * cfg.ctx, "tok_s": cfg.batch * cfg.ctx / dt, "ms": 1e3 * dt}
            log.write(json.dumps(rec) + "\n")
            if rank == 0:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_s']:.0f}")
                bar.update(1)


# ---------------------------------------------------------------- one step of RADLADS

def describe(cfg, world, cuda):
    """The line printed before a step: its budget and how it is laid out on the devices."""
    return (f"step {cfg.step}: {cfg.updates} updates × {cfg.batch} seq × {cfg.ctx} tokens = "
            f"{cfg.updates * cfg.batch * cfg.ctx / 1e6:.2f}M tokens, lr {cfg.lr:g}→{cfg.lr_end:g}, {world} "
            f"device(s) × micro-batch {cfg.micro} × {cfg.accum} accumulation, "
            f"{'bf16/fp32 master' if cuda else 'fp32'}, act-ckpt {cfg.ckpt_act}, compile {cfg.compile}"
            + ("\nCPU demo: a few minutes to show the pipeline end to end, not a conversion "
               "(that is the GPU recipe: see README)" if cfg.demo else ""))


def activation_budget(device, scfg, teacher, step, world):
    """Bytes of GPU memory for activations, the same on every rank (the smallest): 90% of what is
    free (or held now by this process's tensors), less what training holds besides them, sharded
    over the world: the bf16 teacher (2 bytes per parameter; `teacher` parameters, 0 without one),
    the student's fp32 weights (4), the gradients and AdamW moments of what trains (12; step 1: the
    time-mix only); and unsharded, one gathered bf16 copy of the student (2) and 4 GiB for the LM
    head's chunks. None on a CPU."""
    if device.type != "cuda":
        return None
    with torch.device("meta"):
        s = Student(scfg)
    trains = [blk.time_mix for blk in s.layers] if step == 1 else [s]
    P_S, P_train = (sum(p.numel() for m in ms for p in m.parameters()) for ms in ([s], trains))
    held = (2 * teacher + 4 * P_S + 12 * P_train) / world + 2 * P_S + 2 ** 32
    mine = torch.cuda.memory_allocated(device)  # full weights on their way to be sharded (bench.py): not kept
    free = torch.tensor(0.9 * (torch.cuda.mem_get_info(device)[0] + mine) - held, device=device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return max(free.item(), 0.0)


def run_step(args, step, rank, world, device):
    cuda = device.type == "cuda"
    out = Path(args.out) / f"step{step}"
    # before any weights: the starting student's config, and on --resume the checkpoint's inputs
    inputs, _ = on_rank0(lambda: (check_start(args, step), None))
    # build: full weights on rank 0 only; then the step's numbers, which scale with the size
    (tcfg, scfg, n_params), big = on_rank0(lambda: read_weights(args, step))
    tsd, ssd, tok = big or ({}, {}, None)  # the other ranks receive the weights while sharding
    window = (tcfg or scfg).max_seq_len   # the student carries its teacher's window into step 3
    free = activation_budget(device, scfg, n_params if tcfg else 0, step, world)
    cfg = step_config(args, step, world, n_params, cuda, window, scfg, free)
    if rank == 0:
        print(describe(cfg, world, cuda))
        if not args.ctx and not cfg.demo and cfg.ctx < STEPS[step]["ctx"]:
            print(f"ctx {cfg.ctx}: the teacher's context window, shorter than the paper's {STEPS[step]['ctx']}")
    batches, val = open_data(args, cfg, tok, world, device)  # before the sharding
    if inputs["data"] is None:  # the default corpus was prepared just now
        inputs, _ = on_rank0(lambda: (fingerprints(args, step), None))
    # shard, then the optimizer over the trainable parameters only
    teacher = shard_teacher(tcfg, tsd, device, cfg.compile) if tcfg else None
    model = shard_student(scfg, ssd, step, device, cfg.ckpt_act, cfg.compile, args.freeze_mlp)
    del tsd, ssd, big  # rank 0's full copies
    params, opt = make_optimizer(model, cfg.lr)
    meta = dict(step_kind=step, total=cfg.updates, batch=cfg.batch, ctx=cfg.ctx, lr=cfg.lr, seed=args.seed,
                variant=scfg.variant, **({"freeze_mlp": True} if args.freeze_mlp else {}),  # older ckpts resume
                inputs=inputs)
    start = load_ckpt(out, model, opt, meta) if args.resume else 0
    first, last, u = train(args, cfg, model, teacher, opt, params, batches, val, out, meta, start, device)
    if u == cfg.updates:
        export(model, scfg, tok, out / "student")
        if rank == 0:
            print(table(step, first, last) + f"\nstudent saved to {out / 'student'}")


def pin_backend(backend, device):
    """--backend: the kernels.py backend of every time-mix for the whole run (auto: per call)."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Fail("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --backend torch")
    kernels.AUTO = backend


def main(argv=None):
    args = parse_args(argv)
    if args.deterministic:  # cuBLAS needs its workspace fixed before the first matmul; warn on ops without
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a deterministic kernel, don't stop
        torch.use_deterministic_algorithms(True, warn_only=True)
    rank, world, device = init_dist()
    steps = [args.step] if args.step else [1, 2, 3]
    try:
        pin_backend(args.backend, device)
        for step in steps:  # the batch flags against the device count, before anything is loaded
            step_config(args, step, world, PAPER_PARAMS, device.type == "cuda")
        on_rank0(lambda: (check_out(args, steps), None))
        for step in steps:
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
