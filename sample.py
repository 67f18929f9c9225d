"""Generate from a RADLADS student with its recurrent state, and compare with the teacher.

    python sample.py --ckpt out/rwkv7-init --prompt "The capital of France is" --max-new-tokens 40
    python sample.py --ckpt out/rwkv7-init --chat --prompt "Name three fruits." --compare
    python sample.py --ckpt out/rwkv7-init --prompt "$(cat doc.txt)" --max-new-tokens 0 --state-out doc.state
    python sample.py --ckpt out/rwkv7-init --state-in doc.state --prompt " Summary:" --max-new-tokens 60

Generation carries the student's State (model.py): the prompt runs once through the parallel
(chunked) path, in pieces of --prefill-chunk tokens, then each new token is one recurrent step of
O(1) time and memory whatever the context length (docs/method.md §3–§4; the paper's public code
re-ran the whole prefix per token, docs/method.md §12). On a GPU that step, the student's and the
teacher's, is captured once in a CUDA graph and replayed (the decoders below; docs/kernels.md §6);
sampling stays on the GPU. --compile first compiles the student's step with torch.compile, which
fuses its small operations into fewer kernels: about a minute of compiling before the first token,
worth it for long generations (docs/results.md, Generation). Tokens stream as they are made: the
growing sequence is decoded and its new suffix printed, held back while it ends inside a multi-byte
character.

--ckpt: a Student.save folder or an export.py folder (read without transformers). Tokenizer:
--tokenizer PATH (a teacher path), else the checkpoint folder's own tokenizer.json (export.py
folders have one; Student.save folders do not), else --teacher PATH's, else the embedded default
teacher's (teacher.load_tokenizer()); its vocabulary must fit the student's.
--teacher PATH or --compare (default teacher) also prints the teacher's answer for the same prompt
and seed, made with the KV-cache decoder below (TeacherDecoder, over teacher.py's modules).
--state-out saves the state after everything this run read and wrote (with --chat, the reply is
closed with the template's end-of-turn text); --state-in continues from it, so a long document read
once can be queried many times (with --chat the prompt becomes the next user turn).
Sampling: --temperature 0 (default) is greedy; otherwise softmax(logits / T) restricted to the
--top-k most likely tokens and the smallest set holding --top-p of the mass, drawn with --seed.
Decode speed, student against teacher: `python bench.py generate --ckpt out/rwkv7-init`
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import teacher as teacher_lib
from export import DTYPES, ExportError, load_checkpoint, load_tok
from model import State, Student, fp32
from teacher import apply_rope, rope_cos_sin


@dataclass
class SampleConfig:
    ckpt: str = ""                 # a Student.save or export.py folder
    prompt: str = ""
    chat: bool = False             # wrap the prompt in the teacher's chat template as a user turn
    max_new_tokens: int = 128
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int = 0
    teacher: str = ""              # teacher path: tokenizer source and --compare against it
    tokenizer: str = ""            # tokenizer source (a teacher path) without comparing
    compare: bool = False          # print the teacher's answer too (default teacher without --teacher)
    state_in: str = ""             # continue from a State file
    state_out: str = ""            # save the State after this run
    device: str = "auto"           # auto = cuda if available
    dtype: str = "fp32"            # fp32 | bf16 weights (the state stays fp32)
    threads: int = 0               # CPU threads (0 = torch's default; 1 is fastest on a busy machine)
    prefill_chunk: int = 2048      # prompt tokens per parallel forward (bounds prefill memory)
    compile: bool = False          # CUDA: torch.compile the student's decode step (~1 min warm-up, then faster)


# ---------------------------------------------------------------- decoders: tokens in, logits out
# A decoder is called with ids (B, T) and returns logits (B, T, V), continuing its sequence. Several
# tokens (the prompt) run eagerly: the student's chunked kernels, the teacher's attention over the
# cache so far. One token (decoding) runs `step`, a function of fixed shapes that reads the token and
# its position from static buffers; on CUDA it is captured once in a CUDA graph and replayed, so that
# a step costs the GPU's time for its kernels instead of thousands of launches from Python
# (docs/kernels.md §6). graph=None picks that on CUDA; graph=True on a CPU runs the same step
# eagerly (what the tests compare); graph=False always runs the eager path. The student's step can
# also be compiled (compile=True) before it is captured: one trace of the whole step (fullgraph),
# in which layer indices are constants, and Inductor's fused kernels in the graph.

class StaticStep:
    """fn() over static buffers. On CUDA the first call runs fn on a side stream (Triton compiles and
    cuBLAS initialises there, outside the capture), then captures it in a CUDA graph; later calls
    replay the graph and return its output tensor, which the next replay overwrites. Elsewhere every
    call runs fn."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.cuda, self.graph, self.out = fn, device.type == "cuda", None, None

    def __call__(self) -> torch.Tensor:
        if not self.cuda:
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                first = self.fn()                     # this step, run for real
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):        # recorded, not run: the state stays as it is
                self.out = self.fn()
            return first
        self.graph.replay()
        return self.out


