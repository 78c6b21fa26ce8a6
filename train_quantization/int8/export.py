"""Turn a trained QAT network into an ``Int8Model`` (integer weights, biases, the op graph).

Weight codes and scales are computed with the very MXNet functions the training graph
uses (``quant.fold_bn``, ``quant.weight_scales`` on ``mx.nd``), so the codes are the ones
fake quantization produced, bit for bit. Then, per quantized layer::

    b_q = round(b_f / (s_w * s_a))                      int32 (|b_q| <= 2**22), half to even

The network is walked in forward order; each block type has one handler (``EXPORT``) that appends
its ops, naming their inputs: a ResNet v1 block becomes its body's ops, its downsample's ops and
an ``Add`` reading both.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from mxnet import gluon, nd
from mxnet.gluon import nn

from .. import quant
from ..conversion import RELU6, SEQUENTIAL_CUSTOM
from ..errors import UserError
from ..layers import (
    BN_EPS,
    QAvgPool,
    QConv2D,
    QConv2DBN,
    QDense,
    QPreActResidual,
    QResidual,
    QShuffleUnit,
    input_grid,
    quantized_layers,
)
from .model import (
    Add,
    Affine,
    AvgPool,
    Concat,
    Conv,
    Dense,
    DenseFloat,
    Flatten,
    InGrid,
    Int8Model,
    MaxPool,
    Shuffle,
    Slice,
)


def _act_scale(block: gluon.Block) -> nd.NDArray:
    """``s_a`` of a block's input, shape (1,), float32 as in the training graph (unset EMA range: 1)."""
    amax = block.input_max.data()
    if block.spec.range != "lsq":
        amax = nd.where(amax > 0, amax, nd.ones_like(amax))
    return amax / input_grid(block)[2]


def _grid(block: gluon.Block, s_a: Optional[nd.NDArray] = None) -> InGrid:
    """A block's input grid: ``s_a`` and the code range of its width, scheme and sign."""
    lo, hi, _ = input_grid(block)
    s_a = _act_scale(block) if s_a is None else s_a
    return InGrid(float(s_a.asscalar()), lo, hi, block.spec.act_bits)


def folded(block: gluon.Block) -> tuple:
    """``(w_f, b_f, s_w, multiplier)`` of a quantized layer as its training graph computes them (``mx.nd``):
    BatchNorm folded into the weights and bias, the weight scale (the learned step, or from ``max|w|``) and the
    float32 number the scheme multiplies the weights by before rounding (None: it divides by ``s_w``)."""
    q = block.spec
    w = block.weight.data()
    conv = isinstance(block, (QConv2DBN, QConv2D))
    if isinstance(block, QConv2DBN):
        w_f, b_f = quant.fold_bn(nd, w, None, block.gamma.data(), block.beta.data(),
                                 block.running_mean.data(), block.running_var.data(), BN_EPS,
                                 inv_in_float64=q.mxnet_arithmetic)
    else:  # QDense, QConv2D: no BatchNorm, a bias or none
        w_f, b_f = w, block.bias.data() if getattr(block, "bias", None) is not None else nd.zeros(w.shape[0])
    ndim = 4 if conv else 2
    if q.range == "lsq":  # the learned step
        return w_f, b_f, block.weight_step.data().reshape((-1,) + (1,) * (ndim - 1)), None
    _, _, w_div = quant.weight_grid(q.weight_bits, q.scheme)
    return (w_f, b_f) + quant.weight_scales(nd, w_f, w_div, q.per_channel, ndim, q.mxnet_arithmetic)


