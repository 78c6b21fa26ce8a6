"""The public API, re-exported at the package top (``import train_quantization as tq``).

From a float Gluon network to an int8 file in a user's own script::

    cfg = tq.load_config("configs/synthetic_tiny.yaml", {"out": "runs/api"})
    ds = tq.dataset(cfg)
    net = tq.train_float(cfg, ds=ds)["net"]         # or any trained Gluon network
    qnet = tq.convert(net, cfg.quant)               # QConv2DBN / QDense in place, ranges unset
    tq.calibrate(qnet, ds, batches=5)               # EMA ranges from training batches
    tq.fit(qnet, cfg, ds, qat=True)                 # fine-tune with fake quantization
    int8 = tq.export(qnet, ds)                      # Int8Model: integer weights, scales, op graph
    int8.save("runs/api/model.int8.npz")
    logits = int8.run_integer(int8.normalize(ds.test_x[:8]))

``tq.train_qat(cfg, pretrained)`` does convert, calibrate and fit from a float checkpoint in one call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import mxnet as mx

from . import data as data_mod
from . import train
from .config import Config
from .int8.model import Int8Model


def dataset(cfg: Config) -> data_mod.Dataset:
    """The dataset of ``cfg.data`` (decoded, cached)."""
    return data_mod.dataset_from_config(cfg.data)


def calibrate(net: mx.gluon.HybridBlock, ds: data_mod.Dataset, batches: int = 10, method: str = "ema",
              batch_size: int = 64, seed: int = 0) -> None:
    """Set the activation ranges of a converted network from ``batches`` training batches: ``ema``
    (training-mode forwards, as QAT starts) or ``max``/``mse`` (post-training calibration)."""
    from .layers import ema_ranges, set_lsq_scales

    ctx = net.collect_params().list_ctx()
    norm = data_mod.normalizer(*ds.mean_std())
    if method == "ema":
        loader, _ = data_mod.make_loaders(ds, batch_size, batch_size, False, seed)
        with ema_ranges(net):
            train.calibrate(net, loader, norm, ctx, batches)
    else:
        from . import ptq

        loader = data_mod.calib_loader(ds, batch_size, batches, seed)
        ptq.calibrate_ranges(net, loader, norm, ctx[0], batches, method)
    set_lsq_scales(net, loader, norm, ctx[0])


def fit(net: mx.gluon.HybridBlock, cfg: Config, ds: data_mod.Dataset, run: Optional[Path] = None,
        qat: bool = False) -> dict:
    """Train ``net`` with ``cfg`` (``qat``: the ``qat`` recipe's schedule, ranges updated every step) into
    the run folder ``run`` (default: a new one under ``cfg.out``); returns the last epoch's metrics."""
    run = Path(run) if run else train.make_run_dir(cfg, "qat" if qat else "fp32", "api")
    net.hybridize(static_alloc=True)
    return train.fit(net, cfg, ds, run, train.parse_ctx(cfg.ctx), qat=qat)[1]


def export(net: mx.gluon.HybridBlock, ds: data_mod.Dataset) -> Int8Model:
    """The ``Int8Model`` of a QAT network, with ``ds``'s input normalization, shape and classes."""
    from .int8.export import export as export_net

    h, w, c = ds.image_shape
    return export_net(net, *ds.mean_std(), (c, h, w), ds.classes)