class StudentDecoder:
    """The student with its carried State (model.State), advanced in place by every call. The captured
    step reads and writes the tensors of this State: replacing self.state makes the next step capture
    again."""

    def __init__(self, model: Student, state: State | None = None, graph: bool | None = None,
                 compile: bool = False):
        """compile: torch.compile the one-token step before capturing it (a static step only: on
        CUDA, or graph=True); each new capture (a new State, a new batch size) compiles again."""
        self.model, self.state = model, state
        device = model.embed_tokens.weight.device
        self.graph = device.type == "cuda" if graph is None else graph
        self.compile = compile
        self._step, self._for = None, None             # the captured step and the State it reads

    @torch.no_grad()
    def __call__(self, idx):                                        # (B, T) -> (B, T, V)
        if idx.shape[1] > 1 or not self.graph:
            logits, self.state = self.model(idx, self.state)
            return logits
        if self.state is None:
            self.state = self.model.init_state(idx.shape[0], idx.device, fp32(self.model.embed_tokens.weight).dtype)
        if self._for is not self.state:
            self.idx, self.pos = idx.clone(), torch.zeros(1, dtype=torch.long, device=idx.device)
            fn = torch.compile(self.step, fullgraph=True, dynamic=False) if self.compile else self.step
            self._step, self._for = StaticStep(fn, idx.device), self.state
        self.idx.copy_(idx)
        self.pos.fill_(self.state.pos)
        logits = self._step().clone()
        self.state.pos += 1
        return logits

    def step(self):
        """One token for every row: self.idx (B, 1) at position self.pos (1,) -> logits (B, 1, V);
        the State's tensors updated in place (Student.blocks), RoPE at the buffer's position."""
        m = self.model
        h = m.blocks(m.embed_tokens(self.idx), self.state, m.ctx(1, self.pos))
        return m.lm_head(m.norm(h))

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.layers for t in st.values())


