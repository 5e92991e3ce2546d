#!/usr/bin/env python3
"""Summarises bench/plan_sweep.sh output: per configuration and rank count,
the best fixed plan, worst/best, auto/best, and the gains Tutel reports:
adaptive r (best plan vs the best with r = 1), pipelining (best d > 1 vs best
d = 1 among the rest of the best plan's settings), 2DH (best 2dh vs best flat)."""
import glob
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench-results/plan-sweep"
row = re.compile(r"^#   r = (\d+), o = (\d+), a2a = (\w+), x = (\w+)\s+([0-9.]+) sec")
auto_re = re.compile(r"^#   auto \(planner.*?\)\s+([0-9.]+) sec")
error_re = re.compile(r"largest prediction error ([0-9.]+)%")
print("| config | ranks | best fixed plan | best (ms) | worst/best | auto/best | adaptive-r gain | pipelining gain | 2DH vs flat | largest prediction error |")
print("|---|---|---|---|---|---|---|---|---|---|")
def key(path):
    m = re.search(r"sweep-(.*)-(\d+)\.txt$", path)
    return (int(m.group(2)), m.group(1)) if m else (0, path)
for path in sorted(glob.glob(f"{out}/sweep-c*-*.txt"), key=key):
    plans, auto, error = [], None, None
    for line in open(path):
        m = error_re.search(line)
        if m:
            error = float(m.group(1))
        m = row.match(line)
        if m:
            plans.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), float(m.group(5))))
        m = auto_re.match(line)
        if m:
            auto = float(m.group(1))
    if not plans:
        continue
    ranks, name = key(path)
    best = min(plans, key=lambda p: p[4])
    worst = max(p[4] for p in plans)
    r1 = min(p[4] for p in plans if p[0] == 1)
    d1 = min(p[4] for p in plans if p[1] == 1)
    dmore = [p[4] for p in plans if p[1] > 1]
    flat = min(p[4] for p in plans if p[2] == "flat")
    hier = [p[4] for p in plans if p[2] == "2dh"]
    pipe = f"{d1 / min(dmore):.2f}x" if dmore else "-"
    twodh = f"{flat / min(hier):.2f}x" if hier else "- (one node)"
    print(f"| {name} | {ranks} | r={best[0]} o={best[1]} {best[2]} {best[3]} | {best[4]*1e3:.3f} | {worst/best[4]:.2f} | "
          f"{(auto/best[4]) if auto else float('nan'):.3f} | {r1/best[4]:.2f}x | {pipe} | {twodh} | "
          f"{f'{error:.1f}%' if error is not None else '-'} |")
