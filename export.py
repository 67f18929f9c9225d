"""Export a RADLADS student as a Hugging Face folder that loads with trust_remote_code.

    python export.py --ckpt out/rwkv7-init --out out/rwkv7-hf [--dtype bf16] [--retie] [--force]

then, anywhere with torch + transformers (no radlads checkout):

    model = AutoModelForCausalLM.from_pretrained("out/rwkv7-hf", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("out/rwkv7-hf")
    model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)

The folder holds config.json (auto_map + every StudentConfig field under `student`: variant, RoPE θ
and flag, LoRA ranks, ..., so nothing falls back to a default — the reference export silently
turned RoPE off and used the wrong θ, docs/method.md §12), model.safetensors (sharded with an index
above --max-shard-size), generation_config.json, the tokenizer (tokenizer.json, tokenizer_config.json
with the chat template and bos/eos, special_tokens_map.json) and the remote code, plain copies of this
checkout's files (one implementation):

  modeling_radlads.py   hf/modeling_radlads.py, the small PreTrainedModel/GenerationMixin wrapper
  radlads_model.py      model.py, whole       } with `from kernels import` -> `from .radlads_kernels
  radlads_kernels.py    kernels.py, whole     } import` (likewise model, teacher)
  radlads_teacher.py    teacher.py's RMSNorm, RoPE, Attention and MLP (TEACHER_PIECES), the modules
                        model.py builds on

transformers loads the folder as a package: it copies the files named in `from .x import` lines, and
refuses a file that imports a package which is not installed, unless the import is inside a try
block. So the shipped files import only the standard library, torch, safetensors and (the wrapper)
transformers, kernels.py imports triton inside try/except, and teacher.py's loaders (gguf, jinja2,
tokenizers) stay behind.

The checkpoint (a Student.save folder) has no tokenizer: it comes from --teacher (a teacher path as
in teacher.py; default the embedded SmolLM2) unless the checkpoint folder has its own tokenizer.json.

--retie: for teachers with tied embeddings, lm_head is tied to the embedding in the export (one
matrix, V·C fewer parameters: 28M of 163M for SmolLM2-135M). The student trained an untied head
(docs/method.md §2: tied embeddings train badly), so after training this changes the outputs: check
the exported model's perplexity before shipping it. At init (head = embedding copy) it is exact.

The files are written into a hidden folder beside --out (.NAME.PID.partial) and moved into --out
when all are written: a failed or killed export leaves a previous --out as it was. A checkpoint
whose weights hold NaN or inf (a diverged run, a damaged file) is refused, naming the tensor.
"""
import argparse
import inspect
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import data as data_lib
import model as model_lib
import teacher as teacher_lib
from model import MIXERS, Student, StudentConfig

REPO = Path(__file__).resolve().parent
PROJECT = ("model", "kernels", "teacher")   # the project files the shipped copies may import
# what model.py takes from teacher.py; the rest of teacher.py reads teacher files and tokenizers
# (gguf, jinja2, tokenizers), which the exported model does not need
TEACHER_PIECES = ("RMSNorm", "rope_inv_freq", "rope_cos_sin", "apply_rope", "Attention", "MLP")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """A checkpoint or output folder we cannot use; the message says what to do."""


@dataclass
class ExportConfig:
    ckpt: str                     # Student.save folder (config.json + model.safetensors)
    out: str                      # output folder
    dtype: str = "fp32"           # fp32 | bf16 weights (the recurrent state stays fp32)
    retie: bool = False           # tie lm_head to the embedding (teachers with tied embeddings)
    force: bool = False           # write into an existing, non-empty output folder
    max_shard_size: str = "5GB"   # shard model.safetensors above this (HF's default size)
    teacher: str | None = None    # tokenizer source when the checkpoint has none (default: embedded)


# ---------------------------------------------------------------- remote code: copies of our files

def relative_imports(name: str) -> str:
    """The project file `name` (model or kernels) with its imports of project files made relative:
    `from kernels import x` -> `from .radlads_kernels import x`."""
    src = (REPO / f"{name}.py").read_text()
    if re.search(rf"^\s*import ({'|'.join(PROJECT)})\b", src, flags=re.M):
        raise ExportError(f"{name}.py: write `from kernels import ...` rather than `import kernels` "
                          "(export.py ships project files as relative `from .radlads_x import` lines)")
    return (f"# Copied by radlads export.py from {name}.py; edit the project's file, not this copy.\n"
            + re.sub(rf"^(\s*)from ({'|'.join(PROJECT)}) import", r"\1from .radlads_\2 import", src, flags=re.M))