class TeacherDecoder:
    """The teacher with a KV cache: teacher.py's modules, run one block at a time so that each
    attention reads the cached keys/values of all earlier positions. Per layer k, v: (B, Hkv, max_len,
    N), preallocated; RoPE positions continue from `pos`. The one-token step attends over the whole
    cache with the positions after `pos` masked out, so its shapes never change."""

    def __init__(self, model: teacher_lib.Teacher, B: int, max_len: int, graph: bool | None = None):
        c, w = model.cfg, model.embed_tokens.weight
        shape = (B, c.n_kv_heads, max_len, c.head_dim)
        self.model, self.pos = model, 0
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layers)]
        self.graph = w.device.type == "cuda" if graph is None else graph
        self._step = None

    def check_room(self, T: int):
        if self.pos + T > self.k[0].shape[2]:
            raise ValueError(f"KV cache holds {self.k[0].shape[2]} tokens; {self.pos + T} needed (raise max_len)")

    def attention(self, i: int, attn, x, cos, sin):
        B, T, _ = x.shape
        p = self.pos
        q, k, v = attn.project(x, x, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k[i][:, :, p:p + T] = k.transpose(1, 2)
        self.v[i][:, :, p:p + T] = v.transpose(1, 2)
        K, V = self.k[i][:, :, :p + T], self.v[i][:, :, :p + T]                      # (B, Hkv, p+T, N)
        # query t (position p + t) sees keys 0 .. p + t; one query needs no mask
        mask = None if T == 1 or p == 0 else torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(p)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask, is_causal=p == 0 and T > 1,
                                           enable_gqa=attn.H != attn.Hkv)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.H * attn.N))

    @torch.no_grad()
    def __call__(self, idx):                                        # (B, T) -> (B, T, V)
        self.check_room(idx.shape[1])
        if idx.shape[1] == 1 and self.graph:
            if self._step is None:
                self.idx, self.at = idx.clone(), torch.zeros(1, dtype=torch.long, device=idx.device)
                self._step = StaticStep(self.step, idx.device)
            self.idx.copy_(idx)
            self.at.fill_(self.pos)
            logits = self._step().clone()
            self.pos += 1
            return logits
        t = self.model
        cos, sin = rope_cos_sin(t.inv_freq, idx.shape[1], offset=self.pos)
        h = t.embed_tokens(idx)
        for i, block in enumerate(t.layers):
            h = h + self.attention(i, block.self_attn, block.input_layernorm(h), cos, sin)
            h = h + block.mlp(block.post_attention_layernorm(h))
        self.pos += idx.shape[1]
        return t.lm_head(t.norm(h))

    def step(self):
        """One token for every row: self.idx (B, 1) at position self.at (1,) -> logits (B, 1, V); its
        keys and values written into the cache at that position."""
        t = self.model
        cos, sin = rope_cos_sin(t.inv_freq, 1, offset=self.at)
        live = (torch.arange(self.k[0].shape[2], device=self.at.device) <= self.at).view(1, 1, 1, -1)
        h = t.embed_tokens(self.idx)
        for i, block in enumerate(t.layers):
            h = h + self.attend(i, block.self_attn, block.input_layernorm(h), cos, sin, live)
            h = h + block.mlp(block.post_attention_layernorm(h))
        return t.lm_head(t.norm(h))

    def attend(self, i: int, attn, x, cos, sin, live):
        """Attention of one token over the whole cache, keys after self.at masked out (live). The
        G = H/Hkv query heads that read one kv head (head h reads h // G) attend as G query rows of
        that head, so K and V are read once, never repeated."""
        B = x.shape[0]
        q, k, v = attn.project(x, x, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k[i].index_copy_(2, self.at, k.transpose(1, 2))
        self.v[i].index_copy_(2, self.at, v.transpose(1, 2))
        q = q.view(B, attn.Hkv, attn.H // attn.Hkv, attn.N)
        y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=live)   # (B, Hkv, G, N)
        return attn.o_proj(y.reshape(B, 1, attn.H * attn.N))

    def cache_bytes(self) -> int:             # the part in use
        return sum(2 * c[:, :, :self.pos].numel() * c.element_size() for c in self.k)


# ---------------------------------------------------------------- sampling and the generation loop

def pick(logits, cfg: SampleConfig, gen: torch.Generator | None):
    """logits (B, V) -> next ids (B,): greedy at temperature 0, else top-k / top-p sampling, on the
    logits' device (gen: a generator of that device), with no copy to the host."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= cfg.top_p          # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)          # on the logits' device


@torch.no_grad()
def prefill(decoder, idx, chunk: int):
    """Run the prompt (B, T) through the decoder in pieces of `chunk`; logits of the last token (B, V)."""
    for s in range(0, idx.shape[1], chunk):
        logits = decoder(idx[:, s:s + chunk])
    return logits[:, -1]


@torch.no_grad()
def generate(decoder, prompt, cfg: SampleConfig, eos_id=None, on_token=None):
    """Continue `prompt` (B, T) for up to cfg.max_new_tokens. Returns (new ids (B, n), unfed (B, 0..1)):
    the last id made but not yet fed to the decoder (an EOS, or the last new token). Stops once every
    row has made eos_id; the EOS is not among the new ids. on_token(id) streams row 0.
    The tokens stay on the decoder's device: the host waits for one only to stream it (on_token) or
    to see whether every row has ended (eos_id). Draws come from a generator on that device seeded
    with cfg.seed, so a seed's samples differ between a CPU and a GPU."""
    gen = torch.Generator(prompt.device).manual_seed(cfg.seed)
    logits = prefill(decoder, prompt, cfg.prefill_chunk)
    out, done = [], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(cfg.max_new_tokens):
        nxt = pick(logits, cfg, gen)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                return (torch.stack(out, 1) if out else prompt[:, :0]), nxt[:, None]
        out.append(nxt)
        if on_token:
            on_token(int(nxt[0]))
        if i + 1 < cfg.max_new_tokens:
            logits = decoder(nxt[:, None])[:, -1]                  # one recurrent step (or cached attention)
    new = torch.stack(out, 1) if out else prompt[:, :0]
    return new, new[:, -1:]


class Streamer:
    """Prints the text of a growing token sequence: decode everything, print the new suffix; wait
    while the text ends in U+FFFD (a multi-byte character split across tokens)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.text = tok, out, [], ""

    def __call__(self, token_id: int):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.write(text)

    def write(self, text):
        out = self.out or sys.stdout
        out.write(text[len(self.text):])   # decoded text only grows at its end
        out.flush()
        self.text = text

    def end(self):
        """Flush what was held back (the answer stopped inside a character: its bytes print as U+FFFD)."""
        self.write(self.tok.decode(self.ids, skip_special_tokens=True))


# ---------------------------------------------------------------- chat turns and saved states

_U, _A = "\x00user\x00", "\x00assistant\x00"    # placeholders no real message contains


def chat_text(tok, user: str, first: bool, reply: bool) -> str:
    """The template's text for one more user turn (+ the assistant header when reply). After a
    saved state (first=False) it is what the template adds after an earlier exchange, so a
    default system prompt is not repeated."""
    msg = {"role": "user", "content": user}
    if first:
        return tok.chat_prompt([msg], add_generation_prompt=reply)
    past = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}]
    before = tok.chat_prompt(past, add_generation_prompt=False)
    full = tok.chat_prompt(past + [msg], add_generation_prompt=reply)
    if not full.startswith(before):
        raise ValueError(f"{tok.name}'s chat template rewrites earlier turns; drop --chat when continuing "
                         "a saved state and write the turn text yourself")
    return full[len(before):]


def turn_end(tok) -> str:
    """What the template writes after an assistant reply (ChatML: '<|im_end|>\\n')."""
    text = tok.chat_prompt([{"role": "user", "content": _U}, {"role": "assistant", "content": _A}],
                           add_generation_prompt=False)
    return text[text.rindex(_A) + len(_A):]


def load_state(path, student: Student, device) -> State:
    """The State a --state-out run saved, checked to belong to this student."""
    try:
        state = State.load(path, device=device)
    except Exception as e:  # missing file, not safetensors, no metadata
        raise ValueError(f"--state-in {path}: cannot read it ({type(e).__name__}: {e}); "
                         "pass a file written by --state-out") from None
    want = student.init_state(1, device)
    if len(state.layers) != len(want.layers) or any(
            {k: t.shape for k, t in a.items()} != {k: t.shape for k, t in b.items()}
            for a, b in zip(state.layers, want.layers)):
        raise ValueError(f"--state-in {path} was saved by a different student (layer/state shapes differ); "
                         "use the checkpoint that wrote it")
    return state


# ---------------------------------------------------------------- main



def check(cfg: SampleConfig) -> torch.device:
    """One-line errors for bad settings, before anything is loaded; returns the device to run on."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype}: use one of {sorted(DTYPES)}")
    if cfg.temperature < 0:
        raise ValueError(f"--temperature {cfg.temperature} is negative: use 0 for greedy or a positive value")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p {cfg.top_p} is outside (0, 1]: use 1 for no nucleus cut")
    if cfg.top_k < 0:
        raise ValueError(f"--top-k {cfg.top_k} is negative: use 0 for no top-k cut")
    if cfg.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} is negative: use 0 to only read the prompt")
    if cfg.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk {cfg.prefill_chunk} must be at least 1")
    if cfg.state_out:
        out = Path(cfg.state_out)
        folder = out.parent.resolve()
        if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--state-out {cfg.state_out}: cannot write a file there (a folder, or its folder "
                             "is missing or read-only); pass a writable file path")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device {cfg.device} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is visible on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: sample.py runs on cpu or cuda")
    if cfg.compile and device.type != "cuda":
        raise ValueError(f"--compile compiles the CUDA-graphed decode step; on {device} drop --compile")
    return device


