#!/usr/bin/env python
"""Train the float network (VGG-BN) and print the run folder and best checkpoint."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli, train  # noqa: E402
from train_quantization.data import dataset_from_config  # noqa: E402
from train_quantization.errors import cli_main  # noqa: E402

log = logging.getLogger("train_quantization")


@cli_main
def main() -> None:
    args = cli.common_parser(__doc__).parse_args()
    cfg = cli.config_from_args(args)
    train.setup_logging()
    ctxs = train.parse_ctx(cfg.ctx)
    ds = dataset_from_config(cfg.data)
    train.seed_all(cfg.seed)
    net = cli.build_for(cfg, ds, quant=False)
    if args.resume:
        run = Path(args.resume)
        cli.load_weights(net, run / "last.params", ctxs, expect_ranges=False)
        train.log_to(run)
    else:
        cli.init_net(net, ctxs)
        run = train.make_run_dir(cfg, "fp32", os.path.splitext(os.path.basename(args.config))[0])
    net.hybridize(static_alloc=True)
    log.info("run folder %s; %d train / %d test images %s, %d classes", run, len(ds.train_x), len(ds.test_x),
             ds.image_shape, ds.num_classes)
    best, _ = train.fit(net, cfg, ds, run, ctxs, resume=bool(args.resume))
    cli.write_json(run / "result.json", {"kind": "fp32", "best_test_acc": best["test_acc"],
                                         "best_epoch": best["epoch"], "classes": ds.classes})
    print(f"run folder: {run}")
    print(f"best checkpoint: {run / 'best.params'} (test accuracy {best['test_acc']:.4f}, epoch {best['epoch']})")


if __name__ == "__main__":
    main()
