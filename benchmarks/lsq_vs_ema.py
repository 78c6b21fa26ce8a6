#!/usr/bin/env python
"""Learned ranges (LSQ) against EMA-of-max ranges in QAT on the synthetic set, over float seeds, as the
test suite runs them (the margin of tests/test_lsq.py).

  python benchmarks/lsq_vs_ema.py --seeds 5 --bits 2                        # oneDNN at this CPU's ISA
  DNNL_MAX_CPU_ISA=AVX2 python benchmarks/lsq_vs_ema.py --seeds 5 --bits 2  # as on an AVX2-only CPU
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


from conftest import W3A3, qat_finetune, tiny_config, train_float  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402
from train_quantization import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--bits", type=int, default=2, help="weight and activation width")
    args = p.parse_args()
    logging.disable(logging.INFO)
    ds = data_mod.dataset_from_config(tiny_config(Path(".")).data)
    gaps = []
    w = f"W{args.bits}A{args.bits}"
    print(f"| seed | float % | {w} EMA QAT % | {w} LSQ QAT % | LSQ - EMA points |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            run = train_float(Path(d), ds, seed, f"fp32-s{seed}")
            best = run["best"]
            recipe = dict(W3A3, weight_bits=args.bits, act_bits=args.bits)
            acc = {r: qat_finetune(run, ds, Path(d), f"{r}-s{seed}", range=r, **recipe)["acc"] for r in ("ema", "lsq")}
            gaps.append(acc["lsq"] - acc["ema"])
            print(f"| {seed} | {100 * best['test_acc']:.1f} | {100 * acc['ema']:.1f} | {100 * acc['lsq']:.1f} | "
                  f"{100 * gaps[-1]:+.1f} |", flush=True)
    print(f"gap: min {min(gaps):.3f} mean {statistics.mean(gaps):.3f} std {statistics.stdev(gaps):.3f}")
    print(f"machine: {machine.describe(machine.facts())}; DNNL_MAX_CPU_ISA={os.environ.get('DNNL_MAX_CPU_ISA')}")


if __name__ == "__main__":
    main()
