"""Shared command-line flags and run setup for the scripts (which stay thin).

Every flag that overrides a config key is declared once, in a ``Flag`` table, with the dotted key
it sets; scripts pick their table (``FLOAT_FLAGS``, ``QAT_FLAGS``) and ``config_from_args`` turns
the given flags into overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mxnet as mx
import numpy as np

from . import data as data_mod
from .config import Config, load_config, parse_arch
from .errors import UserError
from .layers import quantized_layers
from .models import build_model


def _bool01(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


@dataclass(frozen=True)
class Flag:
    """A command-line flag that overrides the config key ``key``."""

    flag: str
    key: str
    type: Callable = str
    help: str = ""
    choices: Optional[tuple] = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


RUN_FLAGS = (
    Flag("--data", "data.source", help="dataset: cifar-10-python.tar.gz, cifar-10-binary.tar.gz, an image-folder "
                                       "tree or tarball, or 'synthetic'"),
    Flag("--out", "out", help="parent folder for the run folder"),
    Flag("--name", "name", help="run folder name (default: <config>-<kind>-<time>)"),
    Flag("--batch-size", "data.batch_size", int, "images per step"),
    Flag("--width", "model.width", float, "VGG channel multiplier"),
    Flag("--model", "model.arch", help="vgg11|vgg13|vgg16|vgg19|mobilenetv2_cifar|gluoncv:<name> "
                                       "(e.g. gluoncv:cifar_resnet20_v1)"),
    Flag("--augment", "data.augment", _bool01, "random crop + flip, 0/1"),
    Flag("--seed", "seed", int),
    Flag("--ctx", "ctx", help="devices: cpu, cpu:0,cpu:1 or gpu:N"),
    Flag("--kvstore", "kvstore", choices=("device", "local", "dist_sync"),
         help="gradient aggregation; dist_sync: run under scripts/launch_dist.py"),
)
FLOAT_FLAGS = RUN_FLAGS + (Flag("--epochs", "optim.epochs", int), Flag("--lr", "optim.lr", float, "peak learning rate"),
                           Flag("--average-decay", "optim.average_decay", float, "weight averaging decay, 0 off"))
def _layer_bits(path: str) -> dict:
    """``--layer-bits FILE``: a YAML/JSON mapping of layer -> [weight_bits, act_bits] (sensitivity.py writes one)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


QUANT_FLAGS = (
    Flag("--per-channel", "quant.per_channel", _bool01, "weight scales per output channel, 0/1"),
    Flag("--scheme", "quant.scheme", choices=("original", "onednn"),
         help="onednn: oneDNN's 8-bit arithmetic (per-channel weights)"),
    Flag("--weight-bits", "quant.weight_bits", int, "2-8"),
    Flag("--act-bits", "quant.act_bits", int, "2-8"),
    Flag("--first-last-bits", "quant.first_last_bits", int, "width of the first and last layer, 0 off, 2-8"),
    Flag("--add-bits", "quant.add_bits", int, "width of the residual adds' codes, 0: --act-bits, 2-8"),
    Flag("--layer-bits", "quant.layer_bits", _layer_bits, "YAML file of per-layer [weight_bits, act_bits]"),
    Flag("--ste", "quant.ste", choices=("plain", "clipped")),
    Flag("--bn-mode", "quant.bn_mode", choices=("frozen", "paper")),
    Flag("--range", "quant.range", choices=("ema", "mse", "lsq"),
         help="activation and weight ranges: EMA of the max, MSE-calibrated and frozen, or learned (LSQ)"),
)
QAT_FLAGS = RUN_FLAGS + QUANT_FLAGS + (
    Flag("--epochs", "qat.epochs", int, "QAT epochs"),
    Flag("--lr", "qat.lr", float, "QAT peak learning rate"),
    Flag("--wd", "qat.wd", float, "QAT weight decay (default: optim.wd)"),
    Flag("--calib", "qat.calib", choices=("ema", "max", "mse", "lsq"),
         help="how the ranges start (mse: MSE-optimal clipping, see ptq.py; lsq: LSQ's 2 mean|x| / sqrt(Q_P))"),
    Flag("--delay-steps", "qat.delay_steps", int, "float steps before fake quantization switches on"),
    Flag("--freeze-ranges-step", "qat.freeze_ranges_step", int, "the range EMA stops from this step on, -1 never"),
    Flag("--bn-freeze-step", "qat.bn_freeze_step", int, "paper BN mode: steps on batch statistics"),
    Flag("--distill", "qat.distill", float, "distill from the float model at this temperature, 0 off"),
    Flag("--distill-weight", "qat.distill_weight", float, "weight of the distillation loss, 0-1"),
)


