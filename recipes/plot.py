"""Loss curves of a distill.py run as one PNG: a panel per step, training loss against tokens, and
the held-out eval (KL for steps 1-2, student perplexity for step 3) on a second axis.

    python recipes/plot.py runs/smol/main --out curves.png
    python recipes/plot.py runs/smol/main runs/smol/main6 --out curves.png    # runs side by side, a colour each

Reads RUN/stepN/log.jsonl (distill.py writes one record per update and per eval). Needs matplotlib,
which only this figure uses (pip install matplotlib).
"""
import argparse
import json
import sys
from pathlib import Path

EVAL_KEY = {1: "align_loss", 2: "kl", 3: "ppl_student"}
LOSS_NAME = {1: "alignment loss (‖y_T − y_S‖/√C)", 2: "KL(T‖S), nats/token", 3: "cross-entropy, nats/token"}


def read_log(path):
    recs = [json.loads(line) for line in path.open()]
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    tokens_per_step = train[0][0] if train else 1  # the first update's record holds batch × ctx
    evals = [(r["step"] * tokens_per_step, r["eval"]) for r in recs if "eval" in r]
    return train, evals


def smooth(ys, n=20):
    """Trailing mean over n updates: one micro-batch of noisy KL per point reads badly."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - n] if i >= n else 0)
        out.append(acc / min(i + 1, n))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="distill.py --out folders")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    a = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: recipes/plot.py needs matplotlib: pip install matplotlib")
    steps = sorted({int(f.parent.name[4:]) for r in a.runs for f in r.glob("step*/log.jsonl")})
    if not steps:
        sys.exit(f"error: no stepN/log.jsonl under {', '.join(map(str, a.runs))}; pass distill.py --out folders")
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 3.8), squeeze=False)
    for ax, step in zip(axes[0], steps):
        ax2 = None  # step 3's perplexity axis, shared by every run
        for i, run in enumerate(a.runs):  # one colour per run in every panel
            log = run / f"step{step}" / "log.jsonl"
            if not log.exists():
                continue
            train, evals = read_log(log)
            line, = ax.plot([t / 1e6 for t, _ in train], smooth([y for _, y in train]), lw=1, color=f"C{i}",
                            label=f"{run.name} train")
            key = EVAL_KEY[step]
            pts = [(t / 1e6, e[key]) for t, e in evals if key in e]
            if pts and step != 3:  # same quantity as the training loss: same axis
                ax.plot(*zip(*pts), "o--", color=line.get_color(), ms=4, label=f"{run.name} held-out")
            elif pts:
                ax2 = ax2 or ax.twinx()
                ax2.plot(*zip(*pts), "o--", color=line.get_color(), ms=4)
                ax2.set_ylabel("held-out student perplexity")
        ax.set_title(f"step {step}")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(LOSS_NAME[step])
        if step != 3:  # losses falling by orders of magnitude; step 3's CE moves by a few %
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
