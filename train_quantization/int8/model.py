"""The int8 model: an ordered layer list with integer tensors, and its artifact file.

An ``Int8Model`` is what the engines run and what ``save``/``load`` write and read: a JSON
header (format version, layers, input normalization, class names) plus numpy arrays.
Each quantized layer (``conv`` or ``dense``) holds

* ``w``: int8 weight codes (narrow symmetric, any width 2-8 in an int8 container),
* ``w_scale``: float64 per output channel (per-tensor scales are repeated),
* ``in_scale``: the input activation scale ``s_a`` (float64), input codes in
  ``[in_qmin, in_qmax]``,
* ``b``: int32 bias ``round(b_f / (s_w * s_a))`` (half to even),
* ``b_float``: the float32 folded bias (for reference and the float-simulation engine).

Other layers: ``add`` (a residual add: ``in_scale``, ``in_qmin``/``in_qmax``, ``relu``; see
``layers.QAdd``; ``shortcut_only``: the onednn scheme's add), ``maxpool`` (size, stride, ceil),
``avgpool`` (global; with ``in_scale``/``in_qmin``/``in_qmax`` it pools its input's codes,
``layers.QAvgPool``), ``flatten``,
``dense_float`` (a layer left in float: ``w``, ``b`` float32). Dropout is the identity at
inference and is not stored. Every layer names its ``inputs`` (indices of earlier layers,
-1 for the network input; absent: the previous layer), so the list is a graph in forward order.

Requantization between layers is derived, not stored: a consumer with input scale ``s_a``
reading integer data at scale ``s`` (``s_w * s_a'`` per channel after a conv, the add's scale
after an add) multiplies by ``M = s / s_a ~= m0 * 2**(shift - 31)`` (``quantize_multiplier``).
The file is a ``.npz`` (no pickle) and needs only numpy to read.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

FORMAT = "train-quantization-int8"
VERSION = 3
READS = (1, 2, 3)  # 1: a sequential list with stored multipliers (ignored now); 3: onednn-scheme adds and pooling


@dataclass
class Int8Model:
    layers: list  # dicts: {"type": ..., "name": ..., attributes..., arrays under "arrays"}
    input_mean: tuple = (0.0, 0.0, 0.0)
    input_std: tuple = (1.0, 1.0, 1.0)
    input_shape: tuple = (3, 32, 32)  # C, H, W
    classes: list = field(default_factory=list)
    scheme: str = "original"

    def quantized(self) -> list:
        return [layer for layer in self.layers if layer["type"] in ("conv", "dense")]

    def inputs(self) -> list:
        """Each layer's input indices (-1: the network input; absent in a file: the previous layer)."""
        return [layer.get("inputs", [i - 1]) for i, layer in enumerate(self.layers)]

    def nonneg(self) -> dict:
        """Layer index (and -1, the network input) -> whether its output is a ReLU output (max and
        average pooling and flatten keep that)."""
        out = {-1: False}
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs())):
            out[i] = bool(layer.get("relu")) or (layer["type"] in ("maxpool", "flatten", "avgpool") and out[ins[0]])
        return out

    def readers(self) -> dict:
        """Layer index (or -1) -> the indices of the layers that read its output, in order."""
        out: dict = {}
        for i, ins in enumerate(self.inputs()):
            for j in ins:
                out.setdefault(j, []).append(i)
        return out


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
    """``round(p / 2**k)`` for int64 ``p`` and ``k >= 1``, ties to even (the project convention).

    >>> rounding_shift(np.array([5, 6, 7, -5, -6, -7, 10]), np.array(2)).tolist()
    [1, 2, 2, -1, -2, -2, 2]
    """
    p = np.asarray(p, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    q = p >> k  # floor
    rem = p - (q << k)
    half = np.int64(1) << (k - 1)
    up = (rem > half) | ((rem == half) & (q & 1 == 1))
    return q + up


def requantize(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, qmin: int, qmax: int,
               channel_axis: int = 1) -> np.ndarray:
    """int32 accumulators -> codes: ``clip(round(acc * m0 / 2**(31 - shift)), qmin, qmax)``."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    m0 = np.asarray(m0, np.int64).reshape(shape)
    k = (31 - np.asarray(shift, np.int64)).reshape(shape)
    if np.any(k < 1) or np.any(k > 62):
        raise ValueError("requantization shift out of range")
    return np.clip(rounding_shift(acc.astype(np.int64) * m0, k), qmin, qmax)


# ----------------------------------------------------------------------------- artifact
def save(model: Int8Model, path: str | Path) -> Path:
    """Write one self-describing ``.npz`` (atomically: temporary file, then rename)."""
    path = Path(path)
    arrays, layers = {}, []
    for i, layer in enumerate(model.layers):
        meta = {k: v for k, v in layer.items() if k != "arrays"}
        names = {}
        for key, arr in layer.get("arrays", {}).items():
            names[key] = f"l{i}_{key}"
            arrays[names[key]] = np.asarray(arr)
        meta["arrays"] = names
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
    layers = []
    for meta in header["layers"]:
        layer = {k: v for k, v in meta.items() if k != "arrays"}
        layer["arrays"] = {key: data[name] for key, name in meta["arrays"].items()}
        layers.append(layer)
    inp = header["input"]
    return Int8Model(layers, tuple(inp["mean"]), tuple(inp["std"]), tuple(inp["shape"]), header["classes"],
                     header.get("scheme", "original"))


def artifact_size(path: str | Path) -> int:
    return Path(path).stat().st_size
