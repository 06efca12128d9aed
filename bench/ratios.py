#!/usr/bin/env python3
"""Ratios of Ferry ("ours") to each anchor from anchors.sh results.tsv files.

A ratio is taken per repetition (ours and the anchor from the same rep of the same run), then
min/median/max over the reps. Files are separate runs: ratios never mix runs.
Usage: ratios.py results.tsv [more.tsv ...]
"""
import collections
import statistics
import sys

# (prefix of the scenario family, metrics compared, extra anchors outside the family)
FAMILIES = [
    ("bulk-", ["throughput"], ["blast-direct", "tls-rustls-1", "raw-tcp-1"]),
    ("http-c64-", ["req_per_s", "p99", "p50"], []),
    ("http-c1-", ["p50", "p99", "req_per_s"], []),
    ("hey-", ["req_per_s", "p99"], []),
    ("mem-", None, []),  # every rss_*/kib_per_conn metric
]
LOWER_IS_BETTER = ("p50", "p99", "rss", "pss", "kib_per_conn")


def fmt(x):
    if x != x:
        return "—"
    return ("%.0f" % x) if abs(x) >= 1000 else ("%.3g" % x if abs(x) < 10 else "%.1f" % x)


def main(paths):
    print("| ours | metric | anchor | ours (median) | anchor (median) | ratio ours/anchor min / median / max | better is |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for path in paths:
        # data[scenario][metric][rep] = value
        data = collections.defaultdict(lambda: collections.defaultdict(dict))
        units = {}
        for line in open(path):
            p = line.rstrip("\n").split("\t")
            if len(p) < 5 or p[0] == "rep":
                continue
            try:
                data[p[1]][p[2]][p[0]] = float(p[3])
            except ValueError:
                continue
            units[p[2]] = p[4]
        loads = list(data.get("host", {}).get("loadavg1", {}).values())
        if loads:
            notes.append(f"{path}: load average (1 min) at the start of each rep: {', '.join(fmt(v) for v in loads)}")
        for ours in sorted(s for s in data if "ours" in s):
            fam = next((f for f in FAMILIES if ours.startswith(f[0])), None)
            if fam is None:
                continue
            prefix, metrics, extra = fam
            if prefix == "mem-" and not any(data[ours].get("e2e_conns", {}).values()):
                notes.append(f"{path}: {ours}: no connection reached the backend, no ratio")
                continue
            anchors = sorted(s for s in data if s.startswith(prefix) and "ours" not in s) + [e for e in extra if e in data]
            ms = metrics or sorted(m for m in data[ours] if m.startswith("rss_") and m != "rss_idle") + ["kib_per_conn"]
            for m in ms:
                if m not in data[ours]:
                    continue
                for a in anchors:
                    am = "throughput" if m == "throughput" else m
                    if am not in data[a]:
                        continue
                    reps = sorted(set(data[ours][m]) & set(data[a][am]))
                    rs = sorted(data[ours][m][r] / data[a][am][r] for r in reps if data[a][am][r])
                    if not rs:
                        continue
                    better = "lower" if m.startswith(LOWER_IS_BETTER) else "higher"
                    print(
                        f"| {ours} | {m} ({units.get(m, '')}) | {a} | {fmt(statistics.median(data[ours][m].values()))} "
                        f"| {fmt(statistics.median(data[a][am].values()))} "
                        f"| {rs[0]:.2f} / {statistics.median(rs):.2f} / {rs[-1]:.2f} | {better} |"
                    )
            for m in ("e2e_conns", "hold_failed", "errors"):
                if m in data[ours]:
                    notes.append(f"{path}: {ours} {m} = {', '.join(fmt(v) for v in data[ours][m].values())}")
    for n in notes:
        print(f"\n{n}", end="")
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