def _quantized(block: gluon.Block, name: str, inputs: list) -> Conv | Dense:
    q = block.spec
    qmin, qmax, _ = quant.weight_grid(q.weight_bits, q.scheme)
    w = block.weight.data()
    conv = isinstance(block, (QConv2DBN, QConv2D))
    w_f, b_f, s_w, mult = folded(block)
    codes = quant.weight_codes(nd, w_f, s_w, mult, qmin, qmax)
    s_a = _act_scale(block)
    s_b = nd.broadcast_mul(s_w.reshape((-1,)), s_a)
    b_q = nd.clip(quant.round_half_even(nd, nd.broadcast_div(b_f, s_b)), -quant.BIAS_QMAX, quant.BIAS_QMAX)
    n_out = w.shape[0]
    # a learned step can cross zero in training: on the symmetric weight grid s * c = |s| * (-c) and
    # b = s * s_a * c_b = |s| * s_a * (-c_b) exactly, so such a channel is stored with |s| and negated codes
    s_w = np.broadcast_to(s_w.asnumpy().reshape(-1), (n_out,)).astype(np.float64)
    sign = np.where(s_w < 0, -1, 1)
    common = dict(name=name, inputs=inputs, act=_grid(block, s_a), relu=bool(block.relu),
                  w=(codes.asnumpy() * sign.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int8),
                  w_scale=np.abs(s_w),
                  b=(np.broadcast_to(b_q.asnumpy(), (n_out,)) * sign).astype(np.int32),
                  b_float=b_f.asnumpy().astype(np.float32),
                  weight_bits=q.weight_bits, per_channel=bool(q.per_channel))
    if conv:
        return Conv(kernel=block.kernel, pad=block.padding, stride=block.stride, groups=block.groups, **common)
    return Dense(**common)


class _Graph:
    """The ops appended so far; ``emit`` returns the index of the op it appended."""

    def __init__(self) -> None:
        self.ops: list = []
        self.relu6: list = []  # ops whose ReLU6 became a ReLU: every reader must saturate at 6

    def emit(self, op: Any) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def walk(self, block: gluon.Block, src: int, path: str) -> int:
        """Append ``block``'s ops (reading op ``src``; -1: the network input) in forward order;
        returns the index of the op that holds its output."""
        for types, handler in EXPORT:
            if isinstance(block, tuple(t for t in types if isinstance(t, type))) or type(block).__name__ in types:
                return handler(self, block, src, path)
        raise UserError(f"the int8 engines cannot run {path or 'the model'}, a {type(block).__name__}: they run "
                        "sequential containers, our quantized layers, pooling, Dense, BatchNorm and residual blocks. "
                        "Evaluate it as fake-quant (train_qat.py) instead")


def _relu(g: _Graph, block: gluon.Block, src: int, path: str) -> int:
    """A ReLU folds into the quantized layer before it (its only consumer). So does a ReLU6, whose clamp
    at 6 is the saturation of its readers' fixed range (``conversion._read``; checked in ``export``)."""
    prev = g.ops[src] if src == len(g.ops) - 1 and src >= 0 else None
    relu6 = type(block).__name__ == RELU6
    if not relu6 and block._act_type != "relu":
        raise UserError(f"{path}: the int8 engines cannot run a {block._act_type} activation")
    if not isinstance(prev, (Conv, Dense, Add, Affine)):
        raise UserError(f"{path}: a ReLU that does not directly follow a quantized layer cannot be exported")
    prev.relu = True
    if relu6:
        g.relu6.append(src)
    return src


def _residual(g: _Graph, block: QResidual, src: int, path: str) -> int:
    body = g.walk(block.body, src, f"{path}.{block.body_name}")
    short = src if block.downsample is None else g.walk(block.downsample, src, f"{path}.downsample")
    add = block.add
    return g.emit(Add(f"{path}.add", [body, short], _grid(add), relu=bool(add.relu),
                      shortcut_only=add.spec.scheme == "onednn"))


def _sequence(g: _Graph, block: gluon.Block, src: int, path: str) -> int:
    for name, child in block._children.items():
        src = g.walk(child, src, f"{path}.{name}" if path else name)
    return src


def _maxpool(g: _Graph, block: nn.MaxPool2D, src: int, path: str) -> int:
    kw = block._kwargs
    return g.emit(MaxPool(path, [src], int(kw["kernel"][0]), int(kw["stride"][0]), kw["pooling_convention"] == "full"))


def _batchnorm(g: _Graph, block: nn.BatchNorm, src: int, path: str) -> int:
    """A BatchNorm with its running statistics, as the per-channel affine it computes at inference."""
    kw = block._kwargs
    var, mean = block.running_var.data().asnumpy().astype(np.float64), block.running_mean.data().asnumpy()
    gamma = np.ones_like(var) if kw.get("fix_gamma") else block.gamma.data().asnumpy().astype(np.float64)
    scale = gamma / np.sqrt(var + kw.get("eps", 1e-5))
    return g.emit(Affine(path, [src], scale, block.beta.data().asnumpy().astype(np.float64) - mean * scale))


