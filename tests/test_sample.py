"""Tests of sample.py: the recurrent decode loop against the parallel forward, saved states, the
teacher's KV cache against its cache-free forward, the static-buffer step a CUDA graph replays
against the eager path, streaming, sampling, chat turns, CLI errors. (Its decode speed: bench.py
generate, tests/test_bench.py.)

References are independent of the code under test: Student.forward on the whole sequence (chunked
kernel path) for the one-token loop (naive step path), Teacher.forward without cache (and
teacher.generate_greedy) for the KV cache, tok.chat_prompt on the whole conversation for chat turns.

    python -m pytest -x -q tests/test_sample.py
"""
import shutil

import pytest
import torch

import sample
import teacher as teacher_lib
from conftest import perturbed, rel_err, tiny_teacher_config
from model import State, Student
from sample import SampleConfig, StudentDecoder, TeacherDecoder


def tiny_teacher(arch="llama", seed=0):
    torch.manual_seed(seed)
    t = teacher_lib.Teacher(tiny_teacher_config(arch)).eval()
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.3)
    return t


@pytest.fixture(scope="module", params=["rwkv7", "rwkv6"])
def student(request):
    return perturbed(Student.from_teacher(tiny_teacher(), request.param)).eval()


@pytest.fixture(scope="module")
def ckpt(tiny_hf_llama, tmp_path_factory):
    """A perturbed student of the tiny HF teacher, saved with the teacher's tokenizer beside it."""
    teacher, _ = teacher_lib.load_teacher(tiny_hf_llama)
    folder = tmp_path_factory.mktemp("ckpt") / "student"
    perturbed(Student.from_teacher(teacher, "rwkv7"), seed=1).save(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_hf_llama / f).exists():
            shutil.copy(tiny_hf_llama / f, folder / f)
    return folder


# ---------------------------------------------------------------- the student's recurrent loop

