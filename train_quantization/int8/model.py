"""The int8 model: a graph of typed ops with integer tensors, and its artifact file.

An ``Int8Model`` is what the engines run and what ``save``/``load`` write and read: a JSON header
(format version, ops, input normalization, class names) plus numpy arrays. One small dataclass
per op; each engine (``engine.py``: simulated and integer-only, ``onnx_export.py``, the oneDNN
range table) keeps one handler per op type, so a new op is one dataclass here plus one handler
per engine. Every op names its ``inputs`` (indices of earlier ops, -1 for the network input), so
the list is a graph in forward order.

* ``Conv`` / ``Dense``: a quantized layer (a ``Conv`` may be grouped or depthwise; a ReLU6 runs
  as its ``relu``, the clamp at 6 being the reader's saturation, see ``conversion._read``). Its
  input is read on ``act`` (``InGrid``: scale ``s_a``, codes in ``[qmin, qmax]``, width); ``w``:
  int8 weight codes (narrow symmetric, any width 2-8 in an int8 container), ``w_scale``: float64
  per output channel (per-tensor scales repeated), ``b``: int32 bias ``round(b_f / (s_w * s_a))``
  (half to even), ``b_float``: the float32 folded bias (reference).
* ``Add``: a residual add of two inputs on ``act`` (``layers.QAdd``; ``shortcut_only``: the
  onednn scheme's add, the first input joins unrequantized).
* ``Concat`` (codes of one grid), ``Slice`` and ``Shuffle`` (channels): ShuffleNetV2's units.
* ``MaxPool``, ``Flatten``, ``AvgPool`` (global; with ``act`` it pools its input's codes,
  ``layers.QAvgPool``), ``Affine`` (a BatchNorm no convolution precedes, per channel, optional ReLU),
  ``DenseFloat`` (a layer left in float: ``w``, ``b`` float32).

Dropout is the identity at inference and is not stored. Requantization between layers is
derived, not stored: a consumer with input scale ``s_a`` reading integer data at scale ``s``
(``s_w * s_a'`` per channel after a conv, the add's scale after an add) multiplies by
``M = s / s_a ~= m0 * 2**(shift - 31)`` (``quantize_multiplier``). The file is a ``.npz`` (no
pickle) and needs only numpy to read; files of format versions 1-3 load too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from ..errors import UserError

FORMAT = "train-quantization-int8"
VERSION = 4
READS = (1, 2, 3, 4)  # 1: a sequential list (stored multipliers ignored); 3: onednn-scheme adds and pooling


@dataclass(frozen=True)
class InGrid:
    """How an op reads its input: codes ``clip(round(x / scale), qmin, qmax)`` of ``bits`` bits."""

    scale: float
    qmin: int
    qmax: int
    bits: int = 8


@dataclass
class _Weighted:
    """The fields of a quantized layer (``Conv``, ``Dense``)."""

    name: str
    inputs: list
    act: InGrid
    w: np.ndarray  # int8 codes, (O, C / groups, k, k) or (O, I)
    w_scale: np.ndarray  # float64 (O,)
    b: np.ndarray  # int32 (O,)
    b_float: np.ndarray  # float32 (O,)
    relu: bool = False
    weight_bits: int = 8
    per_channel: bool = False
    # products of input channels 2k and 2k+1 summed in int16, saturating, before the int32 sum: what
    # oneDNN's u8 x s8 kernels without VNNI compute (onednn.kernel_model); never set in an artifact
    s16_pairs: Optional[bool] = None


@dataclass
class Conv(_Weighted):
    type: ClassVar[str] = "conv"
    kernel: int = 3
    pad: int = 1
    stride: int = 1
    groups: int = 1  # grouped convolution; groups == channels: depthwise


@dataclass
class Dense(_Weighted):
    type: ClassVar[str] = "dense"


@dataclass
class Add:
    type: ClassVar[str] = "add"
    name: str
    inputs: list  # [body, shortcut]
    act: InGrid
    relu: bool = True
    shortcut_only: bool = False


@dataclass
class MaxPool:
    type: ClassVar[str] = "maxpool"
    name: str
    inputs: list
    size: int = 2
    stride: int = 2
    ceil: bool = False


@dataclass
class AvgPool:
    type: ClassVar[str] = "avgpool"
    name: str
    inputs: list
    act: Optional[InGrid] = None


@dataclass
class Flatten:
    type: ClassVar[str] = "flatten"
    name: str
    inputs: list


@dataclass
class Concat:
    """Channel concatenation of its inputs' codes on one grid ``act`` (``layers.QConcat``)."""

    type: ClassVar[str] = "concat"
    name: str
    inputs: list
    act: InGrid


@dataclass
class Slice:
    """Channels ``[begin, end)`` of its input (codes or float, unchanged)."""

    type: ClassVar[str] = "slice"
    name: str
    inputs: list
    begin: int = 0
    end: int = 0


@dataclass
class Shuffle:
    """A channel shuffle of ``groups`` groups over ``channels``: output channel ``j`` is input channel
    ``quant.shuffle_permutation(channels, groups)[j]`` (codes move; a per-channel scale moves with them)."""

    type: ClassVar[str] = "shuffle"
    name: str
    inputs: list
    channels: int = 0
    groups: int = 2


