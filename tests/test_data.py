"""Tests of data.py: tokenisation against `tokenizers` directly, a Megatron bin/idx file written
byte by byte here, held-out documents that no train window reaches in any input format, batch
determinism over world sizes, exact resume, epochs without repeats, a failed run that leaves the
previous folder as it was, every bad input (one-line DataError; the CLI exits 2), and text sampled
from the teacher: its seeds against the chat template, its draws against a plain forward's softmax
at the temperature, EOS cuts, dropped duplicates.

    python -m pytest -x -q tests/test_data.py
"""
import hashlib
import json
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
from conftest import ROOT
from data import Batches, DataError, TokenData, eval_windows, list_files, prepare

CORPUS = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
          "Rough winds do shake the darling buds of May,\n\nAnd summer's lease hath all too short a date.",
          "Ünïcødé — naïve café, 東京, emoji 🙂 and tabs\tand  double  spaces.\n"]


def make_tok(vocab_size=None, name="tiny-bpe"):
    """A small byte-level BPE trained here, wrapped like teacher.Tok (the fields data.py uses)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fingerprint = hashlib.sha256((t.to_str() + name).encode()).hexdigest()
    return SimpleNamespace(tokenizer=t, eos_id=t.token_to_id("<eos>"), bos_id=None, name=name,
                           fingerprint=fingerprint, vocab_size=vocab_size or t.get_vocab_size())


@pytest.fixture(scope="module")
def tok():
    return make_tok()


def reference_ids(tok, texts):
    """Documents tokenised one by one with `tokenizers`, each followed by EOS."""
    return [tok.tokenizer.encode(t, add_special_tokens=False).ids + [tok.eos_id] for t in texts]


def write_inputs(root):
    """a.txt, b.jsonl and a directory (c.txt, sub/d.jsonl, a hidden file); returns (inputs, docs)."""
    (root / "a.txt").write_text(CORPUS[0], encoding="utf-8")
    b = [json.dumps({"text": CORPUS[1]}), "", json.dumps({"text": "", "id": 3}),
         json.dumps({"text": CORPUS[2], "meta": {"x": 1}}, ensure_ascii=False)]
    (root / "b.jsonl").write_text("\n".join(b) + "\n", encoding="utf-8")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "c.txt").write_text("Third file.\nWith two lines.", encoding="utf-8")
    (root / "dir" / "sub" / "d.jsonl").write_text(
        json.dumps({"text": "Doc D one."}) + "\n" + json.dumps({"text": "Doc D two!"}) + "\n")
    (root / "dir" / ".hidden").write_bytes(b"\x00\x01 not read")
    docs = [("a.txt", CORPUS[0]), ("b.jsonl:1", CORPUS[1]), ("b.jsonl:4", CORPUS[2]),
            ("c.txt", "Third file.\nWith two lines."), ("d.jsonl:1", "Doc D one."), ("d.jsonl:2", "Doc D two!")]
    return [root / "a.txt", root / "b.jsonl", root / "dir"], docs


def test_tokenise_equals_tokenizers(tmp_path, tok):
    inputs, docs = write_inputs(tmp_path)
    meta = prepare(list_files(inputs), tok, tmp_path / "out", val_fraction=0, progress=False)
    want = np.concatenate(reference_ids(tok, [t for _, t in docs]))
    got = np.fromfile(tmp_path / "out" / "train.bin", np.uint16)
    assert meta["dtype"] == "uint16" and np.array_equal(got, want)
    assert meta["splits"]["train"] == {"file": "train.bin", "tokens": len(want), "documents": 6}
    assert meta["splits"]["val"]["tokens"] == 0 and len(TokenData(tmp_path / "out", "val")) == 0


def test_val_split_holds_whole_documents(tmp_path, tok):
    inputs, docs = write_inputs(tmp_path)
    meta = prepare(list_files(inputs), tok, tmp_path / "out", val_fraction=0.3, seed=1, progress=False)
    held = set(meta["splits"]["val"]["names"])
    ids = dict(zip([n for n, _ in docs], reference_ids(tok, [t for _, t in docs])))
    assert 0 < len(held) < len(docs)
    for split, names in (("val", [n for n, _ in docs if n in held]), ("train", [n for n, _ in docs if n not in held])):
        got = TokenData(tmp_path / "out", split).tokens
        assert np.array_equal(got, np.concatenate([ids[n] for n in names])), split
    n_val = meta["splits"]["val"]["tokens"]
    assert n_val >= 0.3 * (n_val + meta["splits"]["train"]["tokens"])


def test_choose_val_takes_whole_documents_until_the_fraction():
    lengths = np.full(10, 100)
    picks = [data.choose_val(lengths, 0.25, seed) for seed in range(10)]
    assert all(p.sum() == 3 for p in picks)  # 200 < 25% of 1000 <= 300
    assert np.array_equal(picks[0], data.choose_val(lengths, 0.25, 0))
    assert len({tuple(np.flatnonzero(p)) for p in picks}) > 1  # the seed picks the documents
    assert data.choose_val(lengths, 0.0, 0).sum() == 0 and data.choose_val(lengths, 0.99, 0).sum() == 9


def test_uint16_vs_uint32(tmp_path, tok):
    assert data.token_dtype(1 << 16) == np.uint16 and data.token_dtype((1 << 16) + 1) == np.uint32
    (tmp_path / "a.txt").write_text(CORPUS[2], encoding="utf-8")
    big = SimpleNamespace(**{**vars(tok), "vocab_size": 70_000})  # same ids, a vocab past uint16
    meta = prepare([tmp_path / "a.txt"], big, tmp_path / "out", val_fraction=0, progress=False)
    got = np.fromfile(tmp_path / "out" / "train.bin", np.uint32)
    assert meta["dtype"] == "uint32" and np.array_equal(got, reference_ids(tok, [CORPUS[2]])[0])
    assert TokenData(tmp_path / "out").tokens.dtype == np.uint32


# ---------------------------------------------------------------- Megatron bin/idx

def write_mmididx(prefix, seqs, doc_idx, code, fmt):
    """Megatron MMapIndexedDataset written field by field with struct (independent of data.py)."""
    itemsize = struct.calcsize("<" + fmt)
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(struct.pack(f"<{len(s)}{fmt}", *s))
    sizes = [len(s) for s in seqs]
    pointers = [sum(sizes[:i]) * itemsize for i in range(len(sizes))]
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))             # version
        f.write(struct.pack("<B", code))          # dtype code
        f.write(struct.pack("<Q", len(sizes)))    # sequences
        f.write(struct.pack("<Q", len(doc_idx)))  # documents + 1
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(sizes)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize("code,fmt", [(8, "H"), (4, "i"), (5, "q")])
def test_mmididx_reader(tmp_path, code, fmt):
    seqs = [[5, 6, 7, 0], [1, 2, 0], [60000 if fmt == "H" else 70000, 3, 0], [9, 0]]
    write_mmididx(tmp_path / "dclm", seqs, [0, 2, 3, 4], code, fmt)   # documents: seqs 0-1, 2, 3
    flat = [t for s in seqs for t in s]
    for path in (tmp_path / "dclm", tmp_path / "dclm.bin", tmp_path / "dclm.idx"):
        d = TokenData(path)   # the last document (2 of 12 tokens >= 5%) is held out
        assert d.tokens.tolist() == flat[:10] and TokenData(path, "val").tokens.tolist() == [9, 0]
        assert d.meta["documents"] == 3 and d.meta["sequences"] == 4
    x, y = Batches(d, ctx=4, batch_size=2).get(0)
    assert x.dtype == torch.int64 and x.shape == (2, 4) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="outside the vocabulary"):
        d.check_tokenizer(SimpleNamespace(vocab_size=100, name="small", fingerprint="f"))
    d.check_tokenizer(SimpleNamespace(vocab_size=70001, name="big", fingerprint="f"))


def test_mmididx_directory_splits_and_bad_files(tmp_path):
    write_mmididx(tmp_path / "train", [[1, 2, 3, 0]], [0, 1], 8, "H")
    write_mmididx(tmp_path / "val", [[4, 5, 0]], [0, 1], 8, "H")
    assert TokenData(tmp_path, "train").tokens.tolist() == [1, 2, 3, 0]
    assert TokenData(tmp_path, "val").tokens.tolist() == [4, 5, 0]
    (tmp_path / "bad.idx").write_bytes(b"NOTMEGATRON" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(bytes(8))
    with pytest.raises(DataError, match="not a Megatron MMIDIDX"):
        TokenData(tmp_path / "bad")
    write_mmididx(tmp_path / "flt", [[1, 2]], [0, 1], 6, "d")  # float64 code: not token ids
    with pytest.raises(DataError, match="dtype code 6"):
        TokenData(tmp_path / "flt")
    write_mmididx(tmp_path / "short", [[1, 2, 3]], [0, 1], 8, "H")
    (tmp_path / "short.bin").write_bytes(bytes(2))
    with pytest.raises(DataError, match="shorter than its index"):
        TokenData(tmp_path / "short")
    write_mmididx(tmp_path / "unordered", [[1, 2], [3, 0]], [0, 2, 1], 8, "H")
    with pytest.raises(DataError, match="document index is not 0 .. 2 in order"):
        TokenData(tmp_path / "unordered")
    write_mmididx(tmp_path / "one", [[1, 2], [3, 0]], [0, 2], 8, "H")      # two sequences, one document
    with pytest.raises(DataError, match="one holds a single document, so none can be held out"):
        TokenData(tmp_path / "one", "val")
    (tmp_path / "val.idx").unlink()
    with pytest.raises(DataError, match="holds train.bin/.idx but no val.bin/.idx"):
        TokenData(tmp_path, "val")


@pytest.mark.parametrize("starts,n,cut", [
    ([0, 10, 20, 30], 40, 30),     # 5% of 40 tokens: the last document (10 tokens) is enough
    ([0, 50, 90, 99], 100, 90),    # the last one (1 token) is not: the last two
    ([0, 95], 100, 95),            # exactly 5%
    ([0, 97], 100, 97),            # the first document holds more than 95%: the rest, whole
])
def test_held_out_start_takes_whole_documents_from_the_end(starts, n, cut):
    assert data.held_out_start(np.array(starts), n, 0.05) == cut


# ---------------------------------------------------------------- held-out data is never trained on

def windows(tokens, ctx) -> set:
    """Every window of ctx+1 tokens, at every start (a superset of what Batches and eval_windows read)."""
    t = np.ascontiguousarray(np.asarray(tokens, np.int64))
    return {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(t, ctx + 1)}


def documents(tokens, eos) -> list[bytes]:
    """A split cut after each EOS, one int64 byte string per document."""
    t = np.asarray(tokens, np.int64)
    return [d.tobytes() for d in np.split(t, np.flatnonzero(t == eos)[:-1] + 1)]


def test_train_and_val_never_share_a_window(tmp_path, tok):
    """Every input format: a data.py folder, a merged one and a Megatron prefix spelled three ways.
    No window of the val split appears anywhere in the train split, and the two splits hold every
    document exactly once. The documents are random words, so a shared window means a shared document."""
    rng = np.random.default_rng(0)
    texts = [" ".join("".join(rng.choice(list("abcdefghij"), rng.integers(2, 7))) for _ in range(rng.integers(20, 40)))
             for _ in range(12)]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    ids = reference_ids(tok, texts)
    prepare([tmp_path / f"{i}.txt" for i in range(8)], tok, tmp_path / "folder", 0.3, progress=False)
    prepare([tmp_path / f"{i}.txt" for i in range(8, 12)], tok, tmp_path / "other", 0.3, progress=False)
    data.merge([tmp_path / "folder", tmp_path / "other"], tmp_path / "merged")
    write_mmididx(tmp_path / "dclm", ids, list(range(len(ids) + 1)), 8, "H")
    cases = {"folder": ids[:8], "merged": ids, "dclm": ids, "dclm.bin": ids, "dclm.idx": ids}
    ctx = 6
    for name, docs in cases.items():
        train, val = TokenData(tmp_path / name), TokenData(tmp_path / name, "val")
        assert len(train) and len(val), name
        assert not windows(train.tokens, ctx) & windows(val.tokens, ctx), name
        got = documents(train.tokens, tok.eos_id) + documents(val.tokens, tok.eos_id)
        assert sorted(got) == sorted(np.array(d, np.int64).tobytes() for d in docs), name
        everything = np.concatenate([train.tokens, val.tokens])   # val read from all the tokens: caught
        assert windows(train.tokens, ctx) & windows(everything, ctx), name


# ---------------------------------------------------------------- batches

@pytest.fixture
def ramp(tmp_path):
    """Token i = i, so a window's first token is its start (a Megatron folder's train split)."""
    write_mmididx(tmp_path / "train", [list(range(1003))], [0, 1], 4, "i")
    return TokenData(tmp_path, "train")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_global_batch_same_for_any_world_size(ramp, world_size):
    ref = Batches(ramp, ctx=16, batch_size=6, seed=3)
    ranks = [Batches(ramp, ctx=16, batch_size=6, seed=3) for _ in range(world_size)]  # one per process
    for step in [0, 1, 2, 9, 10, 11, 40, 7]:
        x1, y1 = ref.get(step)
        parts = [b.get(step, rank=r, world_size=world_size) for r, b in enumerate(ranks)]
        assert all(p[0].shape == (6 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    # windows are the tokens at their start, y shifted by one
    assert torch.equal(x1, x1[:, :1] + torch.arange(16)) and torch.equal(y1, x1 + 1)


def test_exact_resume(ramp):
    run = Batches(ramp, ctx=10, batch_size=8, seed=5)
    full = [run.get(s)[0] for s in range(30)]  # crosses epochs: 100 windows per epoch
    resumed = Batches(ramp, ctx=10, batch_size=8, seed=5)
    resumed.get(123), resumed.get(2)  # whatever happened before
    for s in range(17, 30):
        assert torch.equal(resumed.get(s)[0], full[s])
    other_seed = Batches(ramp, ctx=10, batch_size=8, seed=6)
    assert not torch.equal(other_seed.get(0)[0], full[0])


def test_no_window_repeats_within_an_epoch(ramp):
    ctx, b = 7, 4
    bat = Batches(ramp, ctx=ctx, batch_size=b, seed=0)
    n_win = (len(ramp) - 1) // ctx  # 143 windows: batches straddle epoch boundaries
    starts = torch.cat([bat.get(s)[0][:, 0] for s in range(3 * n_win // b + 1)]).numpy()
    for e in range(3):
        epoch = starts[e * n_win:(e + 1) * n_win]
        offset = epoch.min()
        assert len(set(epoch)) == n_win  # every window once
        assert set(epoch) == set(offset + ctx * np.arange(n_win))  # non-overlapping, stride ctx
        assert epoch.max() + ctx + 1 <= len(ramp)
        assert not (np.diff(epoch) > 0).all()  # shuffled
    assert not np.array_equal(starts[:n_win] - starts[:n_win].min(), starts[n_win:2 * n_win] - starts[n_win:2 * n_win].min())


def test_eval_windows(ramp):
    wins = list(eval_windows(ramp, ctx=100, max_windows=7, batch_size=3))
    assert [w[0].shape[0] for w in wins] == [3, 3, 1]
    x = torch.cat([w[0] for w in wins])
    assert torch.equal(x[:, 0], torch.arange(7) * 100)  # non-overlapping, from the start
    assert torch.equal(x, torch.cat([w[0] for w in eval_windows(ramp, 100, 7, 3)]))  # deterministic
    assert len(torch.cat([w[0] for w in eval_windows(ramp, 100, 10**6)])) == 10  # capped by the data
    by_rank = [torch.cat([w[0] for w in eval_windows(ramp, 100, 7, 2, rank=r, world_size=3)]) for r in range(3)]
    assert [len(b) for b in by_rank] == [2, 2, 2]  # 7 rounded down to 6: equal forwards per rank
    assert sorted(torch.cat(by_rank)[:, 0].tolist()) == x[:6, 0].tolist()
    with pytest.raises(DataError, match="fewer than 11 windows"):
        eval_windows(ramp, 100, 100, world_size=11)


# ---------------------------------------------------------------- bad input

def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    return err


def test_bad_inputs_cli(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "nojson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    (tmp_path / "emptydir").mkdir()
    cases = {"missing.txt": "does not exist", "empty.txt": "is empty", "img.png": "not UTF-8 plain text",
             "latin1.txt": "not UTF-8", "nojson.jsonl": "nojson.jsonl:2 is not a JSON object",
             "notext.jsonl": 'notext.jsonl:1 is not a JSON object with a string "text"', "blank.jsonl": "holds no documents",
             "emptydir": "holds no files"}
    for name, msg in cases.items():
        if name.endswith("jsonl"):  # content errors surface while tokenising: call prepare directly
            with pytest.raises(DataError, match=msg):
                prepare(list_files([tmp_path / name]), make_tok(), tmp_path / "out", progress=False)
        else:
            assert msg in run_cli(["--input", str(tmp_path / name)] + out, capsys)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))  # no partial folder left behind
    (tmp_path / "a.txt").write_text(CORPUS[0])
    for bad_out, msg in [(tmp_path / "a.txt", "a.txt is a file; pass a folder path"),
                         (tmp_path / "a.txt" / "sub", "a.txt is a file, not a folder")]:
        assert msg in run_cli(["--input", str(tmp_path / "a.txt"), "--out", str(bad_out)], capsys)
        assert msg in run_cli(["--merge", str(tmp_path / "x"), "--out", str(bad_out)], capsys)
    with pytest.raises(SystemExit) as e:
        data.main(["--input", str(tmp_path / "a.txt")])  # --out missing: argparse error
    assert e.value.code == 2
    assert list_files([tmp_path / "a.txt", tmp_path / "." / "a.txt"]) == [tmp_path / "a.txt"]   # read once


def test_bad_tokenizer_and_sizes(tmp_path, tok):
    assert issubclass(DataError, ValueError)
    (tmp_path / "a.txt").write_text(CORPUS[0])
    (tmp_path / "b.txt").write_text(CORPUS[1])
    with pytest.raises(DataError, match="outside its vocabulary"):  # ids past the declared vocab
        prepare([tmp_path / "a.txt"], SimpleNamespace(**{**vars(tok), "vocab_size": 50}), tmp_path / "o", 0, progress=False)
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "o", 0.1, progress=False)
    with pytest.raises(DataError, match="val-fraction"):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "o", 1.0, progress=False)
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tok, tmp_path / "o", 0.2, progress=False)
    d = TokenData(tmp_path / "o")
    d.check_tokenizer(tok)
    with pytest.raises(DataError, match="was tokenised by tiny-bpe"):
        d.check_tokenizer(make_tok(name="other-bpe"))
    with pytest.raises(DataError, match="longer than"):
        Batches(d, ctx=len(d), batch_size=2)
    Batches(d, ctx=len(d) - 1, batch_size=2).get(0)  # exactly ctx+1 tokens is enough
    with pytest.raises(DataError, match="fewer than 1 windows"):
        eval_windows(TokenData(tmp_path / "o", "val"), ctx=10**6, max_windows=4)
    with pytest.raises(DataError, match="divisible by world_size"):
        Batches(d, ctx=4, batch_size=4).get(0, rank=0, world_size=3)
    with pytest.raises(DataError, match="holds no token files"):
        TokenData(tmp_path / "nothing")
    with open(tmp_path / "o" / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="re-run python data.py"):
        TokenData(tmp_path / "o")
    for meta in (b"\xff\xfe not UTF-8", b"{not json", b'{"splits": {}}'):
        (tmp_path / "o" / "meta.json").write_bytes(meta)
        with pytest.raises(DataError, match="meta.json is damaged or has no train split"):
            TokenData(tmp_path / "o")


def test_a_failed_run_leaves_the_previous_folder(tmp_path, tok, tiny_hf_llama, monkeypatch, capsys):
    """Runs into a good token folder that fail while tokenising, while writing the splits (a kill
    there is a KeyboardInterrupt) or while merging: the folder is loadable and byte for byte as it
    was, and no staging folder is left beside it."""
    for i, text in enumerate(CORPUS):
        (tmp_path / f"{i}.txt").write_text(text * 3, encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    prepare([tmp_path / "0.txt", tmp_path / "1.txt"], tok, tmp_path / "o", 0.3, progress=False)
    prepare([tmp_path / "2.txt"], tok, tmp_path / "p", 0, progress=False)
    before = {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()}

    def killed(*args):
        raise KeyboardInterrupt

    small = SimpleNamespace(**{**vars(tok), "vocab_size": 50})
    cases = [("bad input", lambda: data.main(["--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                                              "--teacher", str(tiny_hf_llama)])),
             ("bad tokenizer", lambda: prepare([tmp_path / "2.txt"], small, tmp_path / "o", 0, progress=False)),
             ("killed while writing", lambda: (monkeypatch.setattr(data, "_copy_docs", killed),
                                               prepare([tmp_path / "2.txt"], tok, tmp_path / "o", 0, progress=False))),
             ("killed while merging", lambda: (monkeypatch.setattr(shutil, "copyfileobj", killed),
                                               data.merge([tmp_path / "p"], tmp_path / "o")))]
    for name, run in cases:
        with pytest.raises((SystemExit, DataError, KeyboardInterrupt)):
            run()
        monkeypatch.undo()
        assert {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()} == before, name
        assert len(TokenData(tmp_path / "o", "val")) and not list(tmp_path.glob(".*")), name
    assert "bad.jsonl:2 is not a JSON object" in capsys.readouterr().err
    data.merge([tmp_path / "p"], tmp_path / "o")   # a run that succeeds replaces the files
    assert np.array_equal(TokenData(tmp_path / "o").tokens, TokenData(tmp_path / "p").tokens)


# ---------------------------------------------------------------- default corpus, real tokenizer

def test_default_corpus_one_version_per_work():
    files = data.default_corpus()
    names = [f.name for f in files]
    assert len(files) == 42 and "hamlet_gut.txt" in names and "sonnets_gut.txt" in names
    assert not any(n.endswith("_f.txt") for n in names)


@pytest.fixture(scope="module")
def smollm2_tok():
    """The default teacher's tokenizer, read once for this file (the SmolLM2 GGUF's metadata only)."""
    from teacher import load_tokenizer
    return load_tokenizer()


def test_cli_with_real_tokenizer(tmp_path, monkeypatch, capsys, smollm2_tok):
    teacher = pytest.importorskip("teacher")
    real = smollm2_tok
    monkeypatch.setattr(teacher, "load_tokenizer", lambda path=None: real)  # load once per test run
    (tmp_path / "a.txt").write_text(CORPUS[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(CORPUS[2] * 20, encoding="utf-8")
    data.main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "o"),
               "--val-fraction", "0.5"])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["fingerprint"] == real.fingerprint
    held = meta["splits"]["val"]["names"]
    assert f"held out: {held[0]}" in capsys.readouterr().out and len(held) == 1
    want = dict(zip(["a.txt", "b.txt"], reference_ids(real, [CORPUS[0], CORPUS[2] * 20])))
    assert TokenData(tmp_path / "o", "val").tokens.tolist() == want.pop(held[0])
    assert TokenData(tmp_path / "o").tokens.tolist() == list(want.values())[0]
    TokenData(tmp_path / "o").check_tokenizer(real)


# ---------------------------------------------------------------- text sampled from the teacher, merged folders

CHATML_TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"   # conftest's CHATML, written out


def expected_openings(tok):
    """The openings written out by hand for conftest's tiny teacher (BOS, no add_bos, a ChatML template)."""
    assert tok.bos_id is not None and not tok.add_bos
    texts = ["<|im_start|>user\n", "The", "Once upon a time", "Question:", "def ", "# ", "Dear"]
    return [[tok.bos_id]] + [tok.encode(t) for t in texts]


