#!/usr/bin/env python3
"""Golden outputs of DeepSeek's EPLB for tests/unit (moe/eplb.h is checked against them).

usage: eplb_golden.py EPLB_CHECKOUT OUT.json
EPLB_CHECKOUT is a clone of https://github.com/deepseek-ai/EPLB (its eplb.py is
imported from there, not copied). Inputs are fixed (seeded); loads are distinct
floats so no tie decides an output.
"""
import json
import random
import sys

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import eplb  # noqa: E402

cases = [
    # name, experts, physical, groups, nodes, ranks, skew
    ("hierarchical_16e_2n_8r", 16, 24, 4, 2, 8, 1.0),
    ("hierarchical_32e_4n_16r_zipf", 32, 48, 8, 4, 16, 1.2),
    ("global_12e_groups_not_divisible", 12, 16, 3, 2, 4, 0.8),
    ("no_redundancy_8e_4r", 8, 8, 2, 2, 4, 1.0),
    ("one_rank_6e", 6, 9, 1, 1, 1, 1.5),
]
rng = random.Random(20261201)
out = []
for name, E, P, groups, nodes, ranks, skew in cases:
    order = list(range(E))
    rng.shuffle(order)
    # Zipf-like loads in a shuffled expert order, plus noise to break ties.
    load = [0.0] * E
    for rank, e in enumerate(order):
        load[e] = round(1000.0 / (rank + 1) ** skew + rng.uniform(0.0, 10.0), 3)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(torch.tensor([load]), P, groups, nodes, ranks)
    # The replica index of each physical slot, from log2phy.
    replica = [0] * P
    for e, row in enumerate(log2phy[0].tolist()):
        for i, p in enumerate(row):
            if p >= 0:
                replica[p] = i
    out.append({"name": name, "experts": E, "physical": P, "groups": groups, "nodes": nodes, "ranks": ranks,
                "load": load, "phy2log": phy2log[0].tolist(), "replica": replica, "count": logcnt[0].tolist()})
with open(sys.argv[2], "w") as f:
    json.dump({"source": "deepseek-ai/EPLB rebalance_experts", "cases": out}, f, indent=1)
    f.write("\n")
print(f"wrote {len(out)} cases to {sys.argv[2]}")
