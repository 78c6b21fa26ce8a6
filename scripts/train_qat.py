#!/usr/bin/env python
"""Fine-tune a trained float network with fake quantization (QAT).

Loads the float checkpoint into the same model spec built with QConv2DBN/QDense, reports
which parameters were new (only the range states), the float accuracy and the fake-quant
accuracy before fine-tuning, fine-tunes, and saves the QAT checkpoint plus layers.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli, train  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402

log = logging.getLogger("train_quantization")


@cli_main
def main() -> None:
    p = cli.common_parser(__doc__)
    p.add_argument("--pretrained", help="float run folder (uses best.params) or .params file")
    p.add_argument("--per-channel", type=int, choices=(0, 1), help="override quant.per_channel (0/1)")
    p.add_argument("--bn-mode", choices=("frozen", "paper"), help="override quant.bn_mode")
    p.add_argument("--bn-freeze-step", type=int,
                   help="override quant.bn_freeze_step (paper mode: steps on batch statistics; 0 = frozen at once)")
    p.add_argument("--weight-bits", type=int, help="override quant.weight_bits (2-8)")
    p.add_argument("--act-bits", type=int, help="override quant.act_bits (2-8)")
    p.add_argument("--ste", choices=("plain", "clipped"), help="override quant.ste")
    p.add_argument("--scheme", choices=("original", "onednn"),
                   help="override quant.scheme (onednn implies per-channel weights unless --per-channel 0)")
    p.add_argument("--first-last-bits", type=int, help="override quant.first_last_bits (0 off, 2-8)")
    p.add_argument("--delay-steps", type=int, help="override quant.delay_steps (float steps before quantizing)")
    p.add_argument("--freeze-ranges-step", type=int, help="override quant.freeze_ranges_step (-1 never)")
    p.add_argument("--calib", choices=("ema", "max", "mse"),
                   help="override quant.calib: how the ranges start (mse: MSE-optimal clipping, see ptq.py)")
    args = p.parse_args()
    if not args.resume and not args.pretrained:
        raise UserError("pass --pretrained FLOAT_RUN_DIR (or --resume QAT_RUN_DIR)")
    if args.scheme == "onednn" and args.per_channel is None:
        args.per_channel = 1
    extra = {"quant.per_channel": None if args.per_channel is None else bool(args.per_channel),
             "quant.scheme": args.scheme,
             "quant.bn_mode": args.bn_mode, "quant.bn_freeze_step": args.bn_freeze_step,
             "quant.weight_bits": args.weight_bits,
             "quant.act_bits": args.act_bits, "quant.ste": args.ste,
             "quant.first_last_bits": args.first_last_bits, "quant.delay_steps": args.delay_steps,
             "quant.freeze_ranges_step": args.freeze_ranges_step, "quant.calib": args.calib,
             "quant.epochs": args.epochs, "quant.lr": args.lr}
    args.epochs = args.lr = None  # they name the QAT schedule here, not optim's
    cfg = cli.config_from_args(args, extra)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=cfg.quant.epochs, lr=cfg.quant.lr,
                                                             warmup_epochs=0.0, schedule="cosine"))
    train.setup_logging()
    ctxs = train.parse_ctx(cfg.ctx)
    ds = data_mod.dataset_from_config(cfg.data)
    train.seed_all(cfg.seed)
    calib_loader, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False,
                                                      cfg.seed)
    norm = data_mod.normalizer(*ds.mean_std())
    if args.resume:
        net = cli.build_for(cfg, ds, quant=True)
        run = Path(args.resume)
        start = json.loads((run / "qat_start.json").read_text())
        cli.load_weights(net, run / "last.params", ctxs, expect_ranges=True)
        net.hybridize(static_alloc=True)
        train.log_to(run)
    else:
        weights = cli.resolve_params(args.pretrained)
        fnet = cli.build_for(cfg, ds, quant=False)
        cli.load_weights(fnet, weights, ctxs, expect_ranges=False)
        fnet.hybridize(static_alloc=True)
        float_acc = train.evaluate(fnet, test_loader, norm, ctxs)["acc"]
        net, new = cli.qat_from_float(cfg, ds, weights, ctxs)
        net.hybridize(static_alloc=True)
        run = train.make_run_dir(cfg, "qat", os.path.splitext(os.path.basename(args.config))[0])
        log.info("loaded %s; new parameters (range states only): %s", weights, ", ".join(new))
        if cfg.quant.calib == "ema":
            train.calibrate(net, calib_loader, norm, ctxs, cfg.quant.calib_batches)
        else:
            from train_quantization import ptq

            ptq.calibrate_ranges(net, data_mod.calib_loader(ds, cfg.data.batch_size, cfg.quant.calib_batches, cfg.seed),
                                 norm, ctxs[0], cfg.quant.calib_batches, cfg.quant.calib)
        before = train.evaluate(net, test_loader, norm, ctxs)["acc"]
        log.info("float accuracy %.4f; fake-quant accuracy before QAT %.4f (ranges from %d batches)",
                 float_acc, before, cfg.quant.calib_batches)
        start = {"pretrained": str(weights), "float_acc": float_acc, "fq_acc_before": before, "new_parameters": new}
        cli.write_json(run / "qat_start.json", start)
        cli.write_json(run / "layers_before.json", cli.describe_ranges(net))
    best, last = train.fit(net, cfg, ds, run, ctxs, qat=True, resume=bool(args.resume))
    after = last["test_acc"]  # the final weights (last.params) are the QAT result; best.params is kept too
    layers = cli.describe_ranges(net)
    shares = train.clip_shares(net, test_loader, norm, ctxs[0])
    for row in layers:
        row["clipped_share"] = shares[row["layer"]]
    cli.write_json(run / "layers.json", layers)
    result = dict(start, kind="qat", fq_acc=after, best_fq_acc=best["test_acc"], best_epoch=best["epoch"],
                  classes=ds.classes, mean_std=ds.mean_std())
    cli.write_json(run / "result.json", result)
    print(f"new parameters: {', '.join(start['new_parameters'])}")
    print(f"float accuracy {start['float_acc']:.4f}; fake-quant before QAT {start['fq_acc_before']:.4f}; "
          f"after QAT {after:.4f}")
    print(f"run folder: {run}")
    print(f"QAT checkpoint: {run / 'last.params'}")


if __name__ == "__main__":
    main()