def test_generation_seeds_are_many_distinct_chat_turns(tiny_hf_llama, smollm2_tok):
    from teacher import load_tokenizer
    tok = load_tokenizer(tiny_hf_llama)
    openings, turns = data.generation_seeds(tok)
    asks = data.instructions()
    assert openings == expected_openings(tok)
    assert len(turns) == len(asks) >= 3000 and len(set(asks)) == len(asks)
    assert len({tuple(s) for s in openings + turns}) == len(openings) + len(turns)
    assert all("{" not in q and "}" not in q and q.strip() == q for q in asks)
    # each turn is one user turn holding its instruction, through the start of the assistant's turn
    assert [tok.decode(s) for s in turns] == [CHATML_TURN.format(q) for q in asks]
    for k in range(0, len(asks), 397):   # the template itself, rendered and tokenised as one text
        text = tok.chat_prompt([{"role": "user", "content": asks[k]}], add_generation_prompt=True)
        assert turns[k] == tok.encode(text)
    assert data.stop_ids(tok) == [tok.eos_id]   # ChatML's end of turn is EOS here
    real = smollm2_tok   # a default system turn comes first
    openings, turns = data.generation_seeds(real)
    for k in (0, 1234, len(turns) - 1):
        assert real.decode(turns[k]) == real.chat_prompt([{"role": "user", "content": asks[k]}])
    assert real.decode(turns[0]).endswith("child.<|im_end|>\n<|im_start|>assistant\n")


