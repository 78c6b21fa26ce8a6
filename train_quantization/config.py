"""One typed config for float training and QAT, read from YAML.

Sections: ``data``, ``model``, ``optim`` (float training and the QAT optimizer), ``quant`` (the
quantizer and each layer's widths: ``QuantConfig.spec`` gives the frozen per-layer ``QuantSpec``),
``qat`` (the fine-tuning recipe). Every field has a unit or a meaning in its comment. Unknown keys and wrong types are
errors that name the key (``UserError``); scripts turn them into one line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    source: str = "synthetic"  # archive, folder, image tree or "synthetic" (see data.py)
    augment: bool = False  # random crop (4 px zero padding) + horizontal flip
    batch_size: int = 128  # images per step (summed over devices)
    eval_batch_size: int = 256  # images per evaluation batch
    cache_dir: str = ".cache/data"  # decoded arrays (.npz) keyed by source path/size/mtime
    # synthetic set only
    synthetic_train: int = 2000  # training images
    synthetic_test: int = 500  # test images
    synthetic_size: int = 16  # image side, pixels
    synthetic_channels: int = 3  # 1 or 3
    synthetic_seed: int = 0  # generator seed (the set, not the training run)
    synthetic_noise: float = 22.0  # std of the Gaussian pixel noise, in 0-255 pixel units


@dataclass
class ModelConfig:
    arch: str = "vgg16"  # vgg11|vgg13|vgg16|vgg19 | mobilenetv2_cifar | gluoncv:<model zoo name>
    width: float = 1.0  # channel multiplier (VGG: [64, 128, 256, 512, 512], Dense 512; MobileNetV2); gluoncv: unused
    dropout: float = 0.5  # classifier dropout probability
    # VGG: dropout probability after each conv block that another conv follows in its stage, one per stage
    # ([] = none); [0.3, 0.4, 0.4, 0.4, 0.4] is Liu & Deng's (2015) VGG16-BN for small CIFAR-sized data
    conv_dropout: list = field(default_factory=lambda: [])


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | nag | adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # sgd/nag momentum
    wd: float = 5e-4  # weight decay (L2), applied by the trainer
    wd_all: bool = False  # True: decay every parameter (Gluon's default); False: conv/dense weights only
    epochs: int = 15  # passes over the training set
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs
    step_epochs: list = field(default_factory=lambda: [])  # step schedule: epochs where lr *= step_factor
    step_factor: float = 0.1
    label_smoothing: float = 0.0  # target = (1 - e) * one_hot + e / classes; 0 = plain cross-entropy
    # float training: weight averaging, avg = d * avg + (1 - d) * w after each step (0 = off; horizon
    # 1 / (1 - d) steps); test accuracy and best.params are the average's, the raw weights keep training
    average_decay: float = 0.0
    # >0: before each test pass and save, the average's BatchNorm statistics are recomputed over this many
    # training batches (SWA's update_bn; averaged statistics do not fit averaged weights)
    average_bn_batches: int = 50


@dataclass(frozen=True)
class QuantSpec:
    """How one layer quantizes; frozen: every quantized block holds its own (``QuantConfig.spec``)."""

    weight_bits: int = 8  # weights: narrow symmetric [-(2^(b-1)-1), 2^(b-1)-1]
    act_bits: int = 8  # activations: signed [-2^(b-1), 2^(b-1)-1], scale moving_max / 2^(b-1)
    per_channel: bool = False  # weight scale per output channel instead of per tensor
    scheme: str = "original"  # original (Jacob et al.) | onednn (MXNet/oneDNN int8 arithmetic; 8 bits, per channel)
    momentum: float = 0.95  # EMA: moving_max = m * moving_max + (1 - m) * max|x|
    ste: str = "plain"  # plain: identity gradient; clipped: zero outside the range
    bn_mode: str = "frozen"  # frozen: running statistics; paper: batch stats + correction until frozen
    train_bn_affine: bool = True  # frozen mode: gamma/beta keep learning
    kernel: str = "auto"  # auto: compiled fused quantizer if it builds, else stock ops | fused | stock
    range: str = "ema"  # ema: EMA of the batch max | mse: MSE-calibrated, frozen | lsq: learned step sizes

    @property
    def mxnet_arithmetic(self) -> bool:
        """Scheme onednn: BatchNorm folded and weights scaled in MXNet's float arithmetic, bit for bit
        (``quant.fold_bn``, ``quant.weight_scales``), so that oneDNN quantizes the same weights."""
        return self.scheme == "onednn"


@dataclass
class QuantConfig:
    """The ``quant:`` section: the quantizer, and which layers get which widths."""

    weight_bits: int = 8  # default weight width, 2-8
    act_bits: int = 8  # default activation width, 2-8
    per_channel: Optional[bool] = None  # None: per channel in the onednn scheme and for grouped convolutions
    scheme: str = "original"  # original (Jacob et al.) | onednn (MXNet/oneDNN int8 arithmetic; 8 bits, per channel)
    momentum: float = 0.95  # EMA: moving_max = m * moving_max + (1 - m) * max|x|
    ste: str = "plain"  # plain: identity gradient; clipped: zero outside the range
    bn_mode: str = "frozen"  # frozen: running statistics; paper: batch stats + correction, then frozen
    train_bn_affine: bool = True  # frozen mode: gamma/beta keep learning
    kernel: str = "auto"  # auto: compiled fused quantizer if it builds, else stock ops | fused | stock
    range: str = "ema"  # ema: EMA of the batch max (the original) | mse: MSE-calibrated, frozen | lsq: learned (LSQ)
    first_last_bits: int = 0  # >0: the first and the last quantized layer use this width for weights and input
    add_bits: int = 0  # >0: width of the residual adds' codes (both branches); 8 keeps the residual stream
                       # near float when the convolutions read 2-4 bit inputs, as in LSQ/PACT/APoT's ResNets
    layer_bits: dict = field(default_factory=dict)  # per layer [weight_bits, act_bits], e.g. {classifier.3: [8, 8]}
    quantize_last_layer: bool = True  # False keeps the network's last Dense in float

    def spec(self, weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
             grouped: bool = False) -> QuantSpec:
        """The frozen per-layer spec, at these widths (default: the section's). Per-channel weights by
        default in the onednn scheme and for grouped/depthwise convolutions (``grouped``), whose channels'
        ranges differ by orders of magnitude."""
        per_channel = (self.scheme == "onednn" or grouped) if self.per_channel is None else self.per_channel
        return QuantSpec(weight_bits or self.weight_bits, act_bits or self.act_bits, per_channel, self.scheme,
                         self.momentum, self.ste, self.bn_mode, self.train_bn_affine, self.kernel, self.range)


@dataclass
class QATConfig:
    """The ``qat:`` section: the fine-tuning recipe of ``train_qat.py`` (the optimizer is ``optim``'s)."""

    epochs: int = 2  # QAT fine-tuning epochs
    lr: float = 0.005  # peak learning rate (cosine to 0, no warm-up)
    wd: Optional[float] = None  # L2 weight decay while fine-tuning; None: optim.wd (LSQ lowers it at 2-3 bits)
    calib: str = "ema"  # how ranges start: ema (training-mode EMA, the original) | max | mse | lsq (LSQ init)
    calib_batches: int = 10  # training batches that initialize the ranges before QAT
    delay_steps: int = 0  # steps that train in float (BN folded) before fake quantization switches on
    freeze_ranges_step: int = -1  # >=0: activation ranges stop updating from this QAT step on
    bn_freeze_step: int = 0  # paper BN mode: steps on batch statistics before they freeze
    distill: float = 0.0  # >0: knowledge distillation from the float model at this temperature T
    distill_weight: float = 0.5  # loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher || student), softened by T


@dataclass
class Config:
    seed: int = 0  # seeds Python, NumPy and MXNet
    ctx: str = "cpu"  # cpu | cpu:0,cpu:1 | gpu:0 ...
    kvstore: str = "device"  # device | local (one process) | dist_sync (workers of a ps-lite cluster)
    out: str = "runs"  # parent folder of run folders
    name: str = ""  # run folder name; empty: <config stem>-<kind>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    qat: QATConfig = field(default_factory=QATConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VGG_ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19")
_CHOICES = {
    "optim.optimizer": ("sgd", "nag", "adam"),
    "optim.schedule": ("cosine", "step", "constant"),
    "quant.ste": ("plain", "clipped"),
    "quant.bn_mode": ("frozen", "paper"),
    "quant.kernel": ("auto", "fused", "stock"),
    "quant.scheme": ("original", "onednn"),
    "quant.range": ("ema", "mse", "lsq"),
    "qat.calib": ("ema", "max", "mse", "lsq"),
    "kvstore": ("device", "local", "dist_sync"),
}


def parse_arch(arch: str) -> tuple:
    """``model.arch`` -> ``(kind, name)``: ``("vgg", "vgg16")`` or ``("gluoncv", "<model zoo name>")``."""
    if arch in VGG_ARCHS:
        return "vgg", arch
    if arch == "mobilenetv2_cifar":
        return arch, arch
    kind, _, name = arch.partition(":")
    if kind == "gluoncv" and name:
        return kind, name
    raise UserError(f"config key 'model.arch' must be one of {VGG_ARCHS + ('mobilenetv2_cifar',)} or "
                    f"gluoncv:<model name>, got {arch!r}")


def _check_type(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and (type(value) is not typ):
        raise UserError(f"config key '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is dict and not isinstance(value, dict):
        raise UserError(f"config key '{key}' must be a mapping, got {type(value).__name__} {value!r}")
    if typ is list or origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
    if origin is typing.Union and value is not None:  # Optional[X]
        return _check_type(key, value, typing.get_args(typ)[0])
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, full + ".")
        else:
            kwargs[key] = _check_type(full, value, typ)
    obj = cls(**kwargs)
    for key, allowed in _CHOICES.items():
        sect, _, attr = key.rpartition(".")
        if prefix == (sect + "." if sect else "") and getattr(obj, attr) not in allowed:
            raise UserError(f"config key '{key}' must be one of {allowed}, got {getattr(obj, attr)!r}")
    return obj


def _validate(cfg: Config) -> Config:
    q = cfg.quant
    for key, bits in (("quant.weight_bits", q.weight_bits), ("quant.act_bits", q.act_bits)):
        if not 2 <= bits <= 8:
            raise UserError(f"config key '{key}' must be between 2 and 8, got {bits}")
    parse_arch(cfg.model.arch)
    for key, bits in (("quant.first_last_bits", q.first_last_bits), ("quant.add_bits", q.add_bits)):
        if bits and not 2 <= bits <= 8:
            raise UserError(f"config key '{key}' must be 0 (off) or 2-8, got {bits}")
    for name, pair in q.layer_bits.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(b) is int and 2 <= b <= 8 for b in pair)):
            raise UserError(f"config key 'quant.layer_bits.{name}' must be [weight_bits, act_bits] with "
                            f"widths 2-8, got {pair!r}")
    if q.scheme == "onednn" and (q.weight_bits != 8 or q.act_bits != 8 or q.per_channel is False
                                 or q.first_last_bits not in (0, 8) or q.add_bits not in (0, 8) or q.layer_bits):
        raise UserError("config key 'quant.scheme' onednn is oneDNN's 8-bit arithmetic: it needs "
                        "quant.per_channel: true and 8-bit weights and activations everywhere")
    if q.range == "lsq" and q.scheme == "onednn":
        raise UserError("config key 'quant.range' lsq learns step sizes on the original scheme's grids: "
                        "use quant.scheme original")
    if cfg.qat.calib == "lsq" and q.range != "lsq":
        raise UserError("config key 'qat.calib' lsq is LSQ's initialization of learned step sizes: it needs "
                        "quant.range lsq (train_qat.py --range lsq)")
    if cfg.qat.distill < 0 or not 0.0 <= cfg.qat.distill_weight <= 1.0:
        raise UserError("config keys 'qat.distill' (a temperature, 0 = off) must be >= 0 and "
                        "'qat.distill_weight' in [0, 1]")
    if cfg.qat.wd is not None and cfg.qat.wd < 0:
        raise UserError(f"config key 'qat.wd' must be >= 0 (or null: optim.wd), got {cfg.qat.wd}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise UserError(f"config key 'optim.label_smoothing' must be in [0, 1), got {cfg.optim.label_smoothing}")
    if not 0.0 <= cfg.optim.average_decay < 1.0:
        raise UserError(f"config key 'optim.average_decay' must be in [0, 1) (0 = no weight averaging), "
                        f"got {cfg.optim.average_decay}")
    if cfg.optim.average_bn_batches < 0:
        raise UserError(f"config key 'optim.average_bn_batches' must be >= 0, got {cfg.optim.average_bn_batches}")
    if not 0.0 <= q.momentum < 1.0:
        raise UserError(f"config key 'quant.momentum' must be in [0, 1), got {q.momentum}")
    drop = cfg.model.conv_dropout
    if drop and cfg.model.arch not in VGG_ARCHS:
        raise UserError(f"config key 'model.conv_dropout' is for VGG models; set it to [] for {cfg.model.arch}")
    if drop and not (len(drop) == 5 and all(isinstance(p, (int, float)) and 0.0 <= p < 1.0 for p in drop)):
        raise UserError(f"config key 'model.conv_dropout' must be [] or 5 probabilities in [0, 1), one per VGG "
                        f"stage, got {drop!r}")
    if cfg.model.width <= 0:
        raise UserError(f"config key 'model.width' must be positive, got {cfg.model.width}")
    if cfg.data.batch_size < 1 or cfg.optim.epochs < 0:
        raise UserError("config keys 'data.batch_size' and 'optim.epochs' must be positive")
    return cfg


RECIPE_KEYS = ("epochs", "lr", "calib", "calib_batches", "delay_steps", "freeze_ranges_step", "bn_freeze_step")


def _migrate(raw: dict) -> dict:
    """Run folders written before the ``qat:`` section existed kept the recipe under ``quant:``
    (and a ``quant.enabled`` switch, now block state): move those keys where they live now."""
    quant = raw.get("quant")
    if not isinstance(quant, dict) or not any(k in quant for k in RECIPE_KEYS + ("enabled",)):
        return raw
    quant = dict(quant)
    qat = dict(raw.get("qat") or {})
    for key in RECIPE_KEYS:
        if key in quant:
            qat.setdefault(key, quant.pop(key))
    quant.pop("enabled", None)
    return {**raw, "quant": quant, "qat": qat}


def from_dict(raw: dict) -> Config:
    return _validate(_build(Config, _migrate(raw or {}), ""))


def load_config(path: str | Path, overrides: Optional[dict] = None) -> Config:
    """Read YAML at ``path``, apply dotted ``overrides`` (e.g. ``{"optim.lr": 0.1}``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass --config configs/<name>.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(raw)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
