"""Turn a trained QAT network into an ``Int8Model`` (integer weights, biases, multipliers).

Weight codes and scales are computed with the very MXNet functions the training graph
uses (``quant.fold_bn``, ``quant.weight_scale`` on ``mx.nd``), so the codes are the ones
fake quantization produced, bit for bit. Then, per quantized layer::

    b_q = round(b_f / (s_w * s_a))                      int32 (|b_q| <= 2**22), half to even
    M   = s_w * s_a / s_a_next  ~=  m0 * 2**(shift-31)  when the next layer is quantized
"""
from __future__ import annotations

import numpy as np
from mxnet import gluon, nd
from mxnet.gluon import nn

from .. import quant
from ..errors import UserError
from ..layers import BN_EPS, QConv2DBN, QDense
from .model import Int8Model, quantize_multiplier


def _leaves(block: gluon.Block, path: str = "") -> list:
    """(structural name, leaf block) in forward order for nested sequential containers."""
    if isinstance(block, (QConv2DBN, QDense, nn.Dense, nn.MaxPool2D, nn.Flatten, nn.Dropout)):
        return [(path, block)]
    from ..models import VGG

    if not isinstance(block, (nn.HybridSequential, nn.Sequential, VGG)):
        raise UserError(f"the int8 engines run sequential networks (VGG); {path or 'the model'} is a "
                        f"{type(block).__name__} (e.g. a residual block), which they cannot run yet. "
                        "Evaluate it as fake-quant (train_qat.py) instead")
    out = []
    for name, child in block._children.items():
        out.extend(_leaves(child, f"{path}.{name}" if path else name))
    return out


def _qlayer(block: gluon.Block, name: str) -> dict:
    q = block.q
    qmin, qmax, w_div = quant.weight_grid(q.weight_bits, q.scheme)
    a_lo, a_hi, a_div = quant.act_grid(q.act_bits, q.scheme, block.input_signed)
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
    amax = block.input_max.data()
    s_a = nd.where(amax > 0, amax, nd.ones_like(amax)) / a_div
    s_b = nd.broadcast_mul(s_w.reshape((-1,)), s_a)
    b_q = nd.clip(quant.round_half_even(nd, nd.broadcast_div(b_f, s_b)), -quant.BIAS_QMAX, quant.BIAS_QMAX)
    n_out = w.shape[0]
    s_a = float(s_a.asscalar())
    s_w = np.broadcast_to(s_w.asnumpy().reshape(-1), (n_out,)).astype(np.float64)
    b_q = np.broadcast_to(b_q.asnumpy(), (n_out,))
    b_f = b_f.asnumpy().astype(np.float32)
    layer = {"type": "conv" if ndim == 4 else "dense", "name": name, "relu": bool(block.relu),
             "in_scale": s_a, "in_qmin": a_lo, "in_qmax": a_hi, "weight_bits": q.weight_bits,
             "act_bits": q.act_bits, "per_channel": bool(q.per_channel),
             "arrays": {"w": codes.asnumpy().astype(np.int8), "w_scale": s_w, "b": b_q.astype(np.int32),
                        "b_float": b_f}}
    if ndim == 4:
        layer.update(kernel=block.kernel, pad=block.padding, stride=block.stride)
    return layer


def export(net: gluon.Block, mean: tuple, std: tuple, input_shape: tuple, classes: list) -> Int8Model:
    """QAT network (VGG or any nested HybridSequential of our blocks) -> ``Int8Model``."""
    layers = []
    for name, block in _leaves(net):
        if isinstance(block, (QConv2DBN, QDense)):
            layers.append(_qlayer(block, name))
        elif isinstance(block, nn.MaxPool2D):
            kw = block._kwargs
            layers.append({"type": "maxpool", "name": name, "size": int(kw["kernel"][0]),
                           "stride": int(kw["stride"][0]), "ceil": kw["pooling_convention"] == "full"})
        elif isinstance(block, nn.Flatten):
            layers.append({"type": "flatten", "name": name})
        elif isinstance(block, nn.Dense):
            act = block.act._act_type if block.act is not None else None
            layers.append({"type": "dense_float", "name": name, "relu": act == "relu",
                           "arrays": {"w": block.weight.data().asnumpy(), "b": block.bias.data().asnumpy()}})
    # requantization multipliers: towards the next quantized layer, unless a float layer or
    # the logits come first
    for i, layer in enumerate(layers):
        if layer["type"] not in ("conv", "dense"):
            continue
        nxt = next((la for la in layers[i + 1:] if la["type"] in ("conv", "dense", "dense_float")), None)
        if nxt is None or nxt["type"] == "dense_float":
            continue
        m = layer["arrays"]["w_scale"] * layer["in_scale"] / nxt["in_scale"]
        m0, shift = quantize_multiplier(m)
        layer["arrays"].update(m0=m0, shift=shift)
        layer.update(out_qmin=nxt["in_qmin"], out_qmax=nxt["in_qmax"])
    schemes = {b.q.scheme for _, b in _leaves(net) if isinstance(b, (QConv2DBN, QDense))}
    return Int8Model(layers, tuple(mean), tuple(std), tuple(input_shape), list(classes),
                     scheme=schemes.pop() if len(schemes) == 1 else "mixed")