def test_draw_seeds_alternates_instructions_and_openings():
    rng = np.random.default_rng(5)
    picks = [data.draw_seeds(rng, b, 10_000, 8, 5000) for b in range(4)]
    for b, p in enumerate(picks):
        assert ((p >= 8) == (b % 2 == 0)).all() and p.max() < 8 + 5000
    asked, opened = np.concatenate(picks[::2]), np.concatenate(picks[1::2])
    assert len(np.unique(asked)) > 4500   # 20,000 uniform draws of 5,000 instructions reach about 98% of them
    assert np.bincount(opened, minlength=8).min() > 0.9 * len(opened) / 8   # openings: uniform
    again = np.random.default_rng(5)
    assert all(np.array_equal(p, data.draw_seeds(again, b, 10_000, 8, 5000)) for b, p in enumerate(picks))
    assert (data.draw_seeds(rng, 0, 1000, 8, 0) < 8).all()   # no chat template: openings only


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def test_first_token_follows_the_teacher_softmax_at_the_temperature(tiny_hf_llama):
    """doc_len=1, seeds of two lengths in one batch (the shorter one samples while the other is still
    fed its seed): the first new token's frequencies for each seed match softmax(logits / T) of a
    plain Teacher.forward over that seed, and not another temperature or position."""
    from teacher import load_teacher
    model, tok = load_teacher(tiny_hf_llama)
    short, long = expected_openings(tok)[0], expected_openings(tok)[6]   # BOS; "# ", 2 tokens
    assert len(long) > 1 and model.cfg.vocab_size > tok.vocab_size   # rows past the vocabulary: never drawn
    rows, T = 25_000, 0.7
    seeds = [short, long] * rows
    ids, lengths = data._sample_documents(model, seeds, 1, tok.vocab_size, [tok.eos_id], T,
                                          torch.Generator().manual_seed(0))
    bound = 0.05   # sampling noise here is about 0.035
    for k, s in enumerate((short, long)):
        docs, n = ids[k::2], lengths[k::2]
        assert (docs[:, :len(s)] == torch.tensor(s)).all() and (n == len(s) + 1).all()
        freq = np.bincount(docs[:, len(s)], minlength=model.cfg.vocab_size) / rows
        assert freq[tok.vocab_size:].sum() == 0
        with torch.no_grad():
            logits = model(torch.tensor([s]))[0, :, :tok.vocab_size].double()
        assert tv(freq[:tok.vocab_size], (logits[-1] / T).softmax(-1)) < bound
        for wrong in (1.0, 0.55):   # the test would see a wrong temperature ...
            assert tv(freq[:tok.vocab_size], (logits[-1] / wrong).softmax(-1)) > bound
        if len(s) > 1:              # ... or the logits of the wrong position
            assert tv(freq[:tok.vocab_size], (logits[-2] / T).softmax(-1)) > bound