def teacher_pieces() -> str:
    """radlads_teacher.py: TEACHER_PIECES, copied from teacher.py (inspect.getsource)."""
    used = {n for n, obj in vars(model_lib).items()   # dunder globals: torch.compile's, not model.py's
            if inspect.getmodule(obj) is teacher_lib and not n.startswith("__")}
    if used - set(TEACHER_PIECES):
        raise ExportError(f"model.py uses {sorted(used - set(TEACHER_PIECES))} from teacher.py: "
                          "add them to export.TEACHER_PIECES")
    return ("# Copied by radlads export.py from teacher.py; edit the project's file, not this copy.\n"
            f'"""teacher.py\'s {", ".join(TEACHER_PIECES)}: what model.py builds on."""\n'
            "from __future__ import annotations   # `cfg: TeacherConfig` stays an unevaluated annotation\n\n"
            "import math\n\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
            + "\n\n\n".join(inspect.getsource(getattr(teacher_lib, n)).rstrip() for n in TEACHER_PIECES) + "\n")


def remote_code() -> dict[str, str]:
    """{file name: source} of the export folder's code: the wrapper, model.py, kernels.py and the
    pieces of teacher.py that model.py uses."""
    return {"modeling_radlads.py": (REPO / "hf" / "modeling_radlads.py").read_text(),
            "radlads_model.py": relative_imports("model"),
            "radlads_kernels.py": relative_imports("kernels"),
            "radlads_teacher.py": teacher_pieces()}


# ---------------------------------------------------------------- checkpoint, tokenizer, weights

def load_checkpoint(ckpt) -> Student:
    """A Student.save folder, or a folder this file exported (StudentConfig under `student`, weights
    under `model.`, maybe sharded or retied), with one-line errors for an unknown variant, a
    damaged file or weights that hold NaN or inf. Loads without transformers."""
    src = Path(ckpt)
    try:
        config = json.loads((src / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
    except (OSError, ValueError) as e:   # missing, not UTF-8, not JSON, not an object
        raise ExportError(f"{src}/config.json is missing or unreadable ({type(e).__name__}: {str(e)[:120]}): pass "
                          "a folder written by Student.save (model.py --out, distill.py) or by export.py") from None
    exported = "student" in config
    variant = (config["student"] if exported else config).get("variant")
    if variant not in MIXERS:
        raise ExportError(f"{src}: unknown student variant {variant!r}; this checkout knows {sorted(MIXERS)} "
                          "(model.py MIXERS): export it with the code that trained it")
    # export.py's files: keys under `model.`, maybe sharded; Student.save's: one file, plain keys
    files = sorted(src.glob("model*.safetensors")) if exported else [src / "model.safetensors"]
    if not files or not all(f.is_file() for f in files):
        raise ExportError(f"{src} has no model.safetensors: pass a folder written by Student.save "
                          "(model.py --out, distill.py) or by export.py")
    damaged = "model.safetensors is damaged or does not match config.json: save it again"
    sd = {}
    try:
        for f in files:
            sd |= {k.removeprefix("model."): v for k, v in load_file(str(f)).items()}
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{src}: cannot read {f.name} ({type(e).__name__}: {str(e)[:200]}); {damaged}") from None
    if "lm_head.weight" not in sd and "embed_tokens.weight" in sd:      # --retie exports
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    check_finite(sd, src)
    try:
        with torch.device("meta"):
            student = Student(StudentConfig.from_dict(config["student"] if exported else config))
        student.load_state_dict(sd, assign=True)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ExportError(f"{src}: cannot load the student ({type(e).__name__}: {str(e)[:200]}); {damaged}") from None
    student.init_buffers()
    return student


def check_finite(sd: dict[str, torch.Tensor], src):
    """Refuse weights that hold NaN or ±inf (a diverged run, a damaged file): they would load and
    export silently and generate garbage. Checked in slices, so that memory stays small."""
    for name, t in sd.items():
        flat = t.detach().reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i:i + (1 << 24)])).sum()) for i in range(0, len(flat), 1 << 24))
        if bad:
            raise ExportError(f"{src}: weight {name} holds {bad} NaN or inf value(s) of {t.numel()}; the run that "
                              "saved it diverged or the file is damaged: use an earlier checkpoint")


