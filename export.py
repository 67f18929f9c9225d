"""Export a RADLADS student as a Hugging Face folder that loads with trust_remote_code.

    python export.py --ckpt out/rwkv7-init --out out/rwkv7-hf [--dtype bf16] [--retie] [--force]

then, anywhere with torch + transformers (no radlads checkout):

    model = AutoModelForCausalLM.from_pretrained("out/rwkv7-hf", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("out/rwkv7-hf")
    model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)

The folder holds config.json (auto_map + every StudentConfig field under `student`: variant, RoPE θ
and flag, LoRA ranks, ..., so nothing falls back to a default — the reference export silently
turned RoPE off and used the wrong θ, METHOD §10), model.safetensors (sharded with an index above
--max-shard-size), generation_config.json, the tokenizer (tokenizer.json, tokenizer_config.json with
the chat template and bos/eos, special_tokens_map.json) and the remote code:

  modeling_radlads.py   hf/modeling_radlads.py, the small PreTrainedModel/GenerationMixin wrapper
  radlads_model.py      model.py          } copied from this checkout with imports made relative
  radlads_kernels.py    kernels.py        } (one source of truth); CLI entry points dropped
  radlads_teacher.py    the torch-only pieces model.py imports from teacher.py (inspect.getsource)

transformers demands every package a remote file imports outside try blocks, so the shipped files
import only the standard library, torch, safetensors, numpy and (the wrapper) transformers; an
optional package such as triton is imported inside try/except, and export checks this.

The checkpoint (a Student.save folder) has no tokenizer: it comes from --teacher (a teacher path as
in teacher.py; default the embedded SmolLM2) unless the checkpoint folder has its own tokenizer.json.

--retie: for teachers with tied embeddings, lm_head is tied to the embedding in the export (one
matrix, V·C fewer parameters: 28M of 163M for SmolLM2-135M). The student trained an untied head
(METHOD §2: tied embeddings train badly), so after training this changes the outputs: check the
exported model's perplexity before shipping it. At init (head = embedding copy) it is exact.
"""
import argparse
import ast
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import teacher as teacher_lib
from model import MIXERS, Student, StudentConfig

REPO = Path(__file__).resolve().parent
WRAPPER = REPO / "hf" / "modeling_radlads.py"
SHIPPED_PREFIX = "radlads_"
# what the shipped files may import outside try blocks (transformers' check_imports demands the rest)
ALLOWED_IMPORTS = {"torch", "safetensors", "numpy", "transformers", "__future__"} | set(sys.stdlib_module_names)
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


# ---------------------------------------------------------------- remote code from our sources

def _imports(tree: ast.AST):
    """Import nodes as transformers' get_imports sees them: everywhere except inside try blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Try):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _top_module(node) -> str | None:
    """The package an import statement needs (None: relative); `import a, b` counts as a's."""
    if isinstance(node, ast.ImportFrom):
        return None if node.level else node.module.split(".")[0]
    return node.names[0].name.split(".")[0]


def _packages(src: str) -> set[str]:
    """Every top-level package the file imports outside try blocks (transformers' rule)."""
    return {a.name.split(".")[0] if isinstance(n, ast.Import) else _top_module(n)
            for n in _imports(ast.parse(src)) for a in n.names} - {None}


def _local(node) -> str | None:
    """The project module an import names, dotted when it lives in a folder (a fork's mixer:
    examples.linear_attention); None for anything else."""
    name = (None if node.level else node.module) if isinstance(node, ast.ImportFrom) else node.names[0].name
    return name if name and _source(name).is_file() else None


def _source(mod: str) -> Path:
    return REPO / (mod.replace(".", "/") + ".py")


def _shipped(mod: str) -> str:
    """The file's name in the export: transformers copies one flat folder."""
    return SHIPPED_PREFIX + mod.replace(".", "_")


