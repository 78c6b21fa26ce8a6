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
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli, ptq, report, train  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.qat import train_qat  # noqa: E402


def parse_pairs(text: str) -> list:
    pairs = []
    for item in text.split(","):
        try:
            w, a = (int(v) for v in item.strip().split("/"))
        except ValueError:
            raise UserError(f"--pairs item {item!r} is not W/A (e.g. 4/8)") from None
        if not (2 <= w <= 8 and 2 <= a <= 8):
            raise UserError(f"--pairs item {item!r}: widths must be 2-8")
        pairs.append((w, a))
    return pairs


def attach(run: Path, recipes: list) -> None:
    """Add finished QAT runs to a sweep's rows (key ``qat_recipe``) and redraw its table and plot."""
    if not (run / "sweep.json").is_file():
        raise UserError(f"--attach {run}: not a sweep run folder (no sweep.json)")
    out = json.loads((run / "sweep.json").read_text())
    for item in recipes:
        pair, _, qat = item.partition("=")
        (w, a), res = parse_pairs(pair)[0], Path(qat) / "result.json"
        if not res.is_file():
            raise UserError(f"--recipe {item}: {res} not found (pass a finished train_qat.py run folder)")
        row = next((r for r in out["rows"] if (r["weight_bits"], r["act_bits"]) == (w, a)), None)
        if row is None:
            raise UserError(f"--recipe {item}: the sweep has no W{w}A{a} row")
        row["qat_recipe"], row["qat_recipe_run"] = json.loads(res.read_text())["fq_acc"], str(qat)
    cli.write_json(run / "sweep.json", out)
    report.write_sweep(run, out["rows"])
    print(f"table: {run / 'sweep.md'}\nplot: {run / 'sweep.png'}")


@cli_main
def main() -> None:
    argv = sys.argv[1:]
    qat_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = cli.common_parser(__doc__, cli.RUN_FLAGS + (cli.Flag("--epochs", "qat.epochs", int, "QAT epochs"),))
    p.add_argument("--pretrained", help="float run folder (best.params) or .params file (required to sweep)")
    p.add_argument("--pairs", default="8/8,6/8,4/8,8/4,4/4", help="comma-separated W/A bit pairs")
    p.add_argument("--per-channel", type=int, choices=(0, 1), help="override quant.per_channel (0/1)")
    p.add_argument("--first-last-bits", type=int, help="override quant.first_last_bits (0 off, 2-8)")
    p.add_argument("--calib-batches", type=int, default=10, help="PTQ calibration batches (training images)")
    p.add_argument("--skip-qat", action="store_true", help="PTQ rows only")
    p.add_argument("--attach", metavar="SWEEP_RUN",
                   help="no training: add the QAT runs named by --recipe to this sweep's table and plot")
    p.add_argument("--recipe", action="append", default=[], metavar="W/A=QAT_RUN",
                   help="with --attach: a QAT run (e.g. another recipe) to show as 'QAT, recipe' for W/A")
    if "--attach" in argv:
        args = p.parse_known_args(argv)[0]
        return attach(Path(args.attach), args.recipe)
    args = p.parse_args(argv)
    if not args.pretrained:
        raise UserError("pass --pretrained FLOAT_RUN_DIR (the float checkpoint every row starts from)")
    pairs = parse_pairs(args.pairs)
    extra = cli.add_flags(argparse.ArgumentParser(prog="sweep_bits.py ... --"), cli.QAT_FLAGS)
    extra_args = extra.parse_args(qat_extra)
    base = {"quant.per_channel": None if args.per_channel is None else bool(args.per_channel),
            "quant.first_last_bits": args.first_last_bits, **cli.overrides_of(extra_args, cli.QAT_FLAGS)}
    cfg = cli.config_from_args(args, cli.RUN_FLAGS + (cli.Flag("--epochs", "qat.epochs", int),),
                               {k: v for k, v in base.items() if v is not None})
    weights = cli.resolve_params(args.pretrained)
    train.setup_logging()
    ctxs = train.parse_ctx(cfg.ctx)
    ds = data_mod.dataset_from_config(cfg.data)
    _, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
    calib = data_mod.calib_loader(ds, cfg.data.batch_size, args.calib_batches, cfg.seed)
    norm = data_mod.normalizer(*ds.mean_std())
    run = train.make_run_dir(cfg, "sweep", Path(args.config).stem)

    fnet = cli.build_for(cfg, ds, quant=False)
    cli.load_weights(fnet, weights, ctxs, expect_ranges=False)
    fnet.hybridize(static_alloc=True)
    float_acc = train.evaluate(fnet, test_loader, norm, ctxs)["acc"]
    rows = []
    for w, a in pairs:
        qcfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, weight_bits=w, act_bits=a))
        row = {"weight_bits": w, "act_bits": a, "float": float_acc}
        for key, act_method, clip_weights in (("ptq_max", "max", False), ("ptq_mse", "mse", False),
                                              ("ptq_mse_w", "mse", True)):
            net, _ = cli.qat_from_float(qcfg, ds, weights, ctxs)
            net.hybridize(static_alloc=True)
            if clip_weights:
                ptq.clip_weights_mse(net)
            ptq.calibrate_ranges(net, calib, norm, ctxs[0], args.calib_batches, act_method)
            row[key] = train.evaluate(net, test_loader, norm, ctxs)["acc"]
        if not args.skip_qat:
            name = f"qat-w{w}a{a}"
            res = train_qat(dataclasses.replace(qcfg, out=str(run), name=name), str(weights), ds=ds)
            row["qat"], row["qat_run"] = res["fq_acc"], name
        rows.append(row)
        cli.write_json(run / "sweep.json", {"pretrained": str(weights), "per_channel": cfg.quant.per_channel,
                                            "first_last_bits": cfg.quant.first_last_bits,
                                            "calib_batches": args.calib_batches, "qat_epochs": cfg.qat.epochs,
                                            "qat_extra": qat_extra, "rows": rows})
        print(report.sweep_row_text(rows[-1]), flush=True)
    report.write_sweep(run, rows)
    print(f"run folder: {run}\ntable: {run / 'sweep.md'}\nplot: {run / 'sweep.png'}")


if __name__ == "__main__":
    main()