def load_tok(ckpt, teacher=None) -> teacher_lib.Tok:
    """The checkpoint's own tokenizer (tokenizer.json beside it), else the teacher's (default embedded)."""
    return teacher_lib.load_tokenizer(ckpt if (Path(ckpt) / "tokenizer.json").is_file() else teacher)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", s.upper())
    if not m:
        raise ExportError(f"--max-shard-size {s!r}: use a number with KB, MB or GB, e.g. 5GB")
    return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def write_weights(sd: dict[str, torch.Tensor], out: Path, max_bytes: int):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards, size = [{}], 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = t, size + n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(sd, str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map |= {k: name for k in shard}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def tokenizer_files(tok: teacher_lib.Tok) -> dict[str, str]:
    """tokenizer.json (+ a BOS post-processor when the teacher's prompts start with BOS, so that
    AutoTokenizer adds it as transformers' llama tokenizers do), tokenizer_config.json with the chat
    template, special_tokens_map.json."""
    from tokenizers import processors
    tk = tok.tokenizer
    token = lambda i: None if i is None else tk.id_to_token(i)  # noqa: E731
    if tok.add_bos and tk.post_processor is None:
        tk = tk.from_str(tk.to_str())
        bos = token(tok.bos_id)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    special = {"bos_token": token(tok.bos_id), "eos_token": token(tok.eos_id)}
    special = {k: v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": tok.add_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
              **({"chat_template": tok.chat_template} if tok.chat_template else {})}
    return {"tokenizer.json": tk.to_str(), "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False)}


def check_out(out: Path, force: bool):
    """--out: a new or empty folder (any folder with --force) that can be written; checked before loading."""
    if problem := data_lib.folder_problem(out):
        raise ExportError(problem)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to overwrite it "
                          "or choose another folder")


def commit(stage: Path, out: Path):
    """Move the files written to stage into out (made if missing), and remove the shards of a
    previous export that this one does not have; other files in out stay."""
    if not out.exists():
        stage.rename(out)
        return
    new = {f.name for f in stage.iterdir()}
    stale = [f for f in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]
             if f.name not in new]
    for f in stage.iterdir():
        os.replace(f, out / f.name)
    for f in stale:
        f.unlink()
    stage.rmdir()


def export(cfg: ExportConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise ExportError(f"--dtype {cfg.dtype!r}: use one of {sorted(DTYPES)}")
    out = Path(cfg.out)
    max_bytes = parse_size(cfg.max_shard_size)
    check_out(out, cfg.force)
    student = load_checkpoint(cfg.ckpt)
    tok = load_tok(cfg.ckpt, cfg.teacher)
    if tok.vocab_size > student.cfg.vocab_size:
        raise ExportError(f"the tokenizer ({tok.name}) has {tok.vocab_size} tokens but the student only "
                          f"{student.cfg.vocab_size}: pass the student's own teacher with --teacher")
    files = remote_code()
    stage = data_lib.stage_dir(out)
    try:
        write_folder(student, tok, cfg, files, stage, max_bytes)
        commit(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def write_folder(student: Student, tok: teacher_lib.Tok, cfg: ExportConfig, files: dict[str, str], out: Path,
                 max_bytes: int):
    """Weights, config.json, generation_config.json, the tokenizer and the remote code into out."""
    sd = {f"model.{k}": v.detach().to(DTYPES[cfg.dtype]).contiguous() for k, v in student.state_dict().items()}
    if cfg.retie:              # the embedding serves as the head; transformers ties it on load
        del sd["model.lm_head.weight"]
    write_weights(sd, out, max_bytes)
    dtype_name = str(DTYPES[cfg.dtype]).removeprefix("torch.")
    config = {"architectures": ["RadladsForCausalLM"], "model_type": "radlads",
              "auto_map": {"AutoConfig": "modeling_radlads.RadladsConfig",
                           "AutoModelForCausalLM": "modeling_radlads.RadladsForCausalLM"},
              "student": student.cfg.to_dict(), "tie_word_embeddings": cfg.retie,
              "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "dtype": dtype_name,
              "vocab_size": student.cfg.vocab_size, "radlads_tokenizer": tok.name}
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    files |= tokenizer_files(tok) | {"config.json": json.dumps(config, indent=2),
                                     "generation_config.json": json.dumps(gen, indent=2)}
    for name, text in files.items():
        (out / name).write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Student.save folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--retie", action="store_true", help="tie lm_head to the embedding (see the docstring)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty --out")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--teacher", default=None, help="tokenizer source if --ckpt has none (default: embedded)")
    try:
        out = export(ExportConfig(**vars(p.parse_args(argv))))
    except (ExportError, teacher_lib.TeacherError, OSError) as e:   # OSError: a full disk, say
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")



if __name__ == "__main__":
    main()
