"""Every benchmark of radlads, each timed beside an anchor measured in the same run.

    kernels   the recurrences of kernels.py (docs/kernels.md §5-§6). CPU: the chunked PyTorch path
              against the step-by-step one. GPU: the Triton backend against fla's chunk_rwkv7 /
              chunk_gla (when fla is installed) and causal SDPA, forward, forward+backward and peak
              memory; then one decode step against fla's fused_recurrent_rwkv7 and a copy of the
              state, called and replayed from a CUDA graph.
    train     distill.py's steps on random weights of a teacher shape (docs/results.md): tokens/s
              per device, peak memory and MFU against the bf16 matmul ceiling measured in the run.
    generate  decoding with a student's recurrent state against its teacher's KV cache (sample.py's
              decoders, CUDA-graphed on a GPU) at several context lengths and batch sizes: tokens/s,
              ms per step, cache size, and each step's HBM roofline against the copy bandwidth
              measured in the run.

    python bench.py kernels --shapes smol-L512 --reps 3 --threads 1          # CPU
    python bench.py kernels --shapes smol-L512,q7b-L4k                       # GPU (fla optional)
    python bench.py train --shape tiny --step 1 --ctx 32 --updates 2         # CPU: does it run
    python bench.py train --shape smol --step 2 --micro-batch 16             # one GPU
    torchrun --nproc_per_node=2 bench.py train --shape q7b --step 2 --micro-batch 8 --updates 6
    python bench.py generate --ckpt out/step3/student --lengths 128,512 --batches 1,4 --threads 1
    python bench.py generate --dtype bf16 --no-prefill              # GPU: random weights, SmolLM2 shape
    python bench.py generate --dtype bf16 --no-prefill --compile --lengths 512 --batches 1,32
    python bench.py generate --shape q7b --dtype bf16 --no-prefill --lengths 4096 --batches 1

The benchmarks use the library's public functions (the same code a real run executes); none of
them lives in a library file.
"""
import argparse
import dataclasses
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import distill
import teacher as teacher_lib
from export import DTYPES, load_checkpoint
from kernels import rwkv6_attn, rwkv7_attn
from model import MIXERS, Student
from sample import SampleConfig, StaticStep, check, StudentDecoder, TeacherDecoder, pick, prefill
from teacher import Teacher, TeacherConfig


# ---------------------------------------------------------------------------------------------
# kernels: one recurrence at a time
# ---------------------------------------------------------------------------------------------
# (B, T, H, N) of docs/kernels.md §5: SmolLM2-135M's heads and Qwen2.5-7B's
KERNEL_SHAPES = {"smol-L512": (16, 512, 9, 64), "smol-L4k": (2, 4096, 9, 64),
          "q7b-L512": (32, 512, 28, 128), "q7b-L4k": (4, 4096, 28, 128), "q7b-L16k": (1, 16384, 28, 128)}
# On CPU only what fits a small machine: smol-L512 at B = 2, and smol-L4k at B = 1, T = 1024.
# On a shared CPU use --threads 1: OpenMP threads waiting on a busy core make single runs erratic.
CPU_SHAPES = {"smol-L512": dict(B=2), "smol-L4k": dict(B=1, T=1024)}
ATTN = {"rwkv7": rwkv7_attn, "rwkv6": rwkv6_attn}


