#!/usr/bin/env python3
"""cgself.py — exclusive (self) instructions per function from a callgrind file, and who calls a
given function. callgrind_annotate 3.19 prints inclusive costs for the dumps bench/profile.sh
takes (counters zeroed, then dumped while running), so this reads the file format directly.

    bench/cgself.py FILE [TOP] [--per N]              # top functions by self cost (per N units)
    bench/cgself.py FILE --callers NAME [TOP] [--per N]   # callers of NAME, by cost of those calls
"""
import collections
import re
import sys


def parse(path):
    names = {}
    self_cost = collections.Counter()
    calls = collections.Counter()  # (caller, callee) -> inclusive cost of the calls
    fn = callee = None
    pending_call = False

    def name(kind, value):
        m = re.match(r"\((\d+)\)(?: (.*))?$", value)
        if not m:
            return value
        key = (kind, m.group(1))
        if m.group(2):
            names[key] = m.group(2)
        return names.get(key, value)

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            head = line[0]
            if head.isdigit() or head in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if pending_call:
                    calls[(fn, callee)] += cost
                    pending_call = False
                else:
                    self_cost[fn] += cost
            elif line.startswith("fn="):
                fn = name("fn", line[3:])
            elif line.startswith("cfn="):
                callee = name("fn", line[4:])
            elif line.startswith("calls="):
                pending_call = True
            elif line[:3] in ("fl=", "fi=", "fe=", "ob="):
                name(line[:2], line[3:])
            elif line[:4] in ("cfi=", "cfl=", "cob="):
                name(line[1:3], line[4:])
    return self_cost, calls


def main():
    args = sys.argv[1:]
    per = 1
    if "--per" in args:
        i = args.index("--per")
        per = int(args[i + 1])
        del args[i : i + 2]
    callers_of = None
    if "--callers" in args:
        i = args.index("--callers")
        callers_of = args[i + 1]
        del args[i : i + 2]
    path = args[0]
    top = int(args[1]) if len(args) > 1 else 30
    self_cost, calls = parse(path)
    total = sum(self_cost.values())
    if callers_of:
        rows = collections.Counter()
        for (caller, callee), c in calls.items():
            if callee == callers_of:
                rows[caller] += c
        what = f"callers of {callers_of}"
    else:
        rows = self_cost
        what = "self cost"
    print(f"{path}: {total:,} instructions in all; {what}" + (f", per {per}" if per > 1 else ""))
    for f, c in rows.most_common(top):
        print(f"{c / per:>12,.1f} {100 * c / total:5.1f}%  {f[:140]}")


if __name__ == "__main__":
    main()