def run(cfg: SampleConfig):
    """Generate from the student (and the teacher with --teacher/--compare), stream the text, save the
    state with --state-out. Returns {"student": new ids, "teacher": new ids (when compared)}."""
    device = check(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    student = load_checkpoint(cfg.ckpt).to(device, dtype).eval().requires_grad_(False)
    student.init_buffers()
    tok = teacher_lib.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else load_tok(cfg.ckpt, cfg.teacher or None)
    if tok.vocab_size > student.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, the student {student.cfg.vocab_size}: "
                         "pass the student's own teacher with --teacher")
    teacher = None
    if cfg.teacher or cfg.compare:
        teacher, teacher_tok = teacher_lib.load_teacher(cfg.teacher or None, dtype=dtype, device=device)
        teacher.requires_grad_(False)
        if teacher_tok.fingerprint != tok.fingerprint:
            raise ValueError(f"the student's tokenizer ({tok.name}) differs from the teacher's ({teacher_tok.name}): "
                             "compare with the student's own teacher (--teacher PATH)")
    if cfg.state_in and teacher is not None:
        raise ValueError("--state-in continues the student only (the teacher has no saved state): "
                         "drop --compare/--teacher")
    state = load_state(cfg.state_in, student, device) if cfg.state_in else None
    if cfg.chat:
        text = chat_text(tok, cfg.prompt, first=state is None, reply=cfg.max_new_tokens > 0)
    else:
        text = cfg.prompt
    ids = ([tok.bos_id] if tok.add_bos and state is None and not cfg.chat else []) + tok.encode(text)
    if not ids:
        raise ValueError("the prompt is empty: pass --prompt TEXT (or --state-in to continue a saved state)")
    prompt = torch.tensor([ids], device=device)
    runs = [("student", StudentDecoder(student, state, compile=cfg.compile))]
    if teacher is not None:
        runs.append(("teacher", TeacherDecoder(teacher, 1, len(ids) + cfg.max_new_tokens + 1)))
    answers, unfed = {}, {}
    for name, dec in runs:
        if len(runs) > 1:
            print(f"\n--- {name} ({cfg.ckpt if name == 'student' else teacher_tok.name}) ---")
        t0 = time.perf_counter()
        stream = Streamer(tok)
        new, rest = generate(dec, prompt, cfg, tok.eos_id, stream)
        stream.end()
        dt = time.perf_counter() - t0
        answers[name], unfed[name] = new[0].tolist(), rest[0].tolist()
        print(f"\n[{name}: {len(answers[name])} tokens in {dt:.2f} s, prompt {len(ids)} tokens]", file=sys.stderr)
    if len(answers) == 2:
        s, t = answers["student"], answers["teacher"]
        same = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
        print(f"\nstudent and teacher agree on the first {same} of {max(len(s), len(t))} tokens")
    if cfg.state_out:
        dec = runs[0][1]
        tail = state_tail(tok, cfg, unfed["student"])
        if tail:                                  # the state must have read everything shown
            dec(torch.tensor([tail], device=device))
        dec.state.save(cfg.state_out)
        print(f"state after {dec.state.pos} tokens saved to {cfg.state_out}", file=sys.stderr)
    return answers


def state_tail(tok, cfg: SampleConfig, unfed: list[int]) -> list[int]:
    """Tokens to feed before saving: the last one made (or the EOS), and with --chat the rest of the
    template's end of turn, so that the next --state-in run starts a clean user turn."""
    if not cfg.chat or cfg.max_new_tokens == 0:
        return unfed
    end = tok.encode(turn_end(tok))
    return end if unfed == end[:1] else unfed + end


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(SampleConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    cfg = SampleConfig(**vars(p.parse_args(argv)))
    if not cfg.ckpt:
        p.error("--ckpt is required (a Student.save folder, e.g. from: python model.py --out out/rwkv7-init)")
    try:
        run(cfg)
    except (ValueError, ExportError, teacher_lib.TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