def kernel_inputs(variant, B, T, H, N, dtype, device, seed=0):
    """Inputs in the range the model's parameterisation produces (docs/method.md §3-§4), requiring
    grad; log w in fp32, as the model passes it."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=gen)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    if variant == "rwkv7":
        log_w = -math.exp(-0.5) * torch.sigmoid(rnd())
        kk, iclr = F.normalize(rnd(), dim=-1), torch.sigmoid(rnd())
        xs = dict(r=r, log_w=log_w, k=k * (1 - log_w.exp() + iclr), v=v, a=-kk, b=kk * iclr)
    else:
        log_w = torch.clamp(-torch.exp(rnd()), min=-5.0)
        xs = dict(r=r, log_w=log_w, k=k * (1 - log_w.exp()), v=v)
    return {n: x.to(device, dtype if n != "log_w" else torch.float32).requires_grad_()
            for n, x in xs.items()}


def _cpu_ms(fn, reps):
    """Median wall time of fn() in ms over reps calls, after one warm-up call (CPU)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def kernels_cpu(cfg):
    """CPU: one row per backend (naive, torch), forward and forward+backward time, and the speed-up
    over naive."""
    dtype = torch.float32                                             # bf16 is slow on CPU
    names = cfg.shapes.split(",") if cfg.shapes else list(CPU_SHAPES)
    print(f"device cpu, inputs {dtype}, {torch.get_num_threads()} threads; median ms; "
          f"x = naive time / this time")
    head = (f"{'shape':<10} {'B':>3} {'T':>6} {'H':>3} {'N':>4} {'variant':<7} {'backend':<7} "
            f"{'fwd':>9} {'x':>6} {'fwd+bwd':>9} {'x':>6}")
    print(head + "\n" + "-" * len(head))
    for name in names:
        B, T, H, N = KERNEL_SHAPES[name]
        small = CPU_SHAPES.get(name, {})
        B, T = cfg.batch or small.get("B", B), cfg.seq or small.get("T", T)
        for variant in cfg.variants.split(","):
            xs = kernel_inputs(variant, B, T, H, N, dtype, "cpu")
            cot = [torch.randn_like(xs["v"]), torch.randn(B, H, N, N)]
            ms = {}
            for backend in ("naive", "torch"):
                call = lambda: ATTN[variant](**xs, backend=backend)  # noqa: E731
                with torch.no_grad():
                    f = _cpu_ms(call, cfg.reps)
                fb = lambda: torch.autograd.grad(call(), list(xs.values()), cot)  # noqa: E731
                saved_gb = B * H * T * N * N * 4 / 1e9 * (2 if variant == "rwkv7" else 1)
                skip = backend == "naive" and saved_gb > cfg.naive_gb    # the naive loop keeps every S_t
                ms[backend] = f, (float("nan") if skip else _cpu_ms(fb, cfg.reps))
                x_f, x_fb = (ms["naive"][i] / ms[backend][i] for i in (0, 1))
                print(f"{name:<10} {B:>3} {T:>6} {H:>3} {N:>4} {variant:<7} {backend:<7} "
                      f"{ms[backend][0]:>9.2f} {x_f:>6.1f} {ms[backend][1]:>9.2f} {x_fb:>6.1f}", flush=True)


