"""Loss table of step-2 runs RUN/NAME/step2/log.jsonl: per update, and max relative difference to the first."""
import json
import sys
from pathlib import Path

root, names = Path(sys.argv[1]), sys.argv[2:]
logs = {}
for n in names:
    f = root / n / "step2" / "log.jsonl"
    logs[n] = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
loss = {n: {r["step"]: r["loss"] for r in L if "loss" in r} for n, L in logs.items()}
steps = sorted(set().union(*[set(d) for d in loss.values()]))
print("update " + " ".join(f"{n:>12}" for n in names))
for s in steps:
    print(f"{s:>6} " + " ".join(f"{loss[n].get(s, float('nan')):>12.6f}" for n in names))
ref = names[0]
for n in names[1:]:
    common = [s for s in steps if s in loss[ref] and s in loss[n]]
    if common:
        d = [abs(loss[n][s] - loss[ref][s]) / abs(loss[ref][s]) for s in common]
        first = next((s for s, x in zip(common, d) if x > 0), None)
        print(f"{n} vs {ref}: max rel diff {max(d):.2e} over {len(common)} updates; first differs at {first}; "
              f"at update 5/10/20: " + " ".join(f"{d[common.index(s)]:.1e}" for s in (5, 10, 20) if s in common))
        late = [(loss[n][s] - loss[ref][s]) / loss[ref][s] for s in common if s > 40]
        if late:
            print(f"{n} vs {ref}, updates 41+: mean signed rel diff {sum(late) / len(late):+.2e}, "
                  f"{n} higher at {sum(x > 0 for x in late)} of {len(late)}")
for n in names:
    ev = [r["eval"] for r in logs[n] if "eval" in r]
    if ev:
        print(n, "last eval", {k: round(v, 4) for k, v in ev[-1].items()})