def add_flags(p: argparse.ArgumentParser, flags: tuple) -> argparse.ArgumentParser:
    for f in flags:
        p.add_argument(f.flag, dest=f.dest, type=f.type, choices=f.choices,
                       help=f"{f.help + '; ' if f.help else ''}overrides {f.key}")
    return p


def common_parser(description: str, flags: tuple = FLOAT_FLAGS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (configs/*.yaml); required unless --resume")
    p.add_argument("--resume", help="run folder to continue after its last completed epoch (uses its config.yaml)")
    return add_flags(p, flags)


def overrides_of(args: argparse.Namespace, flags: tuple) -> dict:
    """``{dotted key: value}`` of the flags given on the command line."""
    return {f.key: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


def config_from_args(args: argparse.Namespace, flags: tuple = FLOAT_FLAGS, base: Optional[dict] = None) -> Config:
    """The run's config: ``--resume``'s config.yaml, or ``--config`` with ``base`` (e.g. the pretrained
    run's model and data) and then the flags given applied."""
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"--resume {run}: not a run folder (no config.yaml)")
        return on_devices(load_config(run / "config.yaml"))
    if not args.config:
        raise UserError("pass --config configs/<name>.yaml (or --resume RUN_DIR)")
    return on_devices(load_config(args.config, {**(base or {}), **overrides_of(args, flags)}))


def run_spec(run: Path) -> dict:
    """A float run's model and data keys (from its config.yaml), which a QAT run of it must share."""
    raw = load_config(run / "config.yaml").to_dict()
    keys = [f"model.{k}" for k in raw["model"]] + [f"data.{k}" for k in raw["data"] if k.startswith("synthetic")]
    keys.append("data.source")
    return {k: raw[k.split(".")[0]][k.split(".")[1]] for k in keys}


def on_devices(cfg: Config) -> Config:
    """The compiled quantizer is a CPU operator: on GPUs ``quant.kernel: auto`` means stock ops."""
    if "gpu" in cfg.ctx:
        if cfg.quant.kernel == "fused":
            raise UserError("quant.kernel 'fused' is a CPU operator; use 'auto' or 'stock' with --ctx gpu:N")
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, kernel="stock"))
    return cfg


def build_for(cfg: Config, ds: data_mod.Dataset, quant: bool) -> mx.gluon.HybridBlock:
    """The float network for ``ds``, or (``quant``) its QAT form with random values (load a checkpoint next)."""
    if cfg.data.batch_size > len(ds.train_x):
        raise UserError(f"batch size {cfg.data.batch_size} is larger than the training set ({len(ds.train_x)} "
                        "images); lower data.batch_size")
    h, w, c = ds.image_shape
    if h != w and parse_arch(cfg.model.arch)[0] == "vgg":
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
    """The QAT network holding a float checkpoint's weights; returns ``(net, new parameter names)``:
    the float network loads the checkpoint, then ``convert`` moves the values into quantized blocks."""
    from .conversion import convert

    fnet = build_for(cfg, ds, quant=False)
    load_weights(fnet, weights, ctxs, expect_ranges=False)
    net = convert(fnet, cfg.quant)
    net.collect_params().reset_ctx(ctxs)
    return net, sorted(f"{name}.input_max" for name, _ in quantized_layers(net))


def float_with_qat_weights(cfg: Config, ds: data_mod.Dataset, qnet: mx.gluon.HybridBlock) -> mx.gluon.HybridBlock:
    """The float graph holding the QAT weights (what oneDNN quantizes with the learned ranges)."""
    from .conversion import copy_to_float

    return copy_to_float(qnet, build_for(cfg, ds, quant=False))


def describe_ranges(net: mx.gluon.Block) -> list:
    """Per-layer JSON summary: widths, weight scale(s), folded-weight quantization SQNR
    ``10 log10(sum w_f^2 / sum (fq(w_f) - w_f)^2)`` in dB, activation range."""
    from . import quant

    rows = []
    for name, layer in quantized_layers(net):
        q = layer.spec
        if not hasattr(layer, "weight"):  # QAdd: a range only
            rows.append({"layer": name, "type": type(layer).__name__, "act_bits": q.act_bits,
                         "input_max": float(layer.input_max.data().asscalar())})
            continue
        w = layer.weight.data().asnumpy().astype(np.float64)
        if hasattr(layer, "gamma"):
            w, _ = quant.fold_bn_np(w, None, layer.gamma.data().asnumpy(), layer.beta.data().asnumpy(),
                                    layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy(), 1e-5)
        qmin, qmax, divisor = quant.weight_grid(q.weight_bits, q.scheme)
        if q.range == "lsq":  # the learned step
            s = layer.weight_step.data().asnumpy().astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
            s = s if q.per_channel else s.reshape(())
        else:
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
