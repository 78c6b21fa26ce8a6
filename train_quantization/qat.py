"""Quantization-aware training from a float checkpoint, as one call (``train_qat``).

The float checkpoint is loaded into the float network and ``convert``ed (the only new parameters
are the range states), its accuracy and the fake-quant accuracy before fine-tuning are measured
(ranges from ``qat.calib``), then ``train.fit`` fine-tunes with the ``qat`` recipe. The run folder
gets ``qat_start.json``, ``layers_before.json``, ``layers.json`` (per layer: widths, weight
scales, SQNR, range, clipped share) and ``result.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import mxnet as mx

from . import cli, train
from . import data as data_mod
from .config import Config

log = logging.getLogger("train_quantization")


def calibrate(net: mx.gluon.HybridBlock, cfg: Config, ds: data_mod.Dataset, ctxs: list) -> None:
    """Set the ranges before QAT: ``qat.calib`` ``ema`` (training-mode forwards, the original) or
    ``max``/``mse`` (float evaluation batches, ``ptq.calibrate_ranges``; ``quant.range: mse`` always),
    from ``qat.calib_batches`` training batches. Learned ranges (``quant.range: lsq``) start there (or, with
    ``lsq``, at LSQ's own ``2 mean|x| / sqrt(Q_P)`` for activations and weights), then get their gradient
    scales from one batch."""
    from .layers import ema_ranges, init_weight_steps, set_lsq_scales

    norm = data_mod.normalizer(*ds.mean_std())
    r = cfg.qat
    method = "mse" if cfg.quant.range == "mse" else r.calib
    if method == "ema":
        loader, _ = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
        with ema_ranges(net):
            train.calibrate(net, loader, norm, ctxs, r.calib_batches)
    else:
        from . import ptq

        loader = data_mod.calib_loader(ds, cfg.data.batch_size, r.calib_batches, cfg.seed)
        ptq.calibrate_ranges(net, loader, norm, ctxs[0], r.calib_batches, method)
    if method == "lsq":
        init_weight_steps(net, lsq_init=True)
    set_lsq_scales(net, loader, norm, ctxs[0])


def start(cfg: Config, ds: data_mod.Dataset, weights: Path, ctxs: list, stem: str) -> tuple:
    """The calibrated QAT network from ``weights``, the record of where QAT starts, and the new run
    folder (made once the checkpoint has loaded, so bad input leaves no folder behind)."""
    _, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
    norm = data_mod.normalizer(*ds.mean_std())
    fnet = cli.build_for(cfg, ds, quant=False)
    cli.load_weights(fnet, weights, ctxs, expect_ranges=False)
    fnet.hybridize(static_alloc=True)
    float_acc = train.evaluate(fnet, test_loader, norm, ctxs)["acc"]
    net, new = cli.qat_from_float(cfg, ds, weights, ctxs)
    net.hybridize(static_alloc=True)
    run = train.make_run_dir(cfg, "qat", stem)
    log.info("loaded %s; new parameters (range states only): %s", weights, ", ".join(new))
    calibrate(net, cfg, ds, ctxs)
    before = train.evaluate(net, test_loader, norm, ctxs)["acc"]
    log.info("float accuracy %.4f; fake-quant accuracy before QAT %.4f (ranges from %d batches)",
             float_acc, before, cfg.qat.calib_batches)
    record = {"pretrained": str(weights), "float_acc": float_acc, "fq_acc_before": before, "new_parameters": new}
    cli.write_json(run / "qat_start.json", record)
    cli.write_json(run / "layers_before.json", cli.describe_ranges(net))
    return net, record, run


def train_qat(cfg: Config, pretrained: Optional[str] = None, resume: Optional[Path] = None,
              ds: Optional[data_mod.Dataset] = None, stem: str = "qat") -> dict:
    """Fine-tune the float checkpoint ``pretrained`` (a run folder or ``.params`` file) with fake
    quantization, or continue the QAT run folder ``resume``; returns ``result.json``'s content plus
    ``run`` (the run folder) and ``net`` (the QAT network)."""
    import json

    train.setup_logging()
    ctxs = train.parse_ctx(cfg.ctx)
    ds = ds or data_mod.dataset_from_config(cfg.data)
    train.seed_all(cfg.seed)
    if resume:
        run = Path(resume)
        train.check_resumable(run)
        net = cli.build_for(cfg, ds, quant=True)
        cli.load_weights(net, run / "last.params", ctxs, expect_ranges=True)
        net.hybridize(static_alloc=True)
        train.log_to(run)
        record = json.loads((run / "qat_start.json").read_text())
        from .layers import set_lsq_scales  # learned ranges: the gradient scales come from the input sizes

        set_lsq_scales(net, data_mod.calib_loader(ds, cfg.data.batch_size, 1, cfg.seed),
                       data_mod.normalizer(*ds.mean_std()), ctxs[0])
    else:
        net, record, run = start(cfg, ds, cli.resolve_params(pretrained), ctxs, stem)
    teacher = None
    if cfg.qat.distill > 0:  # the float model the run started from
        teacher = cli.build_for(cfg, ds, quant=False)
        cli.load_weights(teacher, Path(record["pretrained"]), ctxs, expect_ranges=False)
        teacher.hybridize(static_alloc=True)
    best, last = train.fit(net, cfg, ds, run, ctxs, qat=True, resume=bool(resume), teacher=teacher)
    _, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
    layers = cli.describe_ranges(net)
    shares = train.clip_shares(net, test_loader, data_mod.normalizer(*ds.mean_std()), ctxs[0])
    for row in layers:
        row["clipped_share"] = shares[row["layer"]]
    cli.write_json(run / "layers.json", layers)
    # the final weights (last.params) are the QAT result; best.params is kept too
    result = dict(record, kind="qat", fq_acc=last["test_acc"], best_fq_acc=best["test_acc"],
                  best_epoch=best["epoch"], classes=ds.classes, mean_std=ds.mean_std())
    cli.write_json(run / "result.json", result)
    out: dict[str, Any] = dict(result, run=run, net=net)
    return out