def test_kv_cache_continuation_and_eos_cut_match_a_full_forward(tiny_hf_llama, monkeypatch):
    """torch.multinomial replaced by Gumbel-max with recorded noise (a true sample, different per row),
    EOS made likely (most of all in the rows of the longest seed): rows of seeds of four lengths; each
    new token must be the argmax of log-softmax(Teacher.forward(row)) at its position + that step's
    noise, and each row must end right after its first new EOS (or after doc_len new tokens), so that
    the cached decoding of mixed seeds equals a full forward and no document goes on past its EOS.
    Decoding must stop with the last row to end."""
    from teacher import load_teacher
    model, tok = load_teacher(tiny_hf_llama)
    noise, g, V = [], torch.Generator().manual_seed(123), tok.vocab_size

    def gumbel_max(probs, num_samples, generator=None):
        assert num_samples == 1 and isinstance(generator, torch.Generator)
        assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5) and probs.shape[1] == V
        z = -torch.log(-torch.log(torch.rand(probs.shape, generator=g, dtype=torch.float64)))
        z[:, tok.eos_id] += eos_bias
        noise.append(z)
        return (probs.double().log() + z).argmax(-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", gumbel_max)
    openings, turns = data.generation_seeds(tok)
    kinds = [openings[0], openings[1], openings[2], turns[7]]
    seeds, doc_len = kinds * 6, 12
    eos_bias = torch.tensor([2.5, 2.5, 2.5, 6.0] * 6, dtype=torch.float64)
    ids, lengths = data._sample_documents(model, seeds, doc_len, V, [tok.eos_id], 1.0, torch.Generator())
    start = min(map(len, seeds))
    with torch.no_grad():
        logp = model(ids)[..., :V].double().log_softmax(-1)
    stopped = 0
    for r, s in enumerate(seeds):
        n = int(lengths[r])
        assert ids[r, :len(s)].tolist() == s and len(s) < n <= len(s) + doc_len
        for t in range(len(s), n):
            assert ids[r, t] == (logp[r, t - 1] + noise[t - start][r]).argmax(), (r, t)
        new = ids[r, len(s):n].tolist()
        assert tok.eos_id not in new[:-1] and (new[-1] == tok.eos_id or n == len(s) + doc_len), (r, new)
        stopped += new[-1] == tok.eos_id
    assert 6 <= stopped < len(seeds)   # both kinds of ending happened
    assert len({tuple(ids[r, :lengths[r]].tolist()) for r in range(len(seeds))}) > 4   # the rows differ
    assert len(noise) == int(lengths.max()) - start < ids.shape[1] - start   # no step after the last row ended


def split_documents(tokens, seeds, doc_len, eos):
    """Cut a split into documents: each starts with one of the seeds (the longest that fits), then up to
    doc_len new tokens through the first EOS after the seed (drawn, or added after doc_len tokens).
    Returns (seed index, document as a tuple) for each."""
    by_first = {}
    for k, s in enumerate(seeds):
        by_first.setdefault(s[0], []).append((k, s))
    for group in by_first.values():
        group.sort(key=lambda ks: len(ks[1]), reverse=True)
    docs, p, tokens = [], 0, tokens.tolist()
    while p < len(tokens):
        k, s = next((k, s) for k, s in by_first[tokens[p]] if tokens[p:p + len(s)] == s)
        q = tokens.index(eos, p + len(s))
        assert q - (p + len(s)) <= doc_len, p
        docs.append((k, tuple(tokens[p:q + 1])))
        p = q + 1
    return docs


def test_generated_folder(tmp_path, tiny_hf_llama):
    from teacher import load_tokenizer
    tok = load_tokenizer(tiny_hf_llama)
    openings, turns = data.generation_seeds(tok)
    n, batch, doc_len = 1500, 5, 6
    meta = data.generate(tiny_hf_llama, n, tmp_path / "a", batch=batch, doc_len=doc_len, val_fraction=0.2, seed=1,
                         temperature=0.8, progress=False)
    g = meta["generated"]
    assert g["openings"] == [tok.decode(s) for s in openings]
    assert g["openings"][:3] == ["<|endoftext|>", "<|im_start|>user\n", "The"]
    assert (g["temperature"], g["doc_len"], g["batch"], g["seed"], g["teacher"]) == (0.8, doc_len, batch, 1, "hf_llama")
    assert (g["instructions"], g["stops"]) == (len(turns), ["<|im_end|>"])
    assert g["tokens_per_s"] > 0 and meta["inputs"] == [str(tiny_hf_llama)]
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    train, val = TokenData(tmp_path / "a"), TokenData(tmp_path / "a", "val")
    found = []
    for d in (train, val):
        d.check_tokenizer(tok)   # distill.py accepts the folder for this teacher
        split = split_documents(d.tokens, openings + turns, doc_len, tok.eos_id)
        assert meta["splits"][d.split]["documents"] == len(split)
        found += split
    docs = [doc for _, doc in found]
    total = len(train) + len(val)
    assert n <= total < n + batch * (max(map(len, turns)) + doc_len + 1)
    assert len(set(docs)) == len(docs) == g["sampled"] - g["duplicates"]
    asked = sum(k >= len(openings) for k, _ in found)   # instructions and openings, many seeds
    assert 0.3 < asked / len(docs) < 0.7 and g["seeds_used"] == len({k for k, _ in found}) > 20
    assert 0.1 < len(val) / total < 0.3
    for folder, seed in (("b", 1), ("c", 2)):
        data.generate(tiny_hf_llama, n, tmp_path / folder, batch=batch, doc_len=doc_len, val_fraction=0.2, seed=seed,
                      temperature=0.8, progress=False)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert np.fromfile(tmp_path / "a" / "train.bin", np.uint16).tolist() != \
        np.fromfile(tmp_path / "c" / "train.bin", np.uint16).tolist()


def test_duplicates_are_dropped_and_counted(tmp_path, tiny_hf_llama, monkeypatch):
    """A greedy teacher writes one document per seed: every second draw of a seed is a duplicate."""
    from teacher import load_tokenizer
    tok = load_tokenizer(tiny_hf_llama)
    openings, turns = data.generation_seeds(tok)
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: probs.argmax(-1, keepdim=True))
    drawn, draw = [], data.draw_seeds
    monkeypatch.setattr(data, "draw_seeds", lambda *a: drawn.append(draw(*a)) or drawn[-1])
    meta = data.generate(tiny_hf_llama, 600, tmp_path / "g", batch=16, doc_len=3, val_fraction=0, progress=False)
    g, picks = meta["generated"], np.concatenate(drawn)
    docs = [doc for _, doc in split_documents(TokenData(tmp_path / "g").tokens, openings + turns, 3, tok.eos_id)]
    assert g["sampled"] == len(picks) and len(docs) == len(set(docs)) == len(np.unique(picks)) == g["seeds_used"]
    assert g["duplicates"] == len(picks) - len(docs) > 0
    # a teacher that only repeats itself: an error, not an endless loop
    monkeypatch.setattr(data, "generation_seeds", lambda tok: ([[tok.bos_id]], []))
    with pytest.raises(DataError, match="all duplicates.*raise it"):
        data.generate(tiny_hf_llama, 600, tmp_path / "h", batch=64, doc_len=3, val_fraction=0, progress=False)
    assert not (tmp_path / "h").exists()