def _fla():
    """fla's kernels (the anchors of docs/kernels.md §5) when installed, else None."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        return None
    return chunk_rwkv7, chunk_gla, fused_recurrent_rwkv7


def _peak_mib(fn):
    """Peak CUDA memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernels_gpu(cfg):
    """GPU: the Triton backend next to fla's chunk_rwkv7 (default and the best configuration for
    RAD-RWKV7's decay range), chunk_gla and causal SDPA, same inputs and run; ratio = ours / the
    faster fla call. Then one decode step against fused_recurrent_rwkv7 (kernels_decode)."""
    import triton
    fla = _fla()
    gpu_ms = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    names = cfg.shapes.split(",") if cfg.shapes else list(KERNEL_SHAPES)
    anchored = set(cfg.fla_shapes.split(",") if cfg.fla_shapes else names)
    print(f"device {torch.cuda.get_device_name()}, bf16 inputs, fp32 state; median ms; "
          f"ratio = ours / fla (the faster of fla's calls); peak = extra MiB of one fwd+bwd"
          + ("" if fla else "; fla not installed: no anchors"))
    head = (f"{'shape':<10} {'variant':<7} {'ours f':>8} {'ours f+b':>9} {'fla f':>8} {'fla f+b':>8} "
            f"{'ratio f':>7} {'ratio fb':>8} {'sdpa f+b':>8} {'peak':>7} {'fla peak':>8}")
    print(head + "\n" + "-" * len(head))
    for name in names:
        B, T, H, N = KERNEL_SHAPES[name]
        for variant in cfg.variants.split(","):
            xs = kernel_inputs(variant, B, T, H, N, torch.bfloat16, "cuda")
            dy = torch.randn_like(xs["v"])
            fn = ATTN[variant]
            with torch.no_grad():
                f = gpu_ms(lambda: fn(**xs, backend="triton"))
            fb_call = lambda: fn(**xs, backend="triton")[0].backward(dy)  # noqa: E731
            fb = gpu_ms(fb_call)
            peak = _peak_mib(fb_call)
            row = dict(f=f, fb=fb, peak=peak)
            if name in anchored:
                x = {n: t.detach().bfloat16().requires_grad_() for n, t in xs.items()}   # fla: bf16 log w
                if fla and variant == "rwkv7":
                    calls = [lambda: fla[0](x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5)[0],
                             lambda: fla[0](x["r"], x["log_w"], x["k"], x["v"], x["a"], x["b"], scale=N ** -0.5,
                                            safe_gate=True, lower_bound=-math.exp(-0.5), chunk_size=64)[0]]
                elif fla:
                    calls = [lambda: fla[1](x["r"], x["k"], x["v"], x["log_w"], scale=N ** -0.5)[0]]
                if fla:
                    with torch.no_grad():
                        row["fla_f"] = min(gpu_ms(c) for c in calls)
                    fbs = [(gpu_ms(lambda c=c: c().backward(dy)), c) for c in calls]
                    row["fla_fb"], best = min(fbs, key=lambda t: t[0])
                    row["fla_peak"] = _peak_mib(lambda: best().backward(dy))
                q, k_, v_ = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (x["r"], x["k"], x["v"]))
                do = dy.transpose(1, 2).contiguous()
                row["sdpa_fb"] = gpu_ms(lambda: F.scaled_dot_product_attention(q, k_, v_, is_causal=True).backward(do))
                del x, q, k_, v_
            get = lambda key: row.get(key, float("nan"))  # noqa: E731
            print(f"{name:<10} {variant:<7} {f:>8.3f} {fb:>9.3f} {get('fla_f'):>8.3f} {get('fla_fb'):>8.3f} "
                  f"{f / get('fla_f'):>7.2f} {fb / get('fla_fb'):>8.2f} {get('sdpa_fb'):>8.3f} "
                  f"{peak:>7.0f} {get('fla_peak'):>8.0f}", flush=True)
            xs = None                                    # free the inputs before the next shape
            torch.cuda.empty_cache()
    kernels_decode(fla, gpu_ms)


def kernels_decode(fla, gpu_ms):
    """One decode step at H=28, N=128, batch 1 and 64, against fla's fused_recurrent_rwkv7 (fla:
    _fla()'s kernels, or None) and a copy of the state; gpu_ms(fn) -> ms."""
    # The step reads and writes the whole fp32 state: a device copy of it is the floor it cannot beat.
    # At batch 1 a call is bound by its launch from Python; a CUDA graph replays the captured
    # kernels without it, which is how a decoding loop would run them (fla's call graphed too).
    print(f"\ndecode step, H=28, N=128 (RWKV7), µs; graph = the call captured in a CUDA graph, replayed\n"
          f"{'batch':>5} {'ours':>8} {'fla':>8} {'ratio':>6} {'ours graph':>10} {'fla graph':>9} "
          f"{'graph/fla':>9} {'graph/graph':>11} {'state copy':>10}")
    for B in (1, 64):
        with torch.no_grad():
            xs = {n: t.detach() for n, t in kernel_inputs("rwkv7", B, 1, 28, 128, torch.bfloat16, "cuda").items()}
            S, S2 = torch.zeros(B, 28, 128, 128, device="cuda"), torch.empty(B, 28, 128, 128, device="cuda")
            w16 = xs["log_w"].bfloat16()
            ours_call = lambda: rwkv7_attn(**xs, state=S, backend="triton")  # noqa: E731
            fla_call = lambda: fla[2](xs["r"], w16, xs["k"], xs["v"], xs["a"], xs["b"], scale=128 ** -0.5,  # noqa: E731
                                      initial_state=S, output_final_state=True)
            t = dict(ours=gpu_ms(ours_call), ours_graph=gpu_ms(_graphed(ours_call)), copy=gpu_ms(lambda: S2.copy_(S)))
            if fla:
                t["fla"] = gpu_ms(fla_call)
                try:
                    t["fla_graph"] = gpu_ms(_graphed(fla_call))
                except Exception as e:                # the comparison stays with fla's plain call
                    print(f"fla's call could not be captured in a CUDA graph: {e}")
        us = {n: 1e3 * t.get(n, float("nan")) for n in ("ours", "fla", "ours_graph", "fla_graph", "copy")}
        print(f"{B:>5} {us['ours']:>8.1f} {us['fla']:>8.1f} {us['ours'] / us['fla']:>6.2f} {us['ours_graph']:>10.1f} "
              f"{us['fla_graph']:>9.1f} {us['ours_graph'] / us['fla']:>9.2f} {us['ours_graph'] / us['fla_graph']:>11.2f} "
              f"{us['copy']:>10.1f}", flush=True)