@dataclass
class Affine:
    """A BatchNorm that no convolution precedes it into (a pre-activation block's first BN, a network's
    input or final BN): ``y = x * scale + shift`` per channel (then ReLU), in float64."""

    type: ClassVar[str] = "affine"
    name: str
    inputs: list
    scale: np.ndarray  # float64 (C,): gamma / sqrt(var + eps)
    shift: np.ndarray  # float64 (C,): beta - mean * scale
    relu: bool = False


@dataclass
class DenseFloat:
    type: ClassVar[str] = "dense_float"
    name: str
    inputs: list
    w: np.ndarray  # float32 (O, I)
    b: np.ndarray
    relu: bool = False


OPS = {cls.type: cls for cls in (Conv, Dense, Add, MaxPool, AvgPool, Flatten, Concat, Slice, Shuffle, Affine,
                                 DenseFloat)}
QUANTIZED = (Conv, Dense)
_GRID_KEYS = ("in_scale", "in_qmin", "in_qmax", "act_bits")  # InGrid in the file, flat as in format 1-3


def op_to_dict(op: Any) -> tuple:
    """``(JSON attributes, arrays)`` of an op, as the artifact stores it."""
    meta, arrays = {"type": op.type}, {}
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        elif isinstance(v, InGrid):
            meta.update(zip(_GRID_KEYS, (v.scale, v.qmin, v.qmax, v.bits)))
        elif v is not None:
            meta[f.name] = v
    return meta, arrays


def op_from_dict(meta: dict, arrays: dict, index: int) -> Any:
    """An op from its stored attributes (any format version) and arrays."""
    cls = OPS.get(meta["type"])
    if cls is None:
        raise UserError(f"the int8 artifact holds an op of type {meta['type']!r} that this version cannot run")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in meta.items() if k in names}
    kw.update({k: v for k, v in arrays.items() if k in names})
    kw.setdefault("inputs", [index - 1])  # format 1: a sequential list
    if "in_scale" in meta and "act" in names:
        kw["act"] = InGrid(float(meta["in_scale"]), int(meta["in_qmin"]), int(meta["in_qmax"]),
                           int(meta.get("act_bits", 8)))
    return cls(**kw)


@dataclass
class Int8Model:
    layers: list  # ops in forward order
    input_mean: tuple = (0.0, 0.0, 0.0)
    input_std: tuple = (1.0, 1.0, 1.0)
    input_shape: tuple = (3, 32, 32)  # C, H, W
    classes: list = field(default_factory=list)
    scheme: str = "original"

    def quantized(self) -> list:
        return [op for op in self.layers if isinstance(op, QUANTIZED)]

    def inputs(self) -> list:
        """Each op's input indices (-1: the network input)."""
        return [op.inputs for op in self.layers]

    def nonneg(self) -> dict:
        """Op index (and -1, the network input) -> whether its output is a ReLU output (max and
        average pooling and flatten keep that)."""
        out = {-1: False}
        for i, op in enumerate(self.layers):
            out[i] = bool(getattr(op, "relu", False)) or (isinstance(op, (MaxPool, Flatten, AvgPool, Slice, Shuffle,
                                                                          Concat)) and all(out[j] for j in op.inputs))
        return out

    def readers(self) -> dict:
        """Op index (or -1) -> the indices of the ops that read its output, in order."""
        out: dict = {}
        for i, op in enumerate(self.layers):
            for j in op.inputs:
                out.setdefault(j, []).append(i)
        return out

    # the engines, as methods (numpy only, no MXNet)
    def simulate(self, x: np.ndarray, record: Optional[dict] = None) -> np.ndarray:
        """Float-simulated integer inference on normalized float32 NCHW ``x``; logits."""
        from .engine import simulate

        return simulate(self, x, record)

    def run_integer(self, x: np.ndarray, record: Optional[dict] = None) -> np.ndarray:
        """Integer-only inference on normalized float32 NCHW ``x``; logits (float64)."""
        from .engine import run_integer

        return run_integer(self, x, record)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> the normalized float32 NCHW input the engines take."""
        from .engine import normalize

        return normalize(self, images)

    def predict(self, images: np.ndarray, engine: str = "sim") -> np.ndarray:
        """Logits for uint8 NHWC images (``sim``, ``integer`` or ``onnx``), normalized as in training."""
        from .engine import predict

        return predict(self, images, engine)

    def to_onnx(self, path: Optional[str | Path] = None, target: str = "auto") -> Any:
        """The QDQ ONNX model for ONNX Runtime's int8 kernels (``onnx_export``); written to ``path`` if given."""
        from . import onnx_export

        return onnx_export.save_qdq(self, path, target) if path else onnx_export.build_qdq(self, target)

    def save(self, path: str | Path) -> Path:
        return save(self, path)

    @staticmethod
    def load(path: str | Path) -> "Int8Model":
        return load(path)