def test_generate_cli(tmp_path, tiny_hf_llama, capsys):
    data.main(["--generate", "3e2", "--teacher", str(tiny_hf_llama), "--out", str(tmp_path / "g"),
               "--gen-batch", "4", "--doc-len", "5", "--device", "cpu", "--val-fraction", "0.1", "--seed", "3",
               "--temperature", "0.5"])
    printed = capsys.readouterr().out
    assert "hf_llama samples (0 duplicates dropped" in printed and "tokens/s" in printed and "held out" not in printed
    g = json.loads((tmp_path / "g" / "meta.json").read_text())["generated"]
    assert (g["doc_len"], g["batch"], g["seed"], g["temperature"]) == (5, 4, 3, 0.5)
    out = ["--out", str(tmp_path / "e")]
    teacher = ["--teacher", str(tiny_hf_llama)]
    cases = [(["--generate", "2.5"] + teacher, "must be a whole number"),
             (["--generate", "ten"] + teacher, "must be a whole number"),
             (["--generate", "10"] + teacher, "too few for one document per split"),
             (["--generate", "1000", "--doc-len", "0"] + teacher, "--doc-len 0"),
             (["--generate", "1000", "--gen-batch", "0"] + teacher, "--gen-batch 0"),
             (["--generate", "1000", "--val-fraction", "1"] + teacher, "val-fraction"),
             (["--generate", "1000", "--temperature", "0"] + teacher, "--temperature 0.0 must be positive"),
             (["--generate", "1000", "--temperature", "nan"] + teacher, "--temperature nan must be positive"),
             (["--generate", "1000", "--seed", "-1"] + teacher, "--seed -1 must be 0 or more"),
             (["--generate", "1000", "--doc-len", "300"] + teacher, "lower --doc-len"),   # past max_seq_len 256
             (["--generate", "1000", "--doc-len", "5", "--teacher", str(tmp_path / "nope")], "does not exist")]
    for args, msg in cases:
        assert msg in run_cli(args + out, capsys), args
    # --out is checked before the teacher loads (here: before a missing teacher is noticed)
    assert "is a file" in run_cli(["--generate", "1000", "--doc-len", "5", "--teacher", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "g" / "meta.json")], capsys)
    with pytest.raises(SystemExit) as e:
        data.main(["--generate", "1000"])   # --out missing: argparse error
    assert e.value.code == 2


