"""How close is a converted student to its teacher? Held-out numbers on any token sets.

    python evaluate.py --student out/step2/student --data data/default                 # default teacher
    python evaluate.py --student out/step3/student --teacher path/to/model --data data/a data/b --json eval.json

For each --data folder (data.py token files; the held-out "val" split) two kinds of numbers:

  windows        the first --windows windows of --ctx tokens (data.eval_windows): student and teacher
                 perplexity and their ratio S/T, token-mean KL(p_T‖p_S) and top-1 agreement (student
                 argmax == teacher argmax). These are distill.py's in-training eval numbers, computed by
                 the same code (distill.Distill.eval_sums → distill.head_loss with stats=True, chunked
                 over tokens so that no (tokens, V) fp32 logits of both models exist).
  continuations  --prompts prompts of --prompt-len tokens from the val split (evenly spaced, not
                 overlapping); the student and the teacher each continue every prompt greedily for
                 --new-tokens tokens (sample.py's decoders: the student's recurrent state, the
                 teacher's KV cache). The teacher then scores both: cont_ppl_student = exp(the
                 teacher's mean NLL of the student's new tokens, given the prompt and the earlier new
                 tokens), cont_ppl_teacher = the same for its own greedy tokens (what a perfect student
                 would get). cont_prefix_match = mean length of the common prefix of the two greedy
                 continuations / --new-tokens.

One process, one device (cuda if available), no torch.distributed. --dtype bf16 casts the weights of
both models; the student's recurrent state and every loss stay fp32. Prints a table per data set and
writes every number to --json. main(argv) returns the same dict, for scripts:
{"student", "teacher", "ctx", ..., "sets": {folder name: {"ppl_student", "ppl_teacher", "ppl_ratio",
"kl", "top1_agree", "eval_tokens", "cont_ppl_student", "cont_ppl_teacher", "cont_prefix_match"}}}.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data as data_lib
import teacher as teacher_lib
from distill import Distill, head_loss, positive
from export import ExportError, load_checkpoint, load_tok
from sample import SampleConfig, StudentDecoder, TeacherDecoder, generate


class EvalError(ValueError):
    """A problem the user can fix: printed as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a Student.save folder (distill.py out/stepN/student) "
                                                    "or an export.py folder")
    p.add_argument("--teacher", help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", required=True, nargs="+", help="token folders from data.py (their val split)")
    p.add_argument("--ctx", type=positive(int), default=512, help="tokens per window")
    p.add_argument("--windows", type=positive(int), default=64, help="held-out windows per data set")
    p.add_argument("--batch", type=positive(int), default=8, help="windows (and prompts) per forward")
    p.add_argument("--prompts", type=positive(int), default=50, help="prompts per data set")
    p.add_argument("--prompt-len", type=positive(int), default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=positive(int), default=64, help="greedy tokens per continuation")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights of both models")
    p.add_argument("--json", help="write every number to this file")
    return p.parse_args(argv)


# ---------------------------------------------------------------- loading and checks

def load_models(args, device, dtype):
    """(student, teacher, teacher's Tok), both frozen, on device in dtype; checks that they fit."""
    student = load_checkpoint(args.student).to(device, dtype).eval().requires_grad_(False)
    student.init_buffers()                               # RoPE inv_freq back in fp32 after .to(dtype)
    teacher, tok = teacher_lib.load_teacher(args.teacher, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise EvalError(f"the student has a vocabulary of {student.cfg.vocab_size}, the teacher {tok.name} "
                        f"{teacher.cfg.vocab_size}: pass the student's own teacher with --teacher")
    own = load_tok(args.student, args.teacher)           # an export folder's tokenizer.json, else the teacher's
    if own.fingerprint != tok.fingerprint:
        raise EvalError(f"the student's tokenizer ({own.name}) differs from the teacher's ({tok.name}): "
                        "pass the student's own teacher with --teacher")
    return student, teacher, tok


def open_val(path, args) -> data_lib.TokenData:
    """The val split of a token folder, checked to hold the windows and the prompts asked for."""
    val = data_lib.TokenData(path, "val")
    if len(val) == 0:
        raise EvalError(f"--data {path} has no val split: make one with python data.py --val-fraction 0.05 "
                        f"--out {path}")
    n, have = len(val), (len(val) - 1) // args.ctx
    if have < args.windows:
        fix = f"lower --windows to {have}" if have else f"lower --ctx to {n - 1} or less"
        raise EvalError(f"--data {path}: its val split has {n} tokens, {have} windows of --ctx {args.ctx} "
                        f"(+1 target): {fix}")
    if n // args.prompts < args.prompt_len:
        raise EvalError(f"--data {path}: its val split has {n} tokens, too few for {args.prompts} prompts of "
                        f"{args.prompt_len}: lower --prompts to {n // args.prompt_len} or --prompt-len")
    return val


# ---------------------------------------------------------------- the two kinds of numbers

@torch.no_grad()
def window_metrics(student, teacher, val, ctx, windows, batch, device) -> dict:
    """distill.evaluate's numbers on one device: perplexities, ratio, KL(T‖S), top-1 agreement."""
    model = Distill(student)                             # hidden → norm → head_loss, as in training
    sums = torch.zeros(5, dtype=torch.float64)
    for x, y in tqdm(data_lib.eval_windows(val, ctx, windows, batch), total=math.ceil(windows / batch),
                     desc=f"{val.path.name} windows", leave=False):
        x, y = x.to(device), y.to(device)
        hT = teacher.norm(teacher.hidden(x)).flatten(0, 1)                      # (B·T, C)
        sums += model.eval_sums(x, y, hT, teacher.lm_head.weight).double().cpu()
    nll_s, nll_t, kl, agree, n = sums.tolist()
    ppl_s, ppl_t = math.exp(nll_s / n), math.exp(nll_t / n)
    return {"ppl_student": ppl_s, "ppl_teacher": ppl_t, "ppl_ratio": ppl_s / ppl_t, "kl": kl / n,
            "top1_agree": agree / n, "eval_tokens": int(n)}


def prompts_from(val, n, length) -> torch.Tensor:
    """n prompts (n, length) at evenly spaced, non-overlapping starts 0, s, 2s, ... (s = len // n)."""
    starts = np.arange(n) * (len(val) // n)
    return torch.from_numpy(np.stack([val.tokens[s:s + length] for s in starts]).astype(np.int64))


@torch.no_grad()
def continuation_nll(teacher, prompt, new):
    """The teacher's summed NLL of the new tokens (B, n) after prompt (B, P), and their count: one
    plain forward over prompt + new[:, :-1]; positions P-1 .. P+n-2 predict the new tokens."""
    h = teacher.hidden(torch.cat([prompt, new[:, :-1]], 1))[:, prompt.shape[1] - 1:]      # (B, n, C)
    sums = head_loss(teacher.norm(h).flatten(0, 1), teacher.lm_head.weight, new.flatten(), stats=True)
    return sums[0].item(), int(sums[4])


def prefix_match(a, b) -> torch.Tensor:
    """Per row, how many leading tokens of a and b (B, n) agree."""
    return (a == b).long().cumprod(1).sum(1)


@torch.no_grad()
def continuation_metrics(student, teacher, prompts, new_tokens, batch, device) -> dict:
    cfg = SampleConfig(temperature=0, max_new_tokens=new_tokens)                 # greedy; no EOS stop
    nll_s = nll_t = n = matched = 0
    for i in range(0, len(prompts), batch):
        p = prompts[i:i + batch].to(device)
        new_s, _ = generate(StudentDecoder(student), p, cfg)                      # (B, new_tokens)
        new_t, _ = generate(TeacherDecoder(teacher, len(p), p.shape[1] + new_tokens), p, cfg)
        (a, k), (b, _) = continuation_nll(teacher, p, new_s), continuation_nll(teacher, p, new_t)
        nll_s, nll_t, n = nll_s + a, nll_t + b, n + k
        matched += prefix_match(new_s, new_t).sum().item()
    return {"cont_ppl_student": math.exp(nll_s / n), "cont_ppl_teacher": math.exp(nll_t / n),
            "cont_prefix_match": matched / n}


# ---------------------------------------------------------------- report

ROWS = (("ppl_student", "student perplexity", ".4g"), ("ppl_teacher", "teacher perplexity", ".4g"),
        ("ppl_ratio", "perplexity ratio S/T", ".4g"), ("kl", "KL(T‖S) nats/token", ".4f"),
        ("top1_agree", "top-1 agreement with the teacher", ".2%"),
        ("cont_ppl_student", "teacher ppl of student continuations", ".4g"),
        ("cont_ppl_teacher", "teacher ppl of its own (perfect student)", ".4g"),
        ("cont_prefix_match", "greedy prefix match with the teacher", ".2%"))


def table(name, m, args) -> str:
    rows = [f"{name}: {m['eval_tokens']:,} tokens in {args.windows} windows of {args.ctx}; "
            f"{args.prompts} prompts of {args.prompt_len} + {args.new_tokens} greedy tokens"]
    rows += [f"  {label:<42}{m[k]:>10{fmt}}" for k, label, fmt in ROWS]
    return "\n".join(rows)


def pick_device(name: str) -> torch.device:
    """--device: auto (cuda if available, else cpu) or a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise EvalError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found); "
                        "use auto or cpu")
    return device


def check_json_path(path):
    """--json: a file path whose folder exists and can be written (checked before anything loads)."""
    p = Path(path)
    if p.is_dir():
        raise EvalError(f"--json {p} is a folder; pass a file path such as {p / 'eval.json'}")
    folder = p.absolute().parent
    if not folder.is_dir():
        raise EvalError(f"--json {p}: {folder} " + ("is a file, not a folder" if folder.exists() else "does not exist")
                        + "; pass a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise EvalError(f"--json {p} cannot be written; pass a path you can write to")


def write_json(path, result: dict):
    """The result written beside path and renamed onto it: a crash never leaves half a file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate(args) -> dict:
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if not Path(args.student).is_dir():                  # the cheap checks first, before loading weights
        raise EvalError(f"--student {args.student}: no such folder; pass a Student.save folder "
                        "(distill.py out/stepN/student) or an export.py folder")
    if args.json:
        check_json_path(args.json)
    vals = {d: open_val(d, args) for d in args.data}
    student, teacher, tok = load_models(args, device, dtype)
    for val in vals.values():
        val.check_tokenizer(tok)
    result = {"student": str(args.student), "teacher": tok.name, "ctx": args.ctx, "windows": args.windows,
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "device": str(device), "dtype": args.dtype, "sets": {}}
    for d, val in vals.items():
        name = Path(d).name if Path(d).name not in result["sets"] else str(d)   # two folders named alike
        t0 = time.perf_counter()
        m = window_metrics(student, teacher, val, args.ctx, args.windows, args.batch, device)
        m |= continuation_metrics(student, teacher, prompts_from(val, args.prompts, args.prompt_len),
                                  args.new_tokens, args.batch, device)
        m["seconds"] = round(time.perf_counter() - t0, 2)
        result["sets"][name] = m
        print(table(name, m, args), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (EvalError, data_lib.DataError, ExportError, teacher_lib.TeacherError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
