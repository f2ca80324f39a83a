#!/usr/bin/env python3
"""Where a running process's resident program code is, by crate.

    scripts/resident-code.py PID [--top N]

Reads the process's page table (/proc/PID/pagemap, as root) for the
mappings of its own executable, finds the pages that are resident, and
attributes each to the functions whose code lies on it (symbols from `nm`,
demangled). Prints KiB resident per crate (a page shared by several crates
is split between them by bytes), then the read-only data and unwind tables
that are resident outside any function.
"""
import bisect
import collections
import os
import re
import struct
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def mappings(pid, exe):
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == exe:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            yield lo, hi, int(parts[2], 16), parts[1]


def resident_pages(pid, lo, hi):
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        data = f.read((hi - lo) // PAGE * 8)
    for i in range(len(data) // 8):
        (entry,) = struct.unpack_from("<Q", data, i * 8)
        if entry >> 63:
            yield lo + i * PAGE


def crate_of(name):
    # `<a::B as c::D>::f`: the implementing type's crate.
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)::", name)
    return m.group(1) if m else "(other)"


def main():
    pid = int(sys.argv[1])
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 25
    exe = os.readlink(f"/proc/{pid}/exe")
    # Symbols: file offset of the text = address - load base.
    syms = []
    out = subprocess.run(["nm", "-C", "-S", "--defined-only", exe], capture_output=True, text=True).stdout
    for line in out.splitlines():
        p = line.split(" ", 3)
        if len(p) == 4 and p[2] in "tTwW":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    syms.sort()
    base = min(lo - off for lo, _, off, _ in mappings(pid, exe))
    by_crate = collections.Counter()
    other = collections.Counter()
    starts = [s[0] for s in syms]
    for lo, hi, off, perms in mappings(pid, exe):
        for page in resident_pages(pid, lo, hi):
            a, b = page - base, page - base + PAGE
            if "x" not in perms:
                other[perms] += PAGE
                continue
            i = max(bisect.bisect_right(starts, a) - 1, 0)
            covered = 0
            while i < len(syms) and syms[i][0] < b:
                s, size, name = syms[i]
                overlap = min(b, s + size) - max(a, s)
                if overlap > 0:
                    by_crate[crate_of(name)] += overlap
                    covered += overlap
                i += 1
            if covered < PAGE:
                by_crate["(between functions)"] += PAGE - covered
    total = sum(by_crate.values())
    print(f"resident code of {exe}: {total / 1024:.0f} KiB")
    for crate, n in by_crate.most_common(top):
        print(f"{n / 1024:8.0f} KiB  {crate}")
    for perms, n in other.items():
        print(f"{n / 1024:8.0f} KiB  non-code mapping {perms} (read-only data, unwind tables, relocated data)")


main()
