"""Graphed against eager decoding on a GPU: the SmolLM2-135M shape with random weights (seed 0), its
RAD-RWKV7 and RAD-RWKV6 students (Student.from_teacher), fp32 and bf16 weights.

For each model: one eager decoder (graph=False: every step launched from Python) and one graphed
decoder (sample.py's default on CUDA: the one-token step replayed from a CUDA graph) read the same
random prompt (4 rows, 100 tokens, the chunked prefill) and then the same 64 tokens one at a time
(teacher-forced: the eager decoder's greedy tokens); printed: whether every step's logits are
bit-identical, their largest relative error, and on how many of the 4 x 64 positions the greedy
tokens agree. Then sample.generate with each decoder (greedy, 64 new tokens): equal tokens?

    python docs/runs/generate-h200/graph_vs_eager.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import sample  # noqa: E402
from model import Student  # noqa: E402
from sample import SampleConfig, StudentDecoder, TeacherDecoder  # noqa: E402
from teacher import Teacher, TeacherConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def compare(name, make, prompt, n=64):
    eager, graphed = make(False), make(True)
    le, lg = sample.prefill(eager, prompt, 2048), sample.prefill(graphed, prompt, 2048)
    same, err, agree = torch.equal(le, lg), 0.0, 0
    for _ in range(n):
        nxt = le.argmax(-1)
        agree += int((lg.argmax(-1) == nxt).sum())
        le, lg = eager(nxt[:, None])[:, -1], graphed(nxt[:, None])[:, -1]
        same &= torch.equal(le, lg)
        err = max(err, float((lg.float() - le.float()).norm() / le.float().norm()))
    cfg = SampleConfig(max_new_tokens=n)
    ge, _ = sample.generate(make(False), prompt, cfg)
    gg, _ = sample.generate(make(True), prompt, cfg)
    print(f"{name:<22} logits bit-identical {str(same):<5} max rel err {err:.2e}  greedy agree "
          f"{agree}/{prompt.shape[0] * n}  generate() equal {torch.equal(ge, gg)}", flush=True)


def main():
    torch.manual_seed(0)
    with torch.device(DEVICE):
        teacher = Teacher(TeacherConfig()).eval()
    students = {v: Student.from_teacher(teacher, v).eval() for v in ("rwkv7", "rwkv6")}
    prompt = torch.randint(0, teacher.cfg.vocab_size, (4, 100), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    print(f"{DEVICE}, torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        t = teacher.to(dtype)
        for v, s in students.items():
            s = s.to(dtype)
            s.init_buffers()
            compare(f"{v} {dtype}".replace("torch.", ""), lambda g, s=s: StudentDecoder(s, graph=g), prompt)
        compare(f"teacher {dtype}".replace("torch.", ""), lambda g: TeacherDecoder(t, 4, 200, graph=g), prompt)


if __name__ == "__main__":
    main()