def test_merge(tmp_path, tok, tiny_hf_llama, capsys):
    from teacher import load_tokenizer
    for i, text in enumerate(CORPUS):
        (tmp_path / f"{i}.txt").write_text(text * 3, encoding="utf-8")
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    (tmp_path / "3.txt").write_text(CORPUS[0][::-1] * 3, encoding="utf-8")
    a = prepare(files[:2], tok, tmp_path / "A", 0.3, seed=1, progress=False)
    b = prepare([files[2], tmp_path / "3.txt"], tok, tmp_path / "B", 0.4, seed=2, progress=False)
    m = data.merge([tmp_path / "A", tmp_path / "B"], tmp_path / "M")
    for split in ("train", "val"):
        want = np.concatenate([TokenData(tmp_path / "A", split).tokens, TokenData(tmp_path / "B", split).tokens])
        assert np.array_equal(TokenData(tmp_path / "M", split).tokens, want)
        for key in ("tokens", "documents"):
            assert m["splits"][split][key] == a["splits"][split][key] + b["splits"][split][key]
    assert m["inputs"] == [str(tmp_path / "A"), str(tmp_path / "B")]
    TokenData(tmp_path / "M").check_tokenizer(tok)
    # the use case: a corpus + text sampled from the teacher, both with the teacher's tokenizer
    real = load_tokenizer(tiny_hf_llama)
    prepare(files, real, tmp_path / "text", 0.3, progress=False)
    data.generate(tiny_hf_llama, 200, tmp_path / "gen", batch=4, doc_len=4, progress=False)
    data.main(["--merge", str(tmp_path / "text"), str(tmp_path / "gen"), "--out", str(tmp_path / "both")])
    assert "2 folders ->" in capsys.readouterr().out
    both = json.loads((tmp_path / "both" / "meta.json").read_text())
    assert both["merged"][1]["generated"]["doc_len"] == 4 and both["merged"][0]["generated"] is None
    TokenData(tmp_path / "both").check_tokenizer(real)
    assert len(TokenData(tmp_path / "both")) == len(TokenData(tmp_path / "text")) + len(TokenData(tmp_path / "gen"))
    with pytest.raises(DataError, match=f"{tmp_path / 'A'} .* and {tmp_path / 'gen'} .*different tokenizers"):
        data.merge([tmp_path / "A", tmp_path / "gen"], tmp_path / "X")
    wide = SimpleNamespace(**{**vars(tok), "vocab_size": 1 << 17})
    prepare([tmp_path / "3.txt"], wide, tmp_path / "wide", 0, progress=False)
    with pytest.raises(DataError, match="or dtypes"):   # same tokenizer, uint32 files
        data.merge([tmp_path / "A", tmp_path / "wide"], tmp_path / "X")
    out = ["--out", str(tmp_path / "X")]
    assert "different tokenizers" in run_cli(["--merge", str(tmp_path / "A"), str(tmp_path / "gen")] + out, capsys)
    assert "holds no meta.json" in run_cli(["--merge", str(tmp_path / "A"), str(tmp_path / "none")] + out, capsys)
    assert "also an input" in run_cli(["--merge", str(tmp_path / "A"), "--out", str(tmp_path / "A")], capsys)
    assert "names" in run_cli(["--merge", str(tmp_path / "A"), str(tmp_path / "A")] + out, capsys)
    # folders tokenised from a common file: one's held-out document may be in the other's train split
    prepare(files[1:], tok, tmp_path / "C", 0.4, seed=3, progress=False)
    for merged in ([tmp_path / "A", tmp_path / "C"], [tmp_path / "M", tmp_path / "C"]):
        assert "were both tokenised from" in run_cli(["--merge", *map(str, merged)] + out, capsys)
    (tmp_path / "B" / "val.bin").write_bytes(b"")
    assert "re-run python data.py" in run_cli(["--merge", str(tmp_path / "A"), str(tmp_path / "B")] + out, capsys)


def test_data_imports_no_model_code():
    import subprocess
    import sys
    code = "import sys, data; print(sorted(m for m in ('teacher', 'sample', 'model', 'export') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
