"""Pick the A/B winner from ab.txt and write it to DEST: the spec whose f+b summed over the target
shapes (q7b-L4k, q7b-L512; RWKV7 + RWKV6) is lowest, if it beats the first spec (main) by >= 2% and
none of its errors exceeds main's on the same case by more than 25%.   python pick.py ab.txt DEST"""
import re, sys
txt = open(sys.argv[1]).read().splitlines()
err, fb, bad = {}, {}, set()
for l in txt:
    m = re.match(r"err (\S+)\s+(rwkv\d) (\S+)\s+N=(\d+)\s+max (\S+)", l)
    if m: err[(m[1], m[2], m[3], m[4])] = float(m[5])
    if l.startswith(("err", "time")) and "failed" in l: bad.add(l.split()[1 if l.startswith("err") else 3])
    m = re.match(r"time (\S+)\s+(rwkv\d) (\S+)\s+f\s+\S+\s+f\+b\s+(\S+)", l)
    if m and m[1] in ("q7b-L4k", "q7b-L512"): fb.setdefault(m[3], []).append(float(m[4]))
specs = [s for s in fb if s != "fla"]
main = specs[0]
def ok(s):
    return s not in bad and len(fb[s]) == 4 and all(err.get((s,) + k[1:], 9) <= 1.25 * v for k, v in err.items() if k[0] == main)
tot = {s: sum(fb[s]) for s in specs}
for s in specs: print(f"{s:<36} {tot[s]:8.3f} ms  ok={ok(s)}")
best = min((s for s in specs if ok(s)), key=tot.get)
win = best if tot[best] <= 0.98 * tot[main] else main
print("winner", win)
path, _, sets = win.partition(":")
src = open(path).read()
for kv in filter(None, sets.split(",")):
    name, val = kv.split("=")
    line = next(l for l in src.splitlines() if re.match(rf"^[\w, ]*\b{name}\b[\w, ]* = ", l))
    names, vals = line.split(" = ")
    names = [n.strip() for n in names.split(",")]; vals = [v.strip() for v in vals.split("#")[0].split(",")]
    vals[names.index(name)] = val
    src = src.replace(line, f"{', '.join(names)} = {', '.join(vals)}", 1)
open(sys.argv[2], "w").write(src)
open(sys.argv[2] + ".spec", "w").write(win + "\n")
