#!/usr/bin/env python3
"""Kernel durations of `candiff bench gemm` from an Nsight Compute CSV.

`bench gemm` times on the host, which at M <= 16 measures launch and allocation costs as much as the
kernels (a few microseconds each). Run it under ncu and read the GPU's own durations:

  ncu --metrics gpu__time_duration.sum --csv --target-processes all \
      .gpu/run.sh bench gemm --m 1,16 --shapes 3072x3072 --variants trtllm:w4a16 --min-ms 0 > ncu.csv
  python3 scripts/ncu_gemm_table.py ncu.csv --m 1,16 --shapes 3072x3072 --variants trtllm:w4a16

The bench runs, for each shape and each M, cuBLAS bf16 and then each variant, each as 3 warm-up and
at least 5 timed calls; consecutive kernels are grouped into runs of "ours" (names starting with
`nvfp4_` or `fp8_`) and "cuBLAS" (everything else) in that order, and each run reports the median
of its per-call kernel time (a call that launches several kernels is summed). For our own kernels
only: an fp8 variant runs cuBLASLt's kernels and is timed twice (with and without its quantization
pass), which this grouping cannot tell apart; read fp8 from the bench's own table.
"""
import argparse
import csv
import statistics
import sys


def ours(name):
    return name.startswith(("nvfp4_", "fp8_", "quantize"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--m", required=True)
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--calls", type=int, default=8, help="calls per entry (3 warm-up + 5)")
    ap.add_argument("--ours-only", action="store_true", help="profiled with a kernel filter: no cuBLAS runs")
    a = ap.parse_args()
    rows = []
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1000.0 if unit == "ns" else v * 1000.0 if unit == "msecond" else v if unit == "usecond" else v / 1000.0
        rows.append((r["Kernel Name"], us))
    # Split into runs of ours / not ours.
    runs = []
    for name, us in rows:
        kind = ours(name)
        if runs and runs[-1][0] == kind:
            runs[-1][1].append((name, us))
        else:
            runs.append((kind, [(name, us)]))
    ms = [int(x) for x in a.m.split(",")]
    shapes = a.shapes.split(",")
    variants = a.variants.split(",")
    per_entry = len(variants) + (0 if a.ours_only else 1)
    expected = len(ms) * len(shapes) * per_entry
    if a.ours_only and len(runs) == 1 and expected > 1:
        # A kernel filter leaves no cuBLAS runs between the entries: cut the one run into equal
        # entries instead (each the same number of calls).
        kernels = runs[0][1]
        if len(kernels) % expected:
            print(f"warning: {len(kernels)} kernels do not split into {expected} entries", file=sys.stderr)
        size = max(1, len(kernels) // expected)
        runs = [(True, kernels[i:i + size]) for i in range(0, len(kernels), size)]
    if len(runs) != expected:
        print(f"warning: {len(runs)} kernel runs, expected {expected}", file=sys.stderr)
    head = [] if a.ours_only else ["cuBLAS bf16 us"]
    head += [f"{v} us" + ("" if a.ours_only else " (x faster)") for v in variants]
    print("| M | K x N | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    i = 0
    for shape in shapes:
        for m in ms:
            cells = []
            base = None
            for j in range(per_entry):
                if i >= len(runs):
                    break
                kernels = runs[i][1]
                i += 1
                per_call = max(1, round(len(kernels) / a.calls))
                sums = [sum(us for _, us in kernels[c:c + per_call]) for c in range(0, len(kernels), per_call)]
                t = statistics.median(sums)
                if j == 0 and not a.ours_only:
                    base = t
                    cells.append(f"{t:.1f}")
                elif base is None:
                    cells.append(f"{t:.1f}")
                else:
                    cells.append(f"{t:.1f} ({base / t:.2f}x)")
            print(f"| {m} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
