#!/usr/bin/env python3
"""GPU time per kernel of a bench's timed calls, from an Nsight Compute CSV.

`candiff bench wan-step|flux-step --profiler-range` marks its timed calls; profile only them:

  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --target-processes all .gpu/run.sh bench wan-step --variants nvfp4:trtllm:fp8 --iters 1 \
      --profiler-range > ncu.csv
  python3 scripts/ncu_kernel_table.py ncu.csv --calls 1 --wall-ms 630

Prints, per kernel name, launches and milliseconds per call, largest first, their sum, and (with
--wall-ms, the bench's own time per call without ncu) what no kernel covers: launch gaps and host
waits. `--sequence N` also lists the first N launches in order (one block's kernels, say).
"""
import argparse
import collections
import csv
import sys

UNIT_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3}


def rows(path):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu prints its own log lines (==PROF==) and the program's output before the CSV header.
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    for r in csv.DictReader(lines[start:]):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r["Metric Unit"].strip()
        if unit not in UNIT_MS:
            sys.exit(f"unknown duration unit {unit!r}")
        yield r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * UNIT_MS[unit]


def short(name, width=90):
    name = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--calls", type=int, default=1, help="timed calls in the profiled range")
    ap.add_argument("--wall-ms", type=float, help="the bench's time per call, measured without ncu")
    ap.add_argument("--sequence", type=int, default=0, help="list the first N launches in order")
    a = ap.parse_args()
    launches = list(rows(a.csv))
    if not launches:
        sys.exit("no gpu__time_duration.sum rows: was the range marked (--profiler-range) and ncu started with --profile-from-start off?")
    total = collections.defaultdict(float)
    count = collections.Counter()
    for name, ms in launches:
        total[short(name)] += ms
        count[short(name)] += 1
    all_ms = sum(total.values()) / a.calls
    print(f"{'kernel':<90} {'launches':>9} {'ms/call':>9} {'share':>6}")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{name:<90} {count[name] / a.calls:>9.0f} {ms / a.calls:>9.2f} {ms / a.calls / all_ms:>6.1%}")
    print(f"{'all kernels':<90} {len(launches) / a.calls:>9.0f} {all_ms:>9.2f}")
    if a.wall_ms:
        print(f"wall {a.wall_ms:.2f} ms/call: {a.wall_ms - all_ms:.2f} ms ({1 - all_ms / a.wall_ms:.1%}) outside any kernel")
    for i, (name, ms) in enumerate(launches[: a.sequence]):
        print(f"{i:>5} {ms * 1e3:>10.1f} us  {short(name)}")


if __name__ == "__main__":
    main()
