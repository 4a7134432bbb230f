#!/usr/bin/env python3
"""Self and inclusive shares per function from a sampler.c file: report.py SAMPLES BINARY.
Addresses in BINARY are named with addr2line; those in shared libraries by the library."""
import collections, subprocess, sys
path, binary = sys.argv[1], sys.argv[2]
maps, samples = [], []
for line in open(path):
    if line.startswith("M "):
        parts = line[2:].split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        off = int(parts[2], 16)
        name = parts[5] if len(parts) > 5 else "?"
        maps.append((lo, hi, off, name))
    elif line.startswith("S"):
        samples.append([int(x, 16) for x in line.split()[1:] if x != "(nil)"])
def where(a):
    for lo, hi, off, name in maps:
        if lo <= a < hi:
            return name, a - lo + off
    return "?", a
# Symbolize main-binary addresses with addr2line (one call).
addrs = sorted({a for s in samples for a in s if where(a)[0].endswith(binary.split("/")[-1])})
sym = {}
if addrs:
    out = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + [hex(where(a)[1] - 1) for a in addrs],
                         capture_output=True, text=True).stdout.split("\n")
    for i, a in enumerate(addrs):
        sym[a] = out[2 * i][:110]
def name(a):
    lib, off = where(a)
    if a in sym:
        return sym[a]
    return lib.split("/")[-1]
self_c, incl = collections.Counter(), collections.Counter()
for s in samples:
    frames = s[2:]  # drop the handler and the signal trampoline
    if not frames:
        continue
    self_c[name(frames[0])] += 1
    for f in set(name(a) for a in frames):
        incl[f] += 1
N = len(samples)
print(f"{N} samples")
print("== self")
for k, v in self_c.most_common(40):
    print(f"{100*v/N:6.1f}%  {k}")
print("== inclusive")
for k, v in incl.most_common(60):
    print(f"{100*v/N:6.1f}%  {k}")
