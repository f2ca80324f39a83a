#!/usr/bin/env python3
"""The functions a callgrind run executed, hottest first, as a linker
symbol-ordering file.

    scripts/hot-code.py BINARY OUT CALLGRIND_FILE...

Each CALLGRIND_FILE is a run of BINARY under
`valgrind --tool=callgrind --dump-instr=yes`, the most common deployment
first. Every instruction address executed in BINARY is mapped to the
function (from `nm`) that holds it; the functions are written to OUT, one
symbol name per line: those every run executed, then those fewer runs
executed (the earlier runs' first), each group hottest first. The release link
places them in that order at the start of the code (proxy/build.rs), so
the code a proxy runs shares few pages with the code it never runs.
"""
import bisect
import collections
import os
import re
import subprocess
import sys


def functions(binary):
    syms = []
    out = subprocess.run(
        ["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW":
            syms.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
    syms.sort()
    return syms


def executed(path, binary):
    """Instructions executed per address of `binary` in one callgrind file."""
    objects, cost = {}, collections.Counter()
    ours, last, skip = False, 0, False

    def name(token):
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if not m:
            return token
        if m.group(2):
            objects[m.group(1)] = m.group(2)
        return objects.get(m.group(1), token)

    for line in open(path):
        if line.startswith("ob="):
            ours = os.path.realpath(name(line[3:].strip())) == binary
            continue
        if line.startswith("cob="):
            name(line[4:].strip())
            continue
        if line.startswith("calls="):
            skip = True
            continue
        if not line or not (line[0] == "0" or line[0] in "+-*"):
            continue
        fields = line.split()
        pos = fields[0]
        if pos.startswith("0x"):
            address = int(pos, 16)
        elif pos[0] in "+-":
            step = int(pos[1:], 16) if pos[1:].startswith("0x") else int(pos[1:])
            address = last + step if pos[0] == "+" else last - step
        else:
            address = last
        last = address
        if skip:
            # A call's line: the cost is the callee's; the call itself ran.
            skip = False
            if ours:
                cost[address] += 1
            continue
        if ours and len(fields) >= 3:
            cost[address] += int(fields[2])
    return cost


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    binary, out, runs = os.path.realpath(sys.argv[1]), sys.argv[2], sys.argv[3:]
    syms = functions(binary)
    starts = [s[0] for s in syms]
    heat = collections.Counter()
    used_by = collections.defaultdict(set)
    for r, run in enumerate(runs):
        for address, n in executed(run, binary).items():
            i = bisect.bisect_right(starts, address) - 1
            if i >= 0 and syms[i][0] <= address < syms[i][0] + max(syms[i][1], 1):
                heat[i] += n + 1
                used_by[i].add(r)

    # Code every run used first, then code fewer runs used, earlier runs'
    # before later ones': a config like one run's touches one stretch.
    # Hottest first within each group.
    def place(i):
        runs_using = used_by[i]
        return (-len(runs_using), tuple(r not in runs_using for r in range(len(runs))), -heat[i], syms[i][0])

    order = sorted(heat, key=place)
    with open(out, "w") as f:
        for i in order:
            f.write(syms[i][2] + "\n")
    size = sum(syms[i][1] for i in order)
    print(f"{out}: {len(order)} functions, {size / 1024:.0f} KiB of code")


if __name__ == "__main__":
    main()