def _is_cli(node) -> bool:
    """`def main` and `if __name__ == "__main__":` — entry points that need the checkout."""
    if isinstance(node, ast.FunctionDef):
        return node.name == "main"
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def ship_source(name: str, src: str) -> tuple[str, dict[str, set[str]]]:
    """Rewrite a project module for the export folder. Returns the new source and the project
    modules it needs, each with the names taken from it. Edits: CLI entry points dropped;
    `from m import x` of a project module m -> `from .radlads_m import x`; `import m` ->
    `from .radlads_m import <used names>` with `m.x` -> `x` (transformers copies only the files
    named in `from .x import` lines); any other non-allowed import wrapped in try/except
    ImportError (raised again: same behaviour, but no longer a hard requirement of from_pretrained)."""
    raw = src.encode()
    tree = ast.parse(src)
    starts = [0] + [i + 1 for i, c in enumerate(raw) if c == ord("\n")]
    pos = lambda line, col: starts[line - 1] + col   # ast columns are utf-8 byte offsets
    cli = [node for node in tree.body if _is_cli(node)]
    edits = [(pos(min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]), 0),
              pos(n.end_lineno, n.end_col_offset), "") for n in cli]
    in_cli = lambda node: any(c.lineno <= node.lineno <= c.end_lineno for c in cli)  # noqa: E731
    needs: dict[str, set[str]] = {}
    for node in _imports(tree):
        mod, local = _top_module(node), _local(node)
        a, b = pos(node.lineno, node.col_offset), pos(node.end_lineno, node.end_col_offset)
        if in_cli(node):
            continue
        if local and isinstance(node, ast.ImportFrom):
            needs.setdefault(local, set()).update(n.name for n in node.names)
            names = ", ".join(n.name + (f" as {n.asname}" if n.asname else "") for n in node.names)
            edits.append((a, b, f"from .{_shipped(local)} import {names}"))
        elif local:
            if len(node.names) > 1 or "." in node.names[0].name:
                raise ExportError(f"{name}.py: cannot ship `{ast.unparse(node)}`; import one project module per line")
            alias = node.names[0].asname or mod
            refs = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id == alias and not in_cli(n)]
            needs.setdefault(mod, set()).update(n.attr for n in refs)
            edits.append((a, b, f"from .{_shipped(local)} import {', '.join(sorted({n.attr for n in refs}))}"))
            edits += [(pos(n.lineno, n.col_offset), pos(n.value.end_lineno, n.value.end_col_offset) + 1, "")
                      for n in refs]                                   # "kernels.rwkv7_attn" -> "rwkv7_attn"
        elif mod is not None and mod not in ALLOWED_IMPORTS:
            indent = " " * node.col_offset
            edits.append((a, b, f"try:  # optional: not a requirement of the exported model\n"
                                f"{indent}    {raw[a:b].decode()}\n{indent}except ImportError:\n{indent}    raise"))
    for a, b, text in sorted(edits, reverse=True):
        raw = raw[:a] + text.encode() + raw[b:]
    head = f"# Generated by radlads export.py from {name}.py; edit the project's sources, not this copy.\n"
    return head + raw.decode().rstrip() + "\n", needs