def _graphed(fn):
    """fn captured in a CUDA graph as sample.py's decoders capture their step (StaticStep: one call on
    a side stream, outside the capture, compiles and autotunes); returns the replay."""
    step = StaticStep(fn, torch.device("cuda"))
    step()
    return step


# ---------------------------------------------------------------------------------------------
# train: distill.py's updates on random weights
# ---------------------------------------------------------------------------------------------

MODEL_SHAPES = {  # teacher shapes, random weights
    "smol": TeacherConfig(),  # SmolLM2-135M, the default teacher
    "q3b": TeacherConfig(arch="qwen2", vocab_size=151936, hidden_size=2048, n_layers=36, n_heads=16,
                         n_kv_heads=2, head_dim=128, intermediate_size=11008, rope_theta=1e6,
                         attn_bias=True, tie_embeddings=True),
    "q7b": TeacherConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, n_layers=28, n_heads=28,
                         n_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6,
                         attn_bias=True, tie_embeddings=False),
    "q32b": TeacherConfig(arch="qwen2", vocab_size=152064, hidden_size=5120, n_layers=64, n_heads=40,
                          n_kv_heads=8, head_dim=128, intermediate_size=27648, rope_theta=1e6,
                          attn_bias=True, tie_embeddings=False),
    "tiny": TeacherConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, intermediate_size=128),
}


def train_config(args, step, world, scfg, free) -> distill.StepConfig:
    """distill.step_config's rules for a timed run of a teacher of this shape (not the embedded
    default's budgets): the paper's ctx; the paper's batch on a GPU (free: bytes for activations,
    filled by distill.fit_micro), one micro-batch of the paper's size per device on a CPU; flags win;
    --updates updates at a flat lr."""
    d = distill.STEPS[step]
    batch = args.batch or (d["batch"] if free is not None else world * (args.micro_batch or d["micro"]))
    flags = ["--step", str(step), "--teacher", args.shape, "--tokens", "1", "--batch", str(batch),
             "--ctx", str(args.ctx or d["ctx"])]
    if args.micro_batch:
        flags += ["--micro-batch", str(args.micro_batch)]
    for name, on in (("ckpt-act", args.ckpt_act), ("compile", args.compile)):   # None: distill's default
        if on is not None:
            flags.append(f"--{name}" if on else f"--no-{name}")
    cfg = distill.step_config(distill.parse_args(flags), step, world, 0, free is not None, None, scfg, free)
    return dataclasses.replace(cfg, updates=args.updates, warmup=0, lr_end=cfg.lr)


def random_models(shape, variant, seed, device):
    """A teacher of `shape` with random weights made on the device (seeded), and its student."""
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = Teacher(MODEL_SHAPES[shape])
    return teacher, Student.from_teacher(teacher, variant)


def random_weights(args, step, device):
    """Rank 0: random_models' configs and weights; the teacher is kept for steps 1 and 2 only, as
    distill.read_weights does."""
    t, s = random_models(args.shape, args.variant, args.seed, device)
    keep = step != 3
    return (t.cfg if keep else None, s.cfg), (t.state_dict() if keep else {}, s.state_dict())


def matmul_tflops(device):
    """The bf16 matmul ceiling of this device, measured now (8192³, do_bench median)."""
    from triton.testing import do_bench  # GPU only
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / do_bench(lambda: a @ a, return_mode="median") / 1e9


