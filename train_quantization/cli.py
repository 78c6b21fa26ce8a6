"""Shared command-line flags and run setup for the scripts (which stay thin)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import mxnet as mx
import numpy as np

from . import data as data_mod
from .config import Config, load_config
from .errors import UserError
from .layers import quantized_layers
from .models import build_model


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (configs/*.yaml); required unless --resume")
    p.add_argument("--resume", help="run folder to continue after its last completed epoch (uses its config.yaml)")
    p.add_argument("--data", help="dataset: cifar-10-python.tar.gz, cifar-10-binary.tar.gz, an image-folder "
                                  "tree or tarball, or 'synthetic' (overrides data.source)")
    p.add_argument("--out", help="parent folder for the run folder (overrides out)")
    p.add_argument("--name", help="run folder name (default: <config>-<kind>-<time>)")
    p.add_argument("--epochs", type=int, help="override optim.epochs")
    p.add_argument("--lr", type=float, help="override optim.lr")
    p.add_argument("--batch-size", type=int, help="override data.batch_size")
    p.add_argument("--width", type=float, help="override model.width")
    p.add_argument("--model", help="override model.arch: vgg11|vgg13|vgg16|vgg19|gluoncv:<name> "
                                   "(e.g. gluoncv:cifar_resnet20_v1)")
    p.add_argument("--augment", type=int, choices=(0, 1), help="override data.augment (0/1)")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--ctx", help="devices: cpu, cpu:0,cpu:1 or gpu:N (overrides ctx)")
    p.add_argument("--kvstore", choices=("device", "local", "dist_sync"),
                   help="gradient aggregation (overrides kvstore); dist_sync: run under scripts/launch_dist.py")
    return p


def config_from_args(args: argparse.Namespace, extra: Optional[dict] = None) -> Config:
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"--resume {run}: not a run folder (no config.yaml)")
        return on_devices(load_config(run / "config.yaml"))
    if not args.config:
        raise UserError("pass --config configs/<name>.yaml (or --resume RUN_DIR)")
    overrides = {"data.source": args.data, "out": args.out, "name": args.name, "optim.epochs": args.epochs,
                 "optim.lr": args.lr, "data.batch_size": args.batch_size, "model.width": args.width,
                 "model.arch": args.model, "seed": args.seed, "kvstore": args.kvstore, "ctx": args.ctx,
                 "data.augment": None if args.augment is None else bool(args.augment)}
    overrides.update(extra or {})
    return on_devices(load_config(args.config, overrides))


def on_devices(cfg: Config) -> Config:
    """The compiled quantizer is a CPU operator: on GPUs ``quant.kernel: auto`` means stock ops."""
    import dataclasses

    if "gpu" in cfg.ctx:
        if cfg.quant.kernel == "fused":
            raise UserError("quant.kernel 'fused' is a CPU operator; use 'auto' or 'stock' with --ctx gpu:N")
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, kernel="stock"))
    return cfg


def build_for(cfg: Config, ds: data_mod.Dataset, quant: bool) -> mx.gluon.HybridBlock:
    if cfg.data.batch_size > len(ds.train_x):
        raise UserError(f"batch size {cfg.data.batch_size} is larger than the training set ({len(ds.train_x)} "
                        "images); lower data.batch_size")
    h, w, c = ds.image_shape
    if h != w and not cfg.model.arch.startswith("gluoncv:"):
        raise UserError(f"images are {h}x{w}; VGG here needs square images")
    return build_model(cfg.model, ds.num_classes, c, h, cfg.quant if quant else None)


def resolve_params(path: str, prefer: str = "best.params") -> Path:
    """A run folder (its ``best.params``) or a ``.params`` file."""
    p = Path(path)
    if p.is_dir():
        p = p / prefer
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}; pass a run folder or a .params file")
    return p


def load_weights(net: mx.gluon.Block, path: Path, ctxs: list, expect_ranges: bool) -> list:
    """Load ``path`` into ``net``; returns the parameter names the file did not have.

    Only the range states (``*.input_max``) may be missing, and only when loading a float
    checkpoint into a QAT network; anything else is a UserError naming the mismatch.
    """
    try:
        saved = mx.nd.load(str(path))
    except mx.base.MXNetError:
        raise UserError(f"{path} is not an MXNet parameter file") from None
    own = net._collect_params_with_prefix()
    has_ranges = any(k.endswith("input_max") for k in saved)
    if expect_ranges and not has_ranges:
        raise UserError(f"{path} is a float checkpoint, but a QAT checkpoint is needed here "
                        "(pass the run folder of train_qat.py)")
    if not expect_ranges and has_ranges and not any(k.endswith("input_max") for k in own):
        raise UserError(f"{path} is a QAT checkpoint, but a float one is needed here "
                        "(pass the run folder of train_fp32.py)")
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise UserError(f"{path} does not fit this model: unexpected parameters {unknown[:3]}; "
                        "check --config/--width/--model match the checkpoint")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{path} does not fit this model: {k} has shape {tuple(v.shape)}, the model "
                            f"expects {tuple(own[k].shape)}; check width and class count")
    missing = sorted(set(own) - set(saved))
    bad = [k for k in missing if not k.endswith("input_max")]
    if bad:
        raise UserError(f"{path} does not fit this model: missing parameters {bad[:3]}")
    net.load_parameters(str(path), ctx=ctxs, allow_missing=bool(missing), ignore_extra=False)
    for k in missing:  # range states start unset (0): calibration or the first batch sets them
        own[k].initialize(ctx=ctxs)
    return missing


def init_net(net: mx.gluon.HybridBlock, ctxs: list) -> None:
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctxs, force_reinit=True)


def qat_from_float(cfg: Config, ds: data_mod.Dataset, weights: Path, ctxs: list) -> tuple:
    """The QAT network holding a float checkpoint's weights; returns ``(net, new parameter names)``.

    VGG: the quantized spec loads the float checkpoint by name. Other models (``gluoncv:``):
    the float network loads it, then ``convert`` moves the values into quantized blocks.
    """
    if not cfg.model.arch.startswith("gluoncv:"):
        net = build_for(cfg, ds, quant=True)
        return net, load_weights(net, weights, ctxs, expect_ranges=False)
    from .convert import convert

    fnet = build_for(cfg, ds, quant=False)
    load_weights(fnet, weights, ctxs, expect_ranges=False)
    net = convert(fnet, cfg.quant)
    net.collect_params().reset_ctx(ctxs)
    return net, [f"{name}.input_max" for name, _ in quantized_layers(net)]


def float_with_qat_weights(cfg: Config, ds: data_mod.Dataset, qnet: mx.gluon.HybridBlock,
                           qpath: Path) -> mx.gluon.HybridBlock:
    """The float graph holding the QAT weights (what oneDNN quantizes with the learned ranges)."""
    fnet = build_for(cfg, ds, quant=False)
    if cfg.model.arch.startswith("gluoncv:"):
        from .convert import copy_to_float

        return copy_to_float(qnet, fnet)
    fnet.load_parameters(str(qpath), ignore_extra=True)  # VGG: the same parameter names
    return fnet


def describe_ranges(net: mx.gluon.Block) -> list:
    """Per-layer JSON summary: widths, weight scale(s), folded-weight quantization SQNR
    ``10 log10(sum w_f^2 / sum (fq(w_f) - w_f)^2)`` in dB, activation range."""
    from . import quant

    rows = []
    for name, layer in quantized_layers(net):
        q = layer.q
        if not hasattr(layer, "weight"):  # QAdd: a range only
            rows.append({"layer": name, "type": type(layer).__name__, "act_bits": q.act_bits,
                         "input_max": float(layer.input_max.data().asscalar())})
            continue
        w = layer.weight.data().asnumpy().astype(np.float64)
        if hasattr(layer, "gamma"):
            w, _ = quant.fold_bn_np(w, None, layer.gamma.data().asnumpy(), layer.beta.data().asnumpy(),
                                    layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy(), 1e-5)
        qmin, qmax, divisor = quant.weight_grid(q.weight_bits, q.scheme)
        s = quant.weight_scale_np(w, divisor, q.per_channel)
        err = np.sum((quant.fake_quant_np(w, s, qmin, qmax) - w) ** 2)
        sqnr = 10 * np.log10(np.sum(w ** 2) / err) if err > 0 else float("inf")
        rows.append({"layer": name, "type": type(layer).__name__, "weight_bits": q.weight_bits,
                     "act_bits": q.act_bits, "weight_scale": np.ravel(s).tolist() if q.per_channel else float(s),
                     "weight_sqnr_db": float(sqnr), "input_max": float(layer.input_max.data().asscalar())})
    return rows


def write_json(path: Path, obj: object) -> None:
    from .train import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))
