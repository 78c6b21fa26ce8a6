#!/usr/bin/env python
"""Accuracy against bit width: PTQ (max and MSE calibration) and short QAT from one float checkpoint.

  python scripts/sweep_bits.py --config configs/cifar10_vgg16_w025.yaml --pretrained runs/w025-fp32-s0 \\
      --pairs 8/8,4/8,4/4 [--per-channel 1] [--epochs 2] [-- extra train_qat.py flags]

For each weight/activation pair W/A:
- PTQ max: float weights (scale max|w_f|), ranges max|x| over --calib-batches float evaluation batches;
- PTQ MSE: ranges at their MSE-optimal clipping thresholds, weights as above;
- PTQ MSE+w: the same, and the weights clipped at their MSE-optimal thresholds too (train_quantization.ptq);
- QAT: ``train_qat`` at W/A with the config's ``qat`` recipe and the flags after ``--`` (its own run
  folder under this one).
All evaluate the same fake-quant graph on the test set (= the simulated int8 engine).
Writes sweep.json, sweep.md and sweep.png into the sweep's run folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli, sweep  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402


@cli_main
def main() -> None:
    argv = sys.argv[1:]
    qat_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    flags = cli.RUN_FLAGS + cli.QUANT_FLAGS + (cli.Flag("--epochs", "qat.epochs", int, "QAT epochs"),)
    p = cli.common_parser(__doc__, flags)
    p.add_argument("--pretrained", help="float run folder (best.params) or .params file (required to sweep)")
    p.add_argument("--pairs", default="8/8,6/8,4/8,8/4,4/4", help="comma-separated W/A bit pairs")
    p.add_argument("--calib-batches", type=int, default=10, help="PTQ calibration batches (training images)")
    p.add_argument("--skip-qat", action="store_true", help="PTQ rows only")
    p.add_argument("--lsq", action="store_true", help="also QAT with learned ranges, without and with distillation")
    p.add_argument("--attach", metavar="SWEEP_RUN",
                   help="no training: add the QAT runs named by --recipe to this sweep's table and plot")
    p.add_argument("--recipe", action="append", default=[], metavar="W/A=QAT_RUN",
                   help="with --attach: a QAT run (e.g. another recipe) to show as 'QAT, recipe' for W/A")
    if "--attach" in argv:
        args = p.parse_known_args(argv)[0]
        return sweep.attach(Path(args.attach), args.recipe)
    args = p.parse_args(argv)
    if not args.pretrained:
        raise UserError("pass --pretrained FLOAT_RUN_DIR (the float checkpoint every row starts from)")
    pairs = sweep.parse_pairs(args.pairs)
    extra = cli.add_flags(argparse.ArgumentParser(prog="sweep_bits.py ... --"), cli.QAT_FLAGS)
    cfg = cli.config_from_args(args, flags, cli.overrides_of(extra.parse_args(qat_extra), cli.QAT_FLAGS))
    run = sweep.run_sweep(cfg, cli.resolve_params(args.pretrained), pairs, args.calib_batches, args.skip_qat,
                          tuple(qat_extra), Path(args.config).stem, args.lsq)
    print(f"run folder: {run}\ntable: {run / 'sweep.md'}\nplot: {run / 'sweep.png'}")


if __name__ == "__main__":
    main()