def flops_per_token(tcfg, scfg, step, ctx, ckpt_act):
    """Matmul FLOPs per token that the step runs (RWKV state updates and softmax are a few % and not
    counted):
      P_T, P_S = teacher / student matmul parameters (all Linear weights incl. lm_head),
      A = 2·L·ctx·H·N causal-attention FLOPs of the teacher per token,  VC = vocab × C.
      step 1: teacher trunk fwd 2(P_T − VC) + A, student time-mix fwd+bwd 6·P_tm
      step 2: teacher fwd 2·P_T + A + head recompute 2·VC, student fwd+bwd 6·P_S (+ recompute 2·P_S)
      step 3: student 6·P_S (+ recompute 2·P_S)
    (the head's chunks are recomputed in backward; the blocks only under activation checkpointing).
    Returns (FLOPs, the formula, its terms)."""
    lin = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))
    with torch.device("meta"):
        student = Student(scfg)
        P_T, P_S = lin(Teacher(tcfg)), lin(student)
        P_tm = sum(lin(b.time_mix) + sum(p.numel() for n, p in b.time_mix.named_parameters()
                                         if p.dim() == 2 and "proj" not in n) for b in student.layers)
    VC, A = tcfg.vocab_size * tcfg.hidden_size, 2 * tcfg.n_layers * ctx * tcfg.n_heads * tcfg.head_dim
    S = 8 if ckpt_act else 6
    flops = {1: 2 * (P_T - VC) + A + 6 * P_tm, 2: 2 * P_T + A + 2 * VC + S * P_S, 3: S * P_S}[step]
    formula = {1: "2(P_T-VC) + A + 6 P_tm", 2: f"2 P_T + A + 2 VC + {S} P_S", 3: f"{S} P_S"}[step]
    return flops, formula, dict(P_T=P_T, P_S=P_S, P_tm=P_tm, VC=VC, A=A)


