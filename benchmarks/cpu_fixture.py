#!/usr/bin/env python
"""The test fixtures on this CPU: float accuracy (every class predicted?) over seeds, and what W3A3 QAT
wins back of what PTQ loses (the margins of tests/test_lowbit.py), as the test suite trains them.

  python benchmarks/cpu_fixture.py --seeds 5                        # oneDNN at this CPU's ISA
  DNNL_MAX_CPU_ISA=AVX2 python benchmarks/cpu_fixture.py --seeds 5  # as on an AVX2-only CPU

Prints one markdown row per seed and a summary line (min, mean, sample std) with the machine.
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

import mxnet as mx  # noqa: E402

from conftest import W3A3, qat_finetune, tiny_config, train_float  # noqa: E402
from train_quantization import cli, machine, ptq, train  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402


def ptq_acc(float_run: dict, ds: data_mod.Dataset, method: str) -> float:
    """W3A3 post-training quantization of the float checkpoint, ranges by ``method`` (max or mse)."""
    cfg = tiny_config(float_run["run"].parent, weight_bits=3, act_bits=3)
    net, _ = cli.qat_from_float(cfg, ds, float_run["run"] / "best.params", [mx.cpu()])
    net.hybridize(static_alloc=True)
    ptq.calibrate_ranges(net, data_mod.calib_loader(ds, 64, 5, 0), data_mod.normalizer(*ds.mean_std()),
                         mx.cpu(), 5, method)
    _, test_loader = data_mod.make_loaders(ds, 64, 250, False, 0)
    return train.evaluate(net, test_loader, data_mod.normalizer(*ds.mean_std()), [mx.cpu()])["acc"]


def one_seed(seed: int, ds: data_mod.Dataset, tmp: Path) -> dict:
    float_run = train_float(tmp, ds, seed, f"fp32-s{seed}")
    q = qat_finetune(float_run, ds, tmp, f"w3a3-s{seed}", **W3A3)
    f, ema = float_run["best"]["test_acc"], q["ptq_acc"]
    fair = max(ptq_acc(float_run, ds, m) for m in ptq.METHODS)
    return {"seed": seed, "float": f, "classes": len(set(float_run["logits"].argmax(1).tolist())), "qat": q["acc"],
            "ptq_ema": ema, "ptq_best": fair, "won_ema": (q["acc"] - ema) / (f - ema),
            "won_best": (q["acc"] - fair) / (f - fair)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    logging.disable(logging.INFO)
    ds = data_mod.dataset_from_config(tiny_config(Path(".")).data)
    rows = []
    print("| seed | float % | classes predicted | W3A3 QAT % | PTQ EMA % | best PTQ (max, MSE) % | "
          "won back of EMA-PTQ loss | of best-PTQ loss |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            r = one_seed(seed, ds, Path(d))
            rows.append(r)
            print(f"| {seed} | {100 * r['float']:.1f} | {r['classes']} | {100 * r['qat']:.1f} | "
                  f"{100 * r['ptq_ema']:.1f} | {100 * r['ptq_best']:.1f} | {r['won_ema']:.3f} | {r['won_best']:.3f} |",
                  flush=True)
    for key in ("float", "won_ema", "won_best"):
        v = [r[key] for r in rows]
        print(f"{key}: min {min(v):.3f} mean {statistics.mean(v):.3f} std {statistics.stdev(v):.3f}")
    print(f"machine: {machine.describe(machine.facts())}; DNNL_MAX_CPU_ISA={os.environ.get('DNNL_MAX_CPU_ISA')}")


if __name__ == "__main__":
    main()
