#!/usr/bin/env python3
"""Pools the kernel-LB/direct p50 pairs of one or more bench/kernel-lb.sh
runs (their `kernel-lb.raw` files) into one estimate with a confidence
interval.

usage: kernel_lb_pooled.py RAW...

Each run's p50 is bimodal on a shared machine (about 60 or 70 µs,
whichever path the scheduler takes), so a single pair swings by ±15 %:
the estimate is the geometric mean of many pairs (kernel LB over direct,
measured moments apart in the same repetition), with a bootstrap 95 %
interval, beside the median of the pairs.
"""
import json
import math
import random
import statistics
import sys


def pairs(path):
    runs = {}
    for line in open(path):
        label, threads, js = line.split(" ", 2)
        if threads == "1":
            runs.setdefault(label, []).append(json.loads(js)["p50_us"])
    return [k / d for k, d in zip(runs.get("kernel-lb", []), runs.get("direct", []))]


def main():
    ratios = [r for path in sys.argv[1:] for r in pairs(path)]
    if not ratios:
        sys.exit("kernel_lb_pooled: no kernel-lb/direct pairs")
    logs = [math.log(r) for r in ratios]
    rng = random.Random(1)  # fixed: the same data always gives the same interval
    boot = sorted(
        math.exp(statistics.mean(rng.choices(logs, k=len(logs)))) for _ in range(5000)
    )
    lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
    print(
        f"- pooled over {len(ratios)} pairs ({len(sys.argv) - 1} run(s)): kernel LB p50 / direct "
        f"geometric mean **{math.exp(statistics.mean(logs)):.3f}** (95 % bootstrap interval "
        f"{lo:.3f}-{hi:.3f}), median {statistics.median(ratios):.3f}; "
        f"{sum(r > 1.05 for r in ratios)} of {len(ratios)} single pairs above 1.05"
    )


if __name__ == "__main__":
    main()
