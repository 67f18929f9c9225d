"""The compiled decode step against eager decoding on a GPU: the SmolLM2-135M shape with random
weights (seed 0, bench.py generate's), its RAD-RWKV7 and RAD-RWKV6 students, bf16 weights.

For each student: one eager decoder (graph=False) and one decoder whose one-token step is compiled
by torch.compile and then replayed from a CUDA graph (StudentDecoder(compile=True)) read the same
random prompt (32 rows, 100 tokens) and then the same 64 tokens one at a time (teacher-forced: the
eager decoder's greedy tokens). Printed: the compile and capture time of the first step, the largest
relative error of the logits, on how many of the 32 x 64 positions the greedy tokens agree, and the
GPU kernels one step launches with and without compile (torch.profiler over one replay).

    python docs/runs/generate-h200/compiled_vs_eager.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import sample  # noqa: E402
from bench import MODEL_SHAPES  # noqa: E402
from model import Student  # noqa: E402
from sample import StudentDecoder  # noqa: E402
from teacher import Teacher  # noqa: E402


def kernels_per_step(dec, nxt):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec(nxt)
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
               for e in prof.events())


@torch.no_grad()
def compare(name, student, prompt, n=64):
    eager, compiled = StudentDecoder(student, graph=False), StudentDecoder(student, compile=True)
    le, lc = sample.prefill(eager, prompt, 2048), sample.prefill(compiled, prompt, 2048)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lc = compiled(le.argmax(-1)[:, None])[:, -1]
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    le = eager(le.argmax(-1)[:, None])[:, -1]
    err, agree = float((lc.float() - le.float()).norm() / le.float().norm()), 0
    for _ in range(n):
        nxt = le.argmax(-1)
        agree += int((lc.argmax(-1) == nxt).sum())
        le, lc = eager(nxt[:, None])[:, -1], compiled(nxt[:, None])[:, -1]
        err = max(err, float((lc.float() - le.float()).norm() / le.float().norm()))
    graphed = StudentDecoder(student)
    sample.prefill(graphed, prompt, 2048)
    graphed(nxt[:, None])
    print(f"{name:<14} first step (compile + capture) {first:.1f} s  max rel err {err:.2e}  greedy agree "
          f"{agree}/{prompt.shape[0] * n}  kernels per step: graphed {kernels_per_step(graphed, nxt[:, None])}, "
          f"compiled {kernels_per_step(compiled, nxt[:, None])}", flush=True)


def main():
    torch.manual_seed(0)
    with torch.device("cuda"):
        teacher = Teacher(MODEL_SHAPES["smol"])
    prompt = torch.randint(0, teacher.cfg.vocab_size, (32, 100), generator=torch.Generator().manual_seed(1)).cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for v in ("rwkv7", "rwkv6"):
        s = Student.from_teacher(teacher, v).to(torch.bfloat16).eval().requires_grad_(False)
        s.init_buffers()
        compare(f"{v} bf16", s, prompt)


if __name__ == "__main__":
    main()
