#!/usr/bin/env python3
"""Where two greedy generations part, and by how much.

Reads the stderr of two `starserve generate --logprobs N` runs (N >= 2): one line per generated
token, "[logprobs] token ID LOGPROB top ID:LP ID:LP ...". Prints the first token at which the runs
chose differently, with each run's two best candidates there and their margin (top-1 minus top-2
logprob, in nats): a margin near zero is a near tie that rounding alone can flip.

Usage: logprob_diff.py A.err B.err
"""
import re
import sys

LINE = re.compile(r"^\[logprobs\] token (-?\d+) (\S+) top((?: -?\d+:\S+)+)\s*$")


def read(path):
    steps = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m:
                continue
            top = [(int(i), float(lp)) for i, lp in (t.split(":") for t in m.group(3).split())]
            steps.append((int(m.group(1)), top))
    return steps


def describe(top):
    text = ", ".join(f"{i}:{lp:.4f}" for i, lp in top[:2])
    margin = top[0][1] - top[1][1] if len(top) >= 2 else float("nan")
    return f"{text} (margin {margin:.4f})"


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    a, b = read(argv[1]), read(argv[2])
    if not a or not b:
        print(f"  logprobs: no [logprobs] lines in {argv[1] if not a else argv[2]}")
        return 1
    for i, ((ta, topa), (tb, topb)) in enumerate(zip(a, b)):
        if ta != tb:
            print(f"  logprobs: the runs part at generated token {i + 1}: {ta} against {tb}")
            print(f"    first run's top 2:  {describe(topa)}")
            print(f"    second run's top 2: {describe(topb)}")
            return 0
    print(f"  logprobs: the same {min(len(a), len(b))} tokens (lengths {len(a)} and {len(b)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