def test_one_token_loop_equals_parallel_forward(student):
    """Token-by-token decoding with the carried State (naive kernel step) == one parallel forward."""
    idx = torch.randint(0, student.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_state = student(idx)
        dec = StudentDecoder(student)
        steps = torch.cat([dec(idx[:, t:t + 1]) for t in range(idx.shape[1])], 1)
    err = rel_err(steps, ref)
    print(f"{student.cfg.variant}: loop vs parallel logits rel err {err:.2e}")
    assert err < 1e-5
    assert dec.state.pos == ref_state.pos == 37
    for a, b in zip(dec.state.layers, ref_state.layers):
        for k in a:
            assert rel_err(a[k], b[k]) < 1e-5, k


def test_chunked_prefill_then_generate_equals_cache_free_greedy(student):
    """sample.generate (prefill in pieces of 5, then one step per token) == argmax loop re-running
    Student.forward on the whole sequence (teacher.generate_greedy, no state)."""
    ids = torch.randint(0, student.cfg.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    cfg = SampleConfig(max_new_tokens=12, prefill_chunk=5)
    new, unfed = sample.generate(StudentDecoder(student), ids, cfg)
    ref = teacher_lib.generate_greedy(student, ids[0].tolist(), 12)
    assert new[0].tolist() == ref
    assert unfed[0].tolist() == ref[-1:]


def test_state_save_load_resumes_identically(student, tmp_path):
    """forward(a), State.save, State.load, forward(b, state) == forward(a + b); pos carries RoPE."""
    idx = torch.randint(0, student.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = student(idx)
        dec = StudentDecoder(student)
        dec(idx[:, :23])
        dec.state.save(tmp_path / "s.state")
        dec2 = StudentDecoder(student, sample.load_state(tmp_path / "s.state", student, "cpu"))
        assert dec2.state.pos == 23
        rest = dec2(idx[:, 23:])
    assert rel_err(rest, ref[:, 23:]) < 1e-5


def test_load_state_rejects_other_students(student, tmp_path):
    bad = State([{"S": torch.zeros(1, 2, 3, 3)}], pos=4)
    bad.save(tmp_path / "bad.state")
    with pytest.raises(ValueError, match="different student"):
        sample.load_state(tmp_path / "bad.state", student, "cpu")
    (tmp_path / "junk.state").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="--state-out"):
        sample.load_state(tmp_path / "junk.state", student, "cpu")


# ---------------------------------------------------------------- the teacher's KV cache

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_teacher_kv_cache_equals_forward(arch):
    """Cached decoding (prefill in pieces of 7 with the offset mask, then single tokens) gives the
    same logits as Teacher.forward on the whole sequence, and the same greedy tokens as
    teacher.generate_greedy (no cache)."""
    t = tiny_teacher(arch, seed=3)
    idx = torch.randint(0, t.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = t(idx)
        dec = TeacherDecoder(t, 2, 40)
        got = torch.cat([dec(idx[:, :7]), dec(idx[:, 7:14]), dec(idx[:, 14:15])]
                        + [dec(idx[:, s:s + 1]) for s in range(15, 30)], 1)
    assert rel_err(got, ref) < 1e-5
    ids = idx[:1, :9]
    new, _ = sample.generate(TeacherDecoder(t, 1, 40), ids, SampleConfig(max_new_tokens=15, prefill_chunk=4))
    assert new[0].tolist() == teacher_lib.generate_greedy(t, ids[0].tolist(), 15)


def test_teacher_cache_overflow_is_a_clear_error():
    t = tiny_teacher()
    dec = TeacherDecoder(t, 1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        dec(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------- the static-buffer step (CUDA graphs)
# On CUDA the one-token step is captured in a CUDA graph. What the graph replays is `step`, a
# function of static buffers (token, position, the State's own tensors); graph=True on a CPU runs
# that same function eagerly, so its logic is tested here against the eager path.

def test_static_step_equals_eager_path(student):
    """Prompt of 6, then 8 one-token steps: the static-buffer step gives bit-identical logits and
    states to the eager forward (same arithmetic, RoPE from a position tensor), and never moves the
    State's tensors (the addresses a captured graph reads)."""
    idx = torch.randint(0, student.cfg.vocab_size, (3, 14), generator=torch.Generator().manual_seed(6))
    eager, static = StudentDecoder(student, graph=False), StudentDecoder(student, graph=True)
    got = [(eager(idx[:, :6]), static(idx[:, :6]))]
    ptrs = [t.data_ptr() for st in static.state.layers for t in st.values()]
    got += [(eager(idx[:, t:t + 1]), static(idx[:, t:t + 1])) for t in range(6, 14)]
    assert all(torch.equal(a, b) for a, b in got)
    assert eager.state.pos == static.state.pos == 14
    assert all(torch.equal(a[k], b[k]) for a, b in zip(eager.state.layers, static.state.layers) for k in a)
    assert [t.data_ptr() for st in static.state.layers for t in st.values()] == ptrs


def test_static_step_greedy_from_an_empty_state(student):
    """No prompt pass: every token through the static step from position 0 == the parallel forward."""
    idx = torch.randint(0, student.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    dec = StudentDecoder(student, graph=True)
    steps = torch.cat([dec(idx[:, t:t + 1]) for t in range(9)], 1)
    with torch.no_grad():
        assert rel_err(steps, student(idx)[0]) < 1e-5


def test_compiled_step_is_one_graph(student, monkeypatch):
    """compile=True traces the whole static step as one graph (fullgraph: a graph break raises),
    once for every position (the position is a buffer, not a guard), and that graph, run as traced,
    gives the eager path's logits bit for bit."""
    graphs, real = [], torch.compile

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=count, **kw))
    torch._dynamo.reset()
    idx = torch.randint(0, student.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(10))
    eager, compiled = StudentDecoder(student, graph=False), StudentDecoder(student, graph=True, compile=True)
    assert torch.equal(eager(idx[:, :4]), compiled(idx[:, :4]))
    for t in range(4, 9):
        assert torch.equal(eager(idx[:, t:t + 1]), compiled(idx[:, t:t + 1]))
    assert len(graphs) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_teacher_static_step_equals_eager_path(arch):
    """The teacher's static step (one query against the whole fixed-size cache, later positions
    masked; GQA heads as query rows) against its eager step (the cache sliced to the positions
    written): logits within 1e-5, the same greedy tokens, from a prompt and from position 0."""
    t = tiny_teacher(arch, seed=8)
    idx = torch.randint(0, t.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    eager, static = TeacherDecoder(t, 2, 24, graph=False), TeacherDecoder(t, 2, 24, graph=True)
    a = torch.cat([eager(idx[:, :5])] + [eager(idx[:, s:s + 1]) for s in range(5, 20)], 1)
    b = torch.cat([static(idx[:, :5])] + [static(idx[:, s:s + 1]) for s in range(5, 20)], 1)
    assert rel_err(b, a) < 1e-5
    with torch.no_grad():
        ref = t(idx)
    fresh = TeacherDecoder(t, 2, 24, graph=True)
    assert rel_err(torch.cat([fresh(idx[:, s:s + 1]) for s in range(20)], 1), ref) < 1e-5
    cfg = SampleConfig(max_new_tokens=10)
    new_e, _ = sample.generate(TeacherDecoder(t, 2, 24, graph=False), idx[:, :8], cfg)
    new_s, _ = sample.generate(TeacherDecoder(t, 2, 24, graph=True), idx[:, :8], cfg)
    assert torch.equal(new_e, new_s)
    for _ in range(4):                                        # positions 20 .. 23 fill the cache
        fresh(idx[:, :1])
    with pytest.raises(ValueError, match="KV cache holds 24"):
        fresh(idx[:, :1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6"])
def test_cuda_graphed_decoding_equals_eager(variant):
    """On a GPU, student and teacher: the graphed decoders' greedy tokens == the eager decoders'
    (after a 12-token prompt, 16 new tokens, fp32); the student's logits bit for bit."""
    t = tiny_teacher(seed=9).cuda()
    s = perturbed(Student.from_teacher(tiny_teacher(seed=9), variant)).eval().cuda()
    s.init_buffers()
    ids = torch.randint(0, t.cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(9)).cuda()
    cfg = SampleConfig(max_new_tokens=16)
    for make in (lambda g: StudentDecoder(s, graph=g), lambda g: TeacherDecoder(t, 3, 30, graph=g)):
        a, _ = sample.generate(make(False), ids, cfg)
        b, _ = sample.generate(make(True), ids, cfg)
        assert torch.equal(a, b)
    eager, graphed = StudentDecoder(s, graph=False), StudentDecoder(s, graph=True)
    for t_ in range(12):
        assert torch.equal(eager(ids[:, t_:t_ + 1]), graphed(ids[:, t_:t_ + 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled CUDA-graphed step needs a CUDA GPU")
def test_cuda_compiled_decoding_equals_eager():
    """On a GPU: the compiled, graphed student step (Inductor's fused kernels, other roundings)
    against the eager path: fp32 logits within 1e-4, the same greedy tokens."""
    s = perturbed(Student.from_teacher(tiny_teacher(seed=11), "rwkv7")).eval().cuda()
    s.init_buffers()
    ids = torch.randint(0, s.cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11)).cuda()
    eager, compiled = StudentDecoder(s, graph=False), StudentDecoder(s, compile=True)
    a = torch.cat([eager(ids[:, t:t + 1]) for t in range(12)], 1)
    b = torch.cat([compiled(ids[:, t:t + 1]) for t in range(12)], 1)
    assert rel_err(b, a) < 1e-4
    cfg = SampleConfig(max_new_tokens=16)
    assert torch.equal(sample.generate(StudentDecoder(s, graph=False), ids, cfg)[0],
                       sample.generate(StudentDecoder(s, compile=True), ids, cfg)[0])


# ---------------------------------------------------------------- sampling, streaming, chat turns

def test_pick_greedy_topk_topp_and_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    greedy = logits.argmax(-1)
    assert torch.equal(sample.pick(logits, SampleConfig(), None), greedy)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(sample.pick(logits, SampleConfig(temperature=1.0, top_k=1), g()), greedy)
    assert torch.equal(sample.pick(logits, SampleConfig(temperature=1.0, top_p=1e-6), g()), greedy)
    cfg = SampleConfig(temperature=0.8, top_k=10, top_p=0.9)
    draws = [sample.pick(logits, cfg, g()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])                      # same seed, same draw
    top10 = logits.topk(10, -1).indices
    many = torch.stack([sample.pick(logits, cfg, None) for _ in range(200)], 1)
    assert all(set(many[i].tolist()) <= set(top10[i].tolist()) for i in range(3))


def test_streamer_prints_whole_characters_only(tiny_hf_llama, capsys):
    """Byte-level BPE splits 🙂 and ✓ across tokens: the stream never shows a partial character
    and ends equal to decoding everything at once."""
    tok = teacher_lib.load_tokenizer(tiny_hf_llama)
    text = "Ça va 🙂 ✓ naïve — 日本"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())                        # multi-byte characters are split
    st = sample.Streamer(tok)
    chunks = []
    for i in ids:
        st(i)
        chunks.append(capsys.readouterr().out)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_chat_turns_reproduce_the_whole_conversation(tiny_hf_llama):
    """first turn + reply + end of turn + follow-up turn == the template on the whole conversation."""
    tok = teacher_lib.load_tokenizer(tiny_hf_llama)
    u1, a1, u2 = "Hi there", "Hello!", "What now?"
    pieces = (sample.chat_text(tok, u1, first=True, reply=True) + a1 + sample.turn_end(tok)
              + sample.chat_text(tok, u2, first=False, reply=True))
    whole = tok.chat_prompt([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                             {"role": "user", "content": u2}])
    assert pieces == whole


# ---------------------------------------------------------------- the CLI

def test_cli_state_out_then_state_in_equals_one_run(ckpt, tmp_path, capsys):
    """Read a document once (--max-new-tokens 0 --state-out), then ask with --state-in: the same
    tokens as one run on document + question."""
    doc, question = "The quick brown fox jumps over the lazy dog.", " It was the best of times"
    one = sample.run(SampleConfig(ckpt=str(ckpt), prompt=doc + question, max_new_tokens=8))
    sample.run(SampleConfig(ckpt=str(ckpt), prompt=doc, max_new_tokens=0, state_out=str(tmp_path / "doc.state")))
    two = sample.run(SampleConfig(ckpt=str(ckpt), prompt=question, max_new_tokens=8, state_in=str(tmp_path / "doc.state")))
    tok = teacher_lib.load_tokenizer(ckpt)
    assert tok.encode(doc) + tok.encode(question) == tok.encode(doc + question)   # same tokens either way
    assert two["student"] == one["student"] and len(one["student"]) == 8
    out = capsys.readouterr().out
    assert tok.decode(one["student"], skip_special_tokens=True) in out


def test_cli_chat_state_continues_a_conversation(ckpt, tmp_path):
    """A chat turn saved with --state-out (reply closed with the end-of-turn text) continued with
    --state-in equals the student run on the whole conversation text."""
    tok = teacher_lib.load_tokenizer(ckpt)
    path = str(tmp_path / "chat.state")
    first = sample.run(SampleConfig(ckpt=str(ckpt), prompt="Hi", chat=True, max_new_tokens=5, state_out=path))
    second = sample.run(SampleConfig(ckpt=str(ckpt), prompt="More", chat=True, max_new_tokens=5, state_in=path))
    student = Student.load(ckpt)
    ids = tok.encode(tok.chat_prompt([{"role": "user", "content": "Hi"}]))
    ids += first["student"] + tok.encode(sample.turn_end(tok)) + tok.encode(sample.chat_text(tok, "More", False, True))
    ref = teacher_lib.generate_greedy(student, ids, 5, tok.eos_id)
    assert second["student"] == ref


def test_state_tail_closes_the_turn(tiny_hf_llama):
    """Before saving: the unfed token, then the rest of the end of turn; an EOS is not doubled."""
    tok = teacher_lib.load_tokenizer(tiny_hf_llama)
    end = tok.encode(sample.turn_end(tok))
    assert end[0] == tok.eos_id
    chat, plain = SampleConfig(chat=True, max_new_tokens=4), SampleConfig(max_new_tokens=4)
    assert sample.state_tail(tok, chat, [tok.eos_id]) == end
    assert sample.state_tail(tok, chat, [7]) == [7] + end
    assert sample.state_tail(tok, plain, [tok.eos_id]) == [tok.eos_id]
    assert sample.state_tail(tok, SampleConfig(chat=True, max_new_tokens=0), []) == []


def test_cli_compare_and_errors(ckpt, tiny_hf_llama, tmp_path, capsys):
    sample.main(["--ckpt", str(ckpt), "--prompt", "The quick", "--max-new-tokens", "4",
                 "--teacher", str(tiny_hf_llama)])
    out = capsys.readouterr().out
    assert "--- student" in out and "--- teacher" in out and "agree on the first" in out
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--state-in", str(tmp_path / "missing.state")])
    assert e.value.code == 2
    assert "--state-in" in capsys.readouterr().err


BAD_SETTINGS = [("--dtype", "foo", "--dtype foo"), ("--temperature", "-1", "--temperature -1"),
                ("--top-p", "0", "--top-p 0"), ("--top-p", "1.5", "--top-p 1.5"),
                ("--max-new-tokens", "-1", "--max-new-tokens -1"), ("--device", "foo", "--device foo"),
                ("--state-out", "{tmp}/missing/x.state", "--state-out"), ("--state-out", "{tmp}", "--state-out")]
if not torch.cuda.is_available():
    BAD_SETTINGS.append(("--device", "cuda", "no CUDA GPU"))


def test_cli_compile_needs_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--prompt", "x", "--device", "cpu", "--compile"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--compile" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag, value, words", BAD_SETTINGS)
def test_cli_bad_settings_fail_before_loading(flag, value, words, tmp_path, capsys):
    """One line naming the flag, exit 2, before the (missing) checkpoint is even looked at."""
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--prompt", "x", flag, value.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and words in err and len(err.splitlines()) == 1, err
