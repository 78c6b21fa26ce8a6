"""Quantize a Gluon model we did not write: ``convert(net, quant_config)``.

Rules (in place, values copied from the float blocks):

* in every ``HybridSequential``, a ``Conv2D`` directly followed by a ``BatchNorm`` becomes one
  ``QConv2DBN`` (the BatchNorm is folded into it; a ReLU ``Activation`` right after stays a
  separate block), and the BatchNorm leaves the container;
* every ``Dense`` (in a container or held as a child attribute) becomes a ``QDense``;
* everything else (pooling, activations, a BatchNorm that no convolution precedes, custom
  blocks) stays float; custom blocks are walked recursively, so their sequential children are
  converted too. A Conv2D and BatchNorm held as separate attributes of a custom block are
  left in float (their call order is not known without tracing).

The network must be initialized with known shapes (run one forward pass first). Parameter
names of the result are structural (``save_parameters``), so a QAT checkpoint of a
converted network loads into ``convert(<same float model>)``.
"""
from __future__ import annotations

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from .config import QuantConfig
from .errors import UserError
from .layers import QConv2DBN, QDense, quantized_layers, set_layer_widths


def _square(v: object, what: str) -> int:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(set(t)) != 1:
        raise UserError(f"convert(): only square {what} are supported, got {t}")
    return int(t[0])


def _qconv(conv: nn.Conv2D, bn: nn.BatchNorm, q: QuantConfig) -> QConv2DBN:
    kw = conv._kwargs
    if kw.get("num_group", 1) != 1 or _square(kw.get("dilate", (1, 1)), "dilations") != 1:
        raise UserError("convert(): grouped or dilated convolutions are not supported")
    if bn._kwargs.get("fix_gamma"):
        raise UserError("convert(): BatchNorm with fix_gamma=True is not supported (gamma must be a parameter)")
    w = conv.weight.data()
    out_c, in_c, k, _ = w.shape
    block = QConv2DBN(out_c, in_c, q, kernel=k, padding=_square(kw["pad"], "paddings"), relu=False,
                      stride=_square(kw["stride"], "strides"))
    ctx = w.context
    block.initialize(ctx=ctx)
    block.weight.set_data(w)
    block.gamma.set_data(bn.gamma.data())
    block.beta.set_data(bn.beta.data())
    block.running_mean.set_data(bn.running_mean.data())
    block.running_var.set_data(bn.running_var.data())
    if conv.bias is not None:  # fold a conv bias into beta: BN(conv + b) = BN'(conv), mean' = mean - b
        block.running_mean.set_data(bn.running_mean.data() - conv.bias.data())
    return block


def _qdense(dense: nn.Dense, q: QuantConfig) -> QDense:
    w = dense.weight.data()
    act = dense.act._act_type if dense.act is not None else None
    if act not in (None, "relu"):
        raise UserError(f"convert(): Dense with activation {act!r} is not supported (relu or none)")
    block = QDense(w.shape[0], w.shape[1], q, relu=act == "relu", flatten=bool(dense._flatten))
    block.initialize(ctx=w.context)
    block.weight.set_data(w)
    block.bias.set_data(dense.bias.data() if dense.bias is not None else mx.nd.zeros(w.shape[0], ctx=w.context))
    return block


def _convert_children(block: gluon.Block, q: QuantConfig) -> None:
    items = list(block._children.items())
    if isinstance(block, (nn.HybridSequential, nn.Sequential)):
        new, i = [], 0
        while i < len(items):
            name, child = items[i]
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if isinstance(child, nn.Conv2D) and isinstance(nxt, nn.BatchNorm):
                new.append((name, _qconv(child, nxt, q)))
                i += 2
                continue
            new.append((name, _qdense(child, q) if isinstance(child, nn.Dense) else child))
            i += 1
        block._children.clear()
        for name, child in new:
            block._children[name] = child
    else:
        for name, child in items:
            if isinstance(child, nn.Dense):  # Block.__setattr__ refuses a change of type
                new = _qdense(child, q)
                object.__setattr__(block, name, new)
                block._children[name] = new
    for child in block._children.values():
        if not isinstance(child, (QConv2DBN, QDense)):
            _convert_children(child, q)


def convert(net: gluon.HybridBlock, q: QuantConfig) -> gluon.HybridBlock:
    """Replace Conv2D+BatchNorm pairs and Dense layers of ``net`` by quantized blocks (in place)."""
    if q.scheme != "original":
        raise UserError("convert(): only quant.scheme 'original' is supported for converted models")
    try:
        for p in net.collect_params().values():
            p.data()
    except (RuntimeError, mx.base.MXNetError) as exc:
        raise UserError("convert(): initialize the network and run one forward pass first "
                        f"(parameters without data: {str(exc).splitlines()[0]})") from None
    _convert_children(net, q)
    if not quantized_layers(net):
        raise UserError("convert(): no Conv2D+BatchNorm pair or Dense layer found to quantize")
    set_layer_widths(net, q)
    return net
