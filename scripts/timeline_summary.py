#!/usr/bin/env python3
"""Summarizes CANDIFF_PROFILE_TIMELINE files (one JSON line per interval: what, scope, comm,
start_ms, end_ms) per block kind: the compute stream's spans (Linear, Attention, Exchange,
ExchangeWaitIn / Out) and the transfers on the communication stream, per step.

Usage: scripts/timeline_summary.py --steps 3 PREFIX.rank0.jsonl [PREFIX.rank1.jsonl ...]
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1, help="steps the timeline covers (per-step figures)")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    for path in a.files:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        total = collections.defaultdict(float)
        count = collections.Counter()
        for r in rows:
            key = (r["scope"] or "-", "comm" if r["comm"] else "compute", r["what"])
            total[key] += r["end_ms"] - r["start_ms"]
            count[key] += 1
        span = max(r["end_ms"] for r in rows) - min(r["start_ms"] for r in rows) if rows else 0.0
        print(f"{path}: {len(rows)} intervals over {span:.1f} ms ({span / a.steps:.1f} ms per step)")
        print(f"  {'block':<8} {'stream':<8} {'what':<16} {'per step':>9} {'count':>7} {'each':>8}")
        for key in sorted(total):
            n = count[key] / a.steps
            print(f"  {key[0]:<8} {key[1]:<8} {key[2]:<16} {total[key] / a.steps:8.2f}ms {n:7.0f} {total[key] / count[key]:7.3f}ms")


if __name__ == "__main__":
    main()