def _preact(g: _Graph, block: QPreActResidual, src: int, path: str) -> int:
    h = g.walk(block.bn1, src, f"{path}.bn1")
    g.ops[h].relu = True
    h = g.walk(block.conv2, g.walk(block.conv1, h, f"{path}.conv1"), f"{path}.conv2")
    short = src if block.downsample is None else g.walk(block.downsample, src, f"{path}.downsample")
    return g.emit(Add(f"{path}.add", [h, short], _grid(block.add), relu=False))


def _shuffle_unit(g: _Graph, block: QShuffleUnit, src: int, path: str) -> int:
    if block.split:
        half = block.in_channels // 2
        b1 = g.emit(Slice(f"{path}.split0", [src], 0, half))
        b2 = g.walk(block.branch2_conv, g.emit(Slice(f"{path}.split1", [src], half, block.in_channels)),
                    f"{path}.branch2_conv")
    else:
        b1 = g.walk(block.branch1_conv, src, f"{path}.branch1_conv")
        b2 = g.walk(block.branch2_conv, src, f"{path}.branch2_conv")
    c = g.emit(Concat(f"{path}.concat", [b1, b2], _grid(block.concat)))
    return g.emit(Shuffle(f"{path}.shuffle", [c], block.channels, 2))


def _dense_float(g: _Graph, block: nn.Dense, src: int, path: str) -> int:
    act = block.act._act_type if block.act is not None else None
    return g.emit(DenseFloat(path, [src], block.weight.data().asnumpy(), block.bias.data().asnumpy(),
                             relu=act == "relu"))


Handler = Callable[[_Graph, Any, int, str], int]
EXPORT: list[tuple[tuple, Handler]] = [  # (block types or class names, handler), first match wins
    ((QConv2DBN, QConv2D, QDense), lambda g, b, src, path: g.emit(_quantized(b, path, [src]))),
    ((nn.Dropout,), lambda g, b, src, path: src),  # the identity at inference
    ((nn.MaxPool2D,), _maxpool),
    ((QAvgPool,), lambda g, b, src, path: g.emit(AvgPool(path, [src], _grid(b)))),
    ((nn.GlobalAvgPool2D,), lambda g, b, src, path: g.emit(AvgPool(path, [src]))),
    ((nn.Flatten,), lambda g, b, src, path: g.emit(Flatten(path, [src]))),
    ((nn.Dense,), _dense_float),
    ((nn.Activation, RELU6), _relu),
    ((nn.BatchNorm,), _batchnorm),
    ((QResidual,), _residual),
    ((QPreActResidual,), _preact),
    ((QShuffleUnit,), _shuffle_unit),
    ((nn.HybridSequential, nn.Sequential) + SEQUENTIAL_CUSTOM, _sequence),
]


def export(net: gluon.Block, mean: tuple, std: tuple, input_shape: tuple, classes: list) -> Int8Model:
    """QAT network (VGG, a converted ResNet v1, any nested HybridSequential of our blocks) -> ``Int8Model``."""
    g = _Graph()
    if g.walk(net, -1, "") != len(g.ops) - 1:
        raise UserError("the model's output is not its last layer; it cannot be exported")
    readers = Int8Model(g.ops).readers()
    for i in g.relu6:
        for r in readers.get(i, []):
            act = getattr(g.ops[r], "act", None)
            if act is None or abs(act.scale * act.qmax - 6.0) > 1e-5:
                raise UserError(f"{g.ops[i].name}: its ReLU6 output is read by {g.ops[r].name}, which does not "
                                "saturate at 6; the int8 engines cannot run it (convert() fixes the range of every "
                                "quantized reader of a ReLU6)")
    schemes = {b.spec.scheme for _, b in quantized_layers(net)}
    return Int8Model(g.ops, tuple(mean), tuple(std), tuple(input_shape), list(classes),
                     scheme=schemes.pop() if len(schemes) == 1 else "mixed")