def ship_teacher_pieces(names: set[str]) -> str:
    """radlads_teacher.py: the torch-only objects of teacher.py that `names` need (inspect.getsource,
    following references to other teacher.py functions/classes), with the imports they use."""
    src_tree = ast.parse(inspect.getsource(teacher_lib))
    defined = {n.name: n for n in src_tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    todo, chosen = sorted(names), []
    while todo:
        n = todo.pop()
        if n in chosen:
            continue
        if n not in defined:
            raise ExportError(f"model.py imports {n!r} from teacher.py, which is not a function or class: "
                              "export.py ships only those; move it into model.py")
        chosen.append(n)
        todo += sorted(_used_names(defined[n]) & set(defined))
    pieces = [ast.get_source_segment(inspect.getsource(teacher_lib), defined[n]) for n in
              sorted(chosen, key=lambda n: defined[n].lineno)]
    used = set().union(*(_used_names(defined[n]) for n in chosen))
    imports = [ast.unparse(node) for node in src_tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and _top_module(node) in ALLOWED_IMPORTS
               and {(a.asname or a.name).split(".")[0] for a in node.names} & used]
    return ("# Generated by radlads export.py from teacher.py; edit the project's sources, not this copy.\n"
            f'"""The torch-only pieces of teacher.py that model.py uses: {", ".join(sorted(names))}."""\n'
            "from __future__ import annotations   # TeacherConfig annotations stay unevaluated\n\n"
            + "\n".join(imports) + "\n\n\n" + "\n\n\n".join(pieces) + "\n")


def _used_names(node) -> set[str]:
    """Names a def/class reads, ignoring annotations (unevaluated in the shipped file)."""
    skip = set()
    for n in ast.walk(node):
        for ann in ([n.annotation] if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation else []) + \
                   ([n.returns] if isinstance(n, ast.FunctionDef) and n.returns else []):
            skip |= {id(x) for x in ast.walk(ann)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}


def remote_code() -> dict[str, str]:
    """{file name: source} of everything the export folder needs besides the weights: the wrapper,
    model.py and the project modules it imports (teacher.py: only the pieces it uses)."""
    files = {"modeling_radlads.py": WRAPPER.read_text()}
    todo, teacher_names = ["model"], set()
    while todo:
        mod = todo.pop()
        if f"{_shipped(mod)}.py" in files:
            continue
        files[f"{_shipped(mod)}.py"], needs = ship_source(mod, _source(mod).read_text())
        teacher_names |= needs.pop("teacher", set())
        todo += sorted(needs)
    if teacher_names:
        files[f"{SHIPPED_PREFIX}teacher.py"] = ship_teacher_pieces(teacher_names)
    for fname, src in files.items():      # the promise: torch (+ stdlib, safetensors, numpy) only
        bad = _packages(src) - ALLOWED_IMPORTS
        if bad:
            raise ExportError(f"shipped {fname} would require {sorted(bad)}; import them inside try/except")
    return files


# ---------------------------------------------------------------- checkpoint, tokenizer, weights

def load_checkpoint(ckpt) -> Student:
    """A Student.save folder, or a folder this file exported (StudentConfig under `student`, weights
    under `model.`, maybe sharded or retied), with one-line errors for an unknown variant or a
    damaged file. Loads without transformers."""
    src = Path(ckpt)
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{src}/config.json is missing or unreadable ({e}): pass a folder written by "
                          "Student.save (model.py --out, distill.py) or by export.py") from None
    exported = "student" in config
    variant = (config["student"] if exported else config).get("variant")
    if variant not in MIXERS:
        raise ExportError(f"{src}: unknown student variant {variant!r}; this checkout knows {sorted(MIXERS)} "
                          "(model.py MIXERS): export it with the code that trained it")
    try:
        if not exported:
            return Student.load(src)
        sd = {}
        for f in sorted(src.glob("model*.safetensors")):
            sd |= {k.removeprefix("model."): v for k, v in load_file(str(f)).items()}
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))      # --retie exports
        with torch.device("meta"):
            student = Student(StudentConfig.from_dict(config["student"]))
        student.load_state_dict(sd, assign=True)
        student.init_buffers()
        return student
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ExportError(f"{src}: cannot load the student ({type(e).__name__}: {str(e)[:200]}); "
                          "model.safetensors is damaged or does not match config.json: save it again") from None


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


def prepare_out(out: Path, force: bool):
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} exists and is not empty; pass --force to overwrite it "
                              "or choose another folder")
        for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
            stale.unlink()     # a previous export may have had other shards
    out.mkdir(parents=True, exist_ok=True)


def export(cfg: ExportConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise ExportError(f"--dtype {cfg.dtype!r}: use one of {sorted(DTYPES)}")
    out = Path(cfg.out)
    max_bytes = parse_size(cfg.max_shard_size)
    student = load_checkpoint(cfg.ckpt)
    tok = load_tok(cfg.ckpt, cfg.teacher)
    if tok.vocab_size > student.cfg.vocab_size:
        raise ExportError(f"the tokenizer ({tok.name}) has {tok.vocab_size} tokens but the student only "
                          f"{student.cfg.vocab_size}: pass the student's own teacher with --teacher")
    files = remote_code()
    prepare_out(out, cfg.force)
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
    return out


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
    except (ExportError, teacher_lib.TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")



if __name__ == "__main__":
    main()
