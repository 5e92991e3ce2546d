#!/usr/bin/env python3
"""Writes examples/tiny_lm/heldout_prompts.txt: prompts for `switchyard bench
spec`, one per line, from the fortunes the tiny models never trained on (the
split of examples/tiny_lm/tinylm.py: every 10th fortune is held out). Each
prompt is the first 32 bytes of a held-out fortune's first line that has at
least 24 printable ASCII bytes.

usage: scripts/spec_prompts.py [COUNT] [OUT]"""
import os
import sys

CORPUS_DIR = "/usr/share/games/fortunes"
EXCLUDED = {"art", "ascii-art"}  # as in tinylm.py


def held_out_fortunes():
    names = sorted(n for n in os.listdir(CORPUS_DIR) if "." not in n and n not in EXCLUDED)
    index = 0
    for name in names:
        with open(os.path.join(CORPUS_DIR, name), "rb") as f:
            for fortune in f.read().split(b"\n%\n"):
                if index % 10 == 9:
                    yield fortune.strip(b"\n")
                index += 1


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    out = sys.argv[2] if len(sys.argv) > 2 else "examples/tiny_lm/heldout_prompts.txt"
    prompts = []
    for fortune in held_out_fortunes():
        line = fortune.split(b"\n")[0].strip()
        if len(line) >= 24 and all(32 <= c < 127 for c in line):
            prompts.append(line[:32].decode("ascii"))
        if len(prompts) == count:
            break
    with open(out, "w") as f:
        f.write("\n".join(prompts) + "\n")
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