def train_step(args, step, device):
    """Build and shard as distill.run_step does, then time the updates. Returns the numbers."""
    rank, world, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    (tcfg, scfg), big = distill.on_rank0(lambda: random_weights(args, step, device))
    tsd, ssd = big or ({}, {})  # the other ranks receive the weights while sharding
    teacher_params = sum(v.numel() for v in tsd.values()) if tcfg else 0
    cfg = train_config(args, step, world, scfg, distill.activation_budget(device, scfg, teacher_params, step, world))
    teacher = distill.shard_teacher(tcfg, tsd, device, cfg.compile) if tcfg else None
    model = distill.shard_student(scfg, ssd, step, device, cfg.ckpt_act, cfg.compile)
    del tsd, ssd, big
    params, opt = distill.make_optimizer(model, cfg.lr)
    flops, formula, terms = flops_per_token(tcfg or MODEL_SHAPES[args.shape], scfg, step, cfg.ctx, cfg.ckpt_act)
    ceiling = matmul_tflops(device) if cuda else float("nan")
    if cuda:  # the peak of training, not of building the full weights on the device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    vocab = (tcfg or MODEL_SHAPES[args.shape]).vocab_size
    times = []
    for _ in range(args.updates + 2):  # 2 warm-up updates (compile, allocator)
        x = torch.randint(0, vocab, (cfg.batch // world, cfg.ctx + 1), generator=g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for xb in x.split(cfg.micro):
            distill.forward_backward(model, teacher, xb[:, :-1].to(device), xb[:, 1:].to(device), step, cfg.accum)
        nn.utils.clip_grad_norm_(params, 1.0)  # the update as distill.train makes it
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sorted(times[2:])[len(times[2:]) // 2]
    tps = cfg.batch * cfg.ctx / dt / world
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    mfu = tps * flops / (ceiling * 1e12)
    if rank == 0:
        print(f"bench step {step} shape {args.shape}: {world} device(s), batch {cfg.batch} × ctx {cfg.ctx}, "
              f"micro {cfg.micro}, act-ckpt {cfg.ckpt_act}, compile {cfg.compile}: "
              f"{tps:,.0f} tokens/s per device, {dt * 1e3:.0f} ms/update, peak memory {mem:.1f} GiB, "
              f"{flops / 1e9:.2f} GFLOP/token, matmul ceiling {ceiling:.0f} TFLOP/s, MFU {100 * mfu:.1f}%\n"
              f"  FLOP/token = {formula}: " + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in terms.items())
              + " (matmuls; see flops_per_token)", flush=True)
    return {"tok_s_per_device": tps, "peak_gib": mem, "gflop_per_token": flops / 1e9, "mfu": mfu}


# ---------------------------------------------------------------------------------------------
# generate: recurrent state against KV cache
# ---------------------------------------------------------------------------------------------
# A decode step reads every weight once (the embedding only in its B rows, unless it is also the
# head) and the whole state or KV cache in use, and writes the state (the student) or one position
# of the cache (the teacher). Those bytes over the copy bandwidth measured in the same run are the
# step's HBM roofline: no step can be faster.

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=2**30, reps=10) -> float:
    """Bytes per second of a device copy (read + written), measured now: the roofline's denominator."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: all of them, less an embedding table that is not
    also the head (a step reads B of its rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())     # tied weights once
    emb = model.embed_tokens.weight
    return total - (0 if emb is model.lm_head.weight else emb.numel() * emb.element_size())


def step_bytes(dec) -> int:
    """Bytes one step reads and writes beyond the weights: the state twice (the student), or the
    cache in use and the new position's keys and values (the teacher)."""
    if isinstance(dec, StudentDecoder):
        return 2 * dec.cache_bytes()
    k = dec.k[0]
    return dec.cache_bytes() + 2 * len(dec.k) * k[:, :, :1].numel() * k.element_size()


@torch.no_grad()
def generate_row(make_decoder, B, T, tokens, vocab, device, bandwidth, sampling, prefill_chunk=2048, seed=0,
                 prompt=True):
    """Decode `tokens` steps back to back after T tokens of context (a random prompt, or with
    prompt=False the state/cache set to position T without reading one: a step's time does not
    depend on the values it reads). make_decoder(B, max_len, first position). Returns {tok_s (over B rows),
    ms (per step), cache_mib, roofline_ms, peak_mib (CUDA only, else nan)}."""
    g = torch.Generator().manual_seed(seed)
    dec = make_decoder(B, T + tokens + 4, 0 if prompt else T)
    if prompt:
        logits = prefill(dec, torch.randint(0, vocab, (B, T), generator=g).to(device), prefill_chunk)
    else:
        logits = dec(torch.randint(0, vocab, (B, 1), generator=g).to(device))[:, -1]
    gen = torch.Generator(device).manual_seed(seed)
    nxt = pick(logits, sampling, gen)[:, None]
    for _ in range(2):                             # warm-up: the first one-token call captures the graph
        nxt = pick(dec(nxt)[:, -1], sampling, gen)[:, None]
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(tokens):                        # as generation runs: no host sync per token
        nxt = pick(dec(nxt)[:, -1], sampling, gen)[:, None]
    _sync(device)
    step = (time.perf_counter() - t0) / tokens
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    roofline = (weight_bytes(dec.model) + step_bytes(dec)) / bandwidth
    return {"tok_s": B / step, "ms": 1e3 * step, "cache_mib": dec.cache_bytes() / 2**20,
            "roofline_ms": 1e3 * roofline, "peak_mib": peak}


def generate_table(student, teacher, lengths, batches, tokens, device, prefill_chunk=2048, seed=0, prompt=True,
                   graph=None, temperature=0.0, compile=False):
    """Print one row per (T, B) and return them: [{"T", "B", "student": generate_row(...), "teacher": ...}]."""
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    sampling = SampleConfig(temperature=temperature)
    graphed = device.type == "cuda" if graph is None else graph
    context = "a random prompt" if prompt else "state/cache set to T, no prompt read"
    where = (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f", {torch.get_num_threads()} threads")
    print(f"decode after T tokens of context ({context}); {tokens} steps back to back; device {device}{where}"
          f"; weights {student.embed_tokens.weight.dtype}, state fp32; "
          f"{'one-token steps replayed from a CUDA graph' if graphed else 'eager steps'}"
          f"{' (the student step compiled by torch.compile)' if compile else ''}; "
          f"{'greedy' if temperature == 0 else f'sampling at temperature {temperature}'}\n"
          f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + written); weights read per step: student "
          f"{weight_bytes(student) / 2**20:,.0f} MiB, teacher {weight_bytes(teacher) / 2**20:,.0f} MiB; "
          "roof = step bytes / copy bandwidth, % = roof / ms; cache = state (student) / KV cache (teacher)")
    head = (f"{'T':>6} {'B':>4} | {'student tok/s':>13} {'ms/step':>8} {'roof ms':>8} {'%':>4} {'state MiB':>10} | "
            f"{'teacher tok/s':>13} {'ms/step':>8} {'roof ms':>8} {'%':>4} {'KV MiB':>10} | {'speed x':>7}")
    print(head + "\n" + "-" * len(head), flush=True)

    def make_student(B, max_len, at):
        dec = StudentDecoder(student, student.init_state(B, device), graph=graph, compile=compile)
        dec.state.pos = at
        return dec

    def make_teacher(B, max_len, at):
        dec = TeacherDecoder(teacher, B, max_len, graph=graph)
        dec.pos = at
        return dec

    results = []
    for T in lengths:
        for B in batches:
            rows = []
            for make in (make_student, make_teacher):
                try:
                    rows.append(generate_row(make, B, T, tokens, student.cfg.vocab_size, device, bandwidth, sampling,
                                             prefill_chunk, seed, prompt))
                except (torch.OutOfMemoryError, MemoryError):       # report the sizes that fit
                    rows.append(dict.fromkeys(("tok_s", "ms", "cache_mib", "roofline_ms", "peak_mib"), float("nan")))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            s, t = rows
            pct = lambda r: 100 * r["roofline_ms"] / r["ms"]  # noqa: E731
            print(f"{T:>6} {B:>4} | {s['tok_s']:>13,.1f} {s['ms']:>8.3f} {s['roofline_ms']:>8.3f} {pct(s):>4.0f} "
                  f"{s['cache_mib']:>10.4g} | {t['tok_s']:>13,.1f} {t['ms']:>8.3f} {t['roofline_ms']:>8.3f} "
                  f"{pct(t):>4.0f} {t['cache_mib']:>10.4g} | {s['tok_s'] / t['tok_s']:>7.2f}", flush=True)
            results.append({"T": T, "B": B, "student": s, "teacher": t})
    return results


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def kernels_main(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    for name in a.shapes.split(",") if a.shapes else []:
        if name not in KERNEL_SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {list(KERNEL_SHAPES)}")
    return kernels_gpu(a) if torch.cuda.is_available() else kernels_cpu(a)


def train_main(a):
    rank, world, device = distill.init_dist()
    result = None
    try:
        distill.pin_backend(a.backend, device)
        for step in [a.step] if a.step else [1, 2, 3]:
            result = train_step(a, step, device)
    except distill.Fail as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        dist.destroy_process_group()
    return result


def generate_main(a):
    try:
        device = check(SampleConfig(device=a.device, dtype=a.dtype, compile=a.compile))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if a.compile and a.eager:
        raise SystemExit("--compile compiles the student's CUDA-graphed step: drop --eager")
    dtype = DTYPES[a.dtype]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ckpt:
        try:
            student = load_checkpoint(a.ckpt).to(device, dtype)
            teacher, tok = teacher_lib.load_teacher(a.teacher, dtype=dtype, device=device)
            if teacher.cfg.vocab_size != student.cfg.vocab_size:
                raise ValueError(f"the teacher {tok.name} has {teacher.cfg.vocab_size} tokens, the student "
                                 f"{student.cfg.vocab_size}: pass the student's own teacher with --teacher")
        except ValueError as e:   # ExportError, TeacherError: one line that says what to do
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:                         # random weights of a teacher shape, and its student
        teacher, student = random_models(a.shape, a.variant, a.seed, device)
        teacher, student = teacher.to(dtype), student.to(dtype)         # initialised in fp32
    student.init_buffers()
    return generate_table(student.eval().requires_grad_(False), teacher.eval().requires_grad_(False), a.lengths,
                          a.batches, a.tokens, device, a.prefill_chunk, a.seed, not a.no_prefill,
                          False if a.eager else None, a.temperature, a.compile)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True, metavar="{kernels,train,generate}")
    positive = distill.positive

    k = sub.add_parser("kernels", help="kernels.py's backends (CPU: naive vs chunked; GPU: Triton vs fla, SDPA, decode)")
    k.add_argument("--shapes", default="", help=f"comma-separated of {list(KERNEL_SHAPES)} "
                   "(default: all on GPU, smol-L512 and smol-L4k reduced on CPU)")
    k.add_argument("--batch", type=int, default=0, help="override B (0: the shape's own, reduced on CPU)")
    k.add_argument("--seq", type=int, default=0, help="override T (0: the shape's own, reduced on CPU)")
    k.add_argument("--variants", default="rwkv7,rwkv6")
    k.add_argument("--reps", type=positive(int), default=5, help="CPU: timed calls (median); GPU: do_bench")
    k.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 on a shared CPU)")
    k.add_argument("--naive-gb", type=float, default=8.0, help="skip the naive fwd+bwd above this many GB of states")
    k.add_argument("--fla-shapes", default="", help="GPU: shapes that also time fla and SDPA (default: all; "
                   "fla's cold autotuning takes minutes per shape)")

    t = sub.add_parser("train", help="distill.py's steps on random weights: tokens/s, peak memory, MFU")
    t.add_argument("--shape", default="smol", choices=sorted(MODEL_SHAPES), help="teacher shape (random weights)")
    t.add_argument("--step", type=int, choices=(1, 2, 3), help="which step (default: 1, 2, 3 in turn)")
    t.add_argument("--variant", default="rwkv7", choices=sorted(MIXERS), help="student mixer (model.MIXERS)")
    t.add_argument("--ctx", type=positive(int), help="tokens per sequence (default: the step's)")
    t.add_argument("--batch", type=positive(int),
                   help="sequences per update over all devices (default: one micro-batch per device)")
    t.add_argument("--micro-batch", type=positive(int), help="sequences per forward on one device")
    t.add_argument("--updates", type=positive(int), default=8, help="timed updates (after 2 warm-up updates)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile every block (default: on a GPU)")
    t.add_argument("--ckpt-act", action=argparse.BooleanOptionalAction,
                   help="activation checkpointing (default: distill.fit_micro's choice on a GPU, the paper's on a CPU)")
    t.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernels.py backend of every time-mix (auto: triton on CUDA, torch elsewhere)")
    t.add_argument("--seed", type=int, default=0)

    g = sub.add_parser("generate", help="decode speed: a student's recurrent state against its teacher's KV cache")
    g.add_argument("--ckpt", default="", help="a Student.save or export.py folder (default: random weights of --shape)")
    g.add_argument("--teacher", default=None, help="with --ckpt: its teacher (default: the embedded SmolLM2)")
    g.add_argument("--shape", default="smol", choices=sorted(MODEL_SHAPES),
                   help="without --ckpt: teacher shape (random weights) and its --variant student")
    g.add_argument("--variant", default="rwkv7", choices=sorted(MIXERS), help="without --ckpt: the student's mixer")
    g.add_argument("--lengths", type=_ints, default="512,4096,16384,65536", help="context lengths T")
    g.add_argument("--batches", type=_ints, default="1,32,256", help="batch sizes B")
    g.add_argument("--tokens", type=positive(int), default=32, help="decode steps timed per row")
    g.add_argument("--no-prefill", action="store_true",
                   help="start at position T with a zero state / KV cache instead of reading a T-token prompt")
    g.add_argument("--eager", action="store_true", help="no CUDA graph: every step launched from Python")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student's one-token step into fewer kernels before it is captured")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled on the device")
    g.add_argument("--device", default="auto", help="auto: cuda if available")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights (the state stays fp32)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--prefill-chunk", type=positive(int), default=2048, help="prompt tokens per parallel forward")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    return {"kernels": kernels_main, "train": train_main, "generate": generate_main}[a.what](a)


if __name__ == "__main__":
    main()
