"""Quantize a Gluon model we did not write: ``convert(net, quant_config)``.

Rules (in place, values copied from the float blocks):

* in every ``HybridSequential``, a ``Conv2D`` directly followed by a ``BatchNorm`` becomes one
  ``QConv2DBN`` (the BatchNorm is folded into it; a ReLU ``Activation`` right after stays a
  separate block), and the BatchNorm leaves the container;
* every ``Dense`` (in a container or held as a child attribute) becomes a ``QDense``;
* a ResNet v1 block (gluoncv's ``CIFARBasicBlockV1``, ``BasicBlockV1``, ``BottleneckV1``:
  ``relu(body(x) + downsample(x) or x)``) becomes a ``QResidual`` whose add is a ``QAdd``
  (both branches on one learned scale), after its body and downsample are converted;
* in the ``onednn`` scheme, a ``GlobalAvgPool2D`` becomes a ``QAvgPool`` (its input quantized on a
  learned range, as the int8 network hands it over);
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
from .layers import QAdd, QAvgPool, QConv2DBN, QDense, QResidual, quantized_layers, set_layer_widths

RESIDUAL_V1 = ("CIFARBasicBlockV1", "BasicBlockV1", "BottleneckV1")  # relu(body(x) + downsample(x) or x)
SEQUENTIAL_CUSTOM = ("VGG", "CIFARResNetV1", "ResNetV1")  # custom blocks whose forward runs the children in order
PASS_SIGN = (nn.MaxPool2D, nn.AvgPool2D, nn.GlobalAvgPool2D, nn.GlobalMaxPool2D, nn.Flatten, nn.Dropout)


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
            if isinstance(child, nn.Dense):
                child = _qdense(child, q)
            elif isinstance(child, nn.GlobalAvgPool2D) and q.scheme == "onednn":
                child = QAvgPool(q, prefix=child.prefix)
                child.initialize(ctx=block.collect_params().list_ctx())
            new.append((name, child))
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
    for name, child in list(block._children.items()):
        if not isinstance(child, (QConv2DBN, QDense)):
            _convert_children(child, q)
        if type(child).__name__ in RESIDUAL_V1 and hasattr(child, "body") and hasattr(child, "downsample"):
            new = QResidual(child.body, child.downsample, QAdd(q))
            new.add.initialize(ctx=child.body.collect_params().list_ctx())
            if not isinstance(block, (nn.HybridSequential, nn.Sequential)):
                object.__setattr__(block, name, new)
            block._children[name] = new


UINT8, INT8, INT8_NONNEG = "uint8", "int8", "int8 >= 0"  # how a tensor reaches its readers (onednn scheme)


def _mark_signs(block: gluon.Block, state: str) -> str:
    """Set ``input_signed`` of every quantized layer from how its input arrives (``state``: a ReLU
    output is read as ``UINT8``) and return the state of the block's output. The ``onednn`` scheme
    uses it; a custom block whose call order is unknown gets signed inputs (always safe)."""
    if isinstance(block, (QConv2DBN, QDense)):
        block.input_signed = state != UINT8
        return UINT8 if block.relu else INT8
    if isinstance(block, QAvgPool):  # pools in float: the next layer quantizes afresh
        block.input_signed = state != UINT8
        return INT8 if state == INT8 else UINT8
    if isinstance(block, nn.Activation):
        return UINT8 if block._act_type == "relu" else INT8
    if isinstance(block, PASS_SIGN):
        return state
    if isinstance(block, QResidual):
        _mark_signs(block.body, state)
        short = state if block.downsample is None else _mark_signs(block.downsample, state)
        block.add.input_signed = short != UINT8
        # oneDNN writes the fused conv + sum into the shortcut's buffer: after a shortcut of type int8
        # (a conv output without ReLU) the block's output stays int8 (codes 0..127 after the ReLU),
        # so its readers use the int8 grid; a uint8-typed shortcut gives a uint8 output
        return INT8 if not block.add.relu else INT8_NONNEG if short == INT8 else UINT8
    ordered = isinstance(block, (nn.HybridSequential, nn.Sequential)) or type(block).__name__ in SEQUENTIAL_CUSTOM
    for child in block._children.values():
        state = _mark_signs(child, state if ordered else INT8)
    return state if ordered else INT8


def convert(net: gluon.HybridBlock, q: QuantConfig) -> gluon.HybridBlock:
    """Replace Conv2D+BatchNorm pairs and Dense layers of ``net`` by quantized blocks (in place)."""
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
    _mark_signs(net, INT8)
    return net


def copy_to_float(qnet: gluon.HybridBlock, fnet: gluon.HybridBlock) -> gluon.HybridBlock:
    """The inverse move: copy a converted network's (QAT) values into ``fnet``, the float model it was
    converted from (same structure, e.g. freshly built): each ``QConv2DBN`` into its Conv2D and the
    BatchNorm after it (a conv bias becomes 0, already folded into the mean), each ``QDense`` into its
    Dense. For oneDNN, which takes the float graph and quantizes it itself. Returns ``fnet``."""
    def walk(qb: gluon.Block, fb: gluon.Block) -> None:
        names = list(fb._children)
        for name, qc in qb._children.items():
            if isinstance(qc, QAdd):
                continue
            fc = fb._children[name]
            if isinstance(qc, QConv2DBN):
                bn = fb._children[names[names.index(name) + 1]]
                fc.weight.set_data(qc.weight.data())
                if fc.bias is not None:
                    fc.bias.set_data(mx.nd.zeros_like(fc.bias.data()))
                for attr in ("gamma", "beta", "running_mean", "running_var"):
                    getattr(bn, attr).set_data(getattr(qc, attr).data())
            elif isinstance(qc, QDense):
                fc.weight.set_data(qc.weight.data())
                if fc.bias is not None:
                    fc.bias.set_data(qc.bias.data())
            else:
                walk(qc, fc)

    walk(qnet, fnet)
    return fnet