def quantize_multiplier(m: np.ndarray) -> tuple:
    """Real multipliers ``m > 0`` -> (int32 ``m0``, int32 ``shift``), ``m ~= m0 * 2**(shift - 31)``.

    ``m0`` lies in [2**30, 2**31), so the relative error is at most 2**-31.

    >>> m0, sh = quantize_multiplier(np.array([0.75, 1.0, 3e-4]))
    >>> (m0[0], sh[0], m0[1], sh[1])
    (1610612736, 0, 1073741824, 1)
    """
    m = np.asarray(m, dtype=np.float64)
    if np.any(m <= 0) or not np.all(np.isfinite(m)):
        raise ValueError("requantization multipliers must be positive and finite")
    frac, exp = np.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    m0 = np.rint(frac * 2.0**31).astype(np.int64)
    carry = m0 == 2**31
    m0 = np.where(carry, m0 // 2, m0)
    exp = exp + carry
    return m0.astype(np.int32), exp.astype(np.int32)


def rounding_shift(p: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``round(p / 2**k)`` for int64 ``|p| < 2**62`` and ``1 <= k <= 62``, ties to even (the project
    convention): ``(p + 2**(k-1) - 1 + floor(p / 2**k) mod 2) >> k`` rounds a remainder above half up and
    a tie up only from an odd quotient.

    >>> rounding_shift(np.array([5, 6, 7, -5, -6, -7, 10]), np.array(2)).tolist()
    [1, 2, 2, -1, -2, -2, 2]
    """
    p = np.asarray(p, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    out = p >> k
    out &= 1
    out += (np.int64(1) << (k - 1)) - 1
    out += p
    out >>= k
    return out


def requantize(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, qmin: int, qmax: int,
               channel_axis: int = 1) -> np.ndarray:
    """int32 accumulators -> codes: ``clip(round(acc * m0 / 2**(31 - shift)), qmin, qmax)``.

    ``acc * m0`` stays below 2**62; where the multiplier is below 2**-32 (``k > 62``) every product rounds
    to 0, and where it is 1 or more (``k < 1``) nothing rounds (the product saturates, or is exact).

    >>> m0, sh = quantize_multiplier(np.array([2.0**-40, 4.0]))
    >>> requantize(np.array([[1000, 3]]), m0, sh, -128, 127).tolist()
    [[0, 12]]
    """
    shape = [1] * np.ndim(acc)
    shape[channel_axis] = -1
    m0 = np.asarray(m0, np.int64).reshape(shape)
    k = (31 - np.asarray(shift, np.int64)).reshape(shape)
    acc = np.asarray(acc, np.int64)
    if acc.size and max(acc.max(), -acc.min()) >= 2**31:
        raise ValueError("requantize: accumulators must stay below 2**31 (their product with m0 below 2**62)")
    out = rounding_shift(acc * m0, np.clip(k, 1, 62))
    if np.any(k > 62):
        out = np.where(k > 62, 0, out)
    if np.any(k < 1):  # multipliers of 1 and more: exact products, saturated
        exact = np.clip(acc * (m0 * 2.0 ** (1 - np.minimum(k, 1))) / 2, qmin, qmax).astype(np.int64)
        out = np.where(k < 1, exact, out)
    return np.clip(out, qmin, qmax, out=out)


# ----------------------------------------------------------------------------- artifact
def save(model: Int8Model, path: str | Path) -> Path:
    """Write one self-describing ``.npz`` (atomically: temporary file, then rename)."""
    path = Path(path)
    arrays, layers = {}, []
    for i, op in enumerate(model.layers):
        meta, arrs = op_to_dict(op)
        meta["arrays"] = {key: f"l{i}_{key}" for key in arrs}
        arrays.update({f"l{i}_{key}": np.asarray(a) for key, a in arrs.items()})
        layers.append(meta)
    header = {"format": FORMAT, "version": VERSION, "scheme": model.scheme, "layers": layers,
              "input": {"mean": list(model.input_mean), "std": list(model.input_std),
                        "shape": list(model.input_shape), "layout": "NCHW"},
              "classes": list(model.classes)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> Int8Model:
    """Read an artifact written by ``save``; a foreign, truncated or newer file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"int8 artifact not found: {path}; export one with sim_int8_infer.py --export")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise UserError(f"{path} is not an int8 artifact of this project (no header)")
            header = json.loads(bytes(z["header"]).decode())
            data = {k: z[k] for k in z.files if k != "header"}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise UserError(f"{path} is truncated or not an int8 artifact ({type(exc).__name__}); "
                        "export it again") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path} is not an int8 artifact of this project (format {header.get('format')!r})")
    if header.get("version") not in READS:
        raise UserError(f"{path} has format version {header.get('version')}, this code reads version {VERSION}; "
                        "export it again with this version")
    layers = [op_from_dict(meta, {key: data[name] for key, name in meta["arrays"].items()}, i)
              for i, meta in enumerate(header["layers"])]
    inp = header["input"]
    return Int8Model(layers, tuple(inp["mean"]), tuple(inp["std"]), tuple(inp["shape"]), header["classes"],
                     header.get("scheme", "original"))


def artifact_size(path: str | Path) -> int:
    return Path(path).stat().st_size
