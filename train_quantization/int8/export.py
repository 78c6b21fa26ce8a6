"""Turn a trained QAT network into an ``Int8Model`` (integer weights, biases, multipliers).

Weight codes and scales are computed with the very MXNet functions the training graph
uses (``quant.fold_bn``, ``quant.weight_scale`` on ``mx.nd``), so the codes are the ones
fake quantization produced, bit for bit. Then, per quantized layer::

    b_q = round(b_f / (s_w * s_a))                      int32 (|b_q| <= 2**22), half to even

The layers form a graph (each names its ``inputs``): a ResNet v1 block becomes its body's
layers, its downsample's layers and an ``add`` layer reading both.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from mxnet import gluon, nd
from mxnet.gluon import nn

from .. import quant
from ..convert import SEQUENTIAL_CUSTOM
from ..errors import UserError
from ..layers import BN_EPS, QAvgPool, QConv2DBN, QDense, QResidual, quantized_layers
from .model import Int8Model


def _graph(block: gluon.Block, src: int, layers: list, path: str = "") -> int:
    """Append ``block``'s layers (reading layer ``src``; -1: the network input) to ``layers`` in
    forward order, each with ``inputs``; returns the index of the layer that holds its output."""
    def emit(layer: dict, inputs: list, name: str = path) -> int:
        layers.append({**layer, "name": name, "inputs": inputs})
        return len(layers) - 1

    if isinstance(block, (QConv2DBN, QDense)):
        return emit(_qlayer(block, path), [src])
    if isinstance(block, nn.Dropout):  # the identity at inference
        return src
    if isinstance(block, nn.MaxPool2D):
        kw = block._kwargs
        return emit({"type": "maxpool", "size": int(kw["kernel"][0]), "stride": int(kw["stride"][0]),
                     "ceil": kw["pooling_convention"] == "full"}, [src])
    if isinstance(block, QAvgPool):
        return emit({"type": "avgpool", **_act_fields(block)}, [src])
    if isinstance(block, nn.GlobalAvgPool2D):
        return emit({"type": "avgpool"}, [src])
    if isinstance(block, nn.Flatten):
        return emit({"type": "flatten"}, [src])
    if isinstance(block, nn.Dense):
        act = block.act._act_type if block.act is not None else None
        return emit({"type": "dense_float", "relu": act == "relu",
                     "arrays": {"w": block.weight.data().asnumpy(), "b": block.bias.data().asnumpy()}}, [src])
    if isinstance(block, nn.Activation) and block._act_type == "relu":
        prev = layers[src] if src == len(layers) - 1 and src >= 0 else None
        if prev is None or prev["type"] not in ("conv", "dense", "add"):
            raise UserError(f"{path}: a ReLU that does not directly follow a quantized layer cannot be exported")
        prev["relu"] = True  # fold it: the producer's only consumer is this ReLU
        return src
    if isinstance(block, QResidual):
        body = _graph(block.body, src, layers, f"{path}.body")
        short = src if block.downsample is None else _graph(block.downsample, src, layers, f"{path}.downsample")
        add = block.add
        return emit({"type": "add", "relu": bool(add.relu), **_act_fields(add),
                     "shortcut_only": add.spec.scheme == "onednn"}, [body, short], f"{path}.add")
    if isinstance(block, (nn.HybridSequential, nn.Sequential)) or type(block).__name__ in SEQUENTIAL_CUSTOM:
        for name, child in block._children.items():
            src = _graph(child, src, layers, f"{path}.{name}" if path else name)
        return src
    raise UserError(f"the int8 engines cannot run {path or 'the model'}, a {type(block).__name__}: they run "
                    "sequential containers, our quantized layers, pooling, Dense and ResNet v1 blocks. "
                    "Evaluate it as fake-quant (train_qat.py) instead")


def _act_scale(block: gluon.Block) -> nd.NDArray:
    """``s_a`` of a block's input, shape (1,), float32 as in the training graph (unset range: 1)."""
    q = block.spec
    amax = block.input_max.data()
    return nd.where(amax > 0, amax, nd.ones_like(amax)) / quant.act_grid(q.act_bits, q.scheme, block.input_signed)[2]


def _act_fields(block: gluon.Block, s_a: Optional[nd.NDArray] = None) -> dict:
    """A layer's input grid for the artifact: ``in_scale`` (``s_a``), ``in_qmin``/``in_qmax``, ``act_bits``."""
    q = block.spec
    lo, hi, _ = quant.act_grid(q.act_bits, q.scheme, block.input_signed)
    s_a = _act_scale(block) if s_a is None else s_a
    return {"in_scale": float(s_a.asscalar()), "in_qmin": lo, "in_qmax": hi, "act_bits": q.act_bits}


def _qlayer(block: gluon.Block, name: str) -> dict:
    q = block.spec
    qmin, qmax, w_div = quant.weight_grid(q.weight_bits, q.scheme)
    w = block.weight.data()
    if isinstance(block, QConv2DBN):
        w_f, b_f = quant.fold_bn(nd, w, None, block.gamma.data(), block.beta.data(),
                                 block.running_mean.data(), block.running_var.data(), BN_EPS)
        ndim = 4
    else:
        w_f, b_f = w, block.bias.data()
        ndim = 2
    s_w = quant.weight_scale(nd, w_f, w_div, q.per_channel, ndim)
    codes = nd.clip(quant.round_half_even(nd, nd.broadcast_div(w_f, s_w)), qmin, qmax)
    s_a = _act_scale(block)
    s_b = nd.broadcast_mul(s_w.reshape((-1,)), s_a)
    b_q = nd.clip(quant.round_half_even(nd, nd.broadcast_div(b_f, s_b)), -quant.BIAS_QMAX, quant.BIAS_QMAX)
    n_out = w.shape[0]
    s_w = np.broadcast_to(s_w.asnumpy().reshape(-1), (n_out,)).astype(np.float64)
    b_q = np.broadcast_to(b_q.asnumpy(), (n_out,))
    b_f = b_f.asnumpy().astype(np.float32)
    layer = {"type": "conv" if ndim == 4 else "dense", "name": name, "relu": bool(block.relu),
             **_act_fields(block, s_a), "weight_bits": q.weight_bits, "per_channel": bool(q.per_channel),
             "arrays": {"w": codes.asnumpy().astype(np.int8), "w_scale": s_w, "b": b_q.astype(np.int32),
                        "b_float": b_f}}
    if ndim == 4:
        layer.update(kernel=block.kernel, pad=block.padding, stride=block.stride)
    return layer


def export(net: gluon.Block, mean: tuple, std: tuple, input_shape: tuple, classes: list) -> Int8Model:
    """QAT network (VGG, a converted ResNet v1, any nested HybridSequential of our blocks) -> ``Int8Model``."""
    layers: list = []
    if _graph(net, -1, layers) != len(layers) - 1:
        raise UserError("the model's output is not its last layer; it cannot be exported")
    schemes = {b.spec.scheme for _, b in quantized_layers(net)}
    return Int8Model(layers, tuple(mean), tuple(std), tuple(input_shape), list(classes),
                     scheme=schemes.pop() if len(schemes) == 1 else "mixed")
