"""Turn a float Gluon network into its QAT form: ``convert(net, quant_config)``; and back.

One path for every model (VGG from our spec, gluoncv model zoo networks, any nest of sequential
containers). Rules (in place, values copied from the float blocks, no random draws):

* our float ``Conv2DBN`` becomes a ``QConv2DBN`` (same parameter names);
* in every ``HybridSequential``, a ``Conv2D`` directly followed by a ``BatchNorm`` becomes one
  ``QConv2DBN`` (the BatchNorm is folded into it; a ReLU ``Activation`` right after stays a
  separate block), and the BatchNorm leaves the container;
* every ``Dense`` (in a container or held as a child attribute) becomes a ``QDense``; with
  ``quant.quantize_last_layer: false`` the network's last one stays float;
* a ResNet v1 block (gluoncv's ``CIFARBasicBlockV1``, ``BasicBlockV1``, ``BottleneckV1``:
  ``relu(body(x) + downsample(x) or x)``) becomes a ``QResidual`` whose add is a ``QAdd``
  (both branches on one learned scale), after its body and downsample are converted;
* in the ``onednn`` scheme, a ``GlobalAvgPool2D`` becomes a ``QAvgPool`` (its input quantized on a
  learned range, as the int8 network hands it over);
* everything else (pooling, activations, a BatchNorm that no convolution precedes, custom
  blocks) stays float; custom blocks are walked recursively, so their sequential children are
  converted too. A Conv2D and BatchNorm held as separate attributes of a custom block are
  left in float (their call order is not known without tracing).

Then, in one place, every quantized layer gets its frozen spec (widths from ``quant.layer_bits``,
``quant.first_last_bits``) and its input's signedness from the graph (``_mark_signs``).

The network must hold values with known shapes (initialized, or loaded from a checkpoint).
Parameter names of the result are structural (``save_parameters``) and equal the float
network's plus one ``input_max`` per quantized layer, so float checkpoints load into QAT
networks and QAT checkpoints into ``convert(<same float model>)``. ``copy_to_float`` is the
inverse: the QAT values back into the float network.
"""
from __future__ import annotations

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from .config import QuantConfig
from .errors import UserError
from .layers import (
    Conv2DBN,
    QAdd,
    QAvgPool,
    QConcat,
    QConv2D,
    QConv2DBN,
    QDense,
    QPreActResidual,
    QResidual,
    QShuffleUnit,
    init_weight_steps,
    input_grid,
    quantized_layers,
    set_layer_widths,
)

RESIDUAL_V1 = ("CIFARBasicBlockV1", "BasicBlockV1", "BottleneckV1")  # relu(body(x) + downsample(x) or x)
PREACT = "CIFARBasicBlockV2"  # conv2(relu(bn2(conv1(relu(bn1(x)))))) + (downsample(x) or x)
SHUFFLE_UNIT = "shuffleUnitV2"  # gluoncv ShuffleNetV2: split or two branches, concat, channel shuffle
LINEAR_BOTTLENECK = "LinearBottleneck"  # gluoncv MobileNetV2: out(x) (+ x when use_shortcut), no ReLU after
RELU6 = "ReLU6"  # gluoncv's clip(x, 0, 6) block
# custom blocks whose forward runs the children in order
SEQUENTIAL_CUSTOM = ("VGG", "CIFARResNetV1", "ResNetV1", "CIFARResNetV2", "MobileNet", "MobileNetV2",
                     "CIFARMobileNetV2", "ShuffleNetV2", LINEAR_BOTTLENECK)
PASS_SIGN = (nn.MaxPool2D, nn.AvgPool2D, nn.GlobalAvgPool2D, nn.GlobalMaxPool2D, nn.Flatten, nn.Dropout)


def _square(v: object, what: str) -> int:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(set(t)) != 1:
        raise UserError(f"convert(): only square {what} are supported, got {t}")
    return int(t[0])


def _adopt(block: gluon.Block, values: dict, ctx: list) -> None:
    """Set ``block``'s parameters from ``{name: NDArray}`` without initializing them (no random
    draws, so a run's random stream is the same whichever way its network was built); the rest
    (range states) start at zero."""
    for name, p in block._collect_params_with_prefix().items():
        if name in values:
            p._load_init(values[name].copy(), ctx)
        else:
            p.initialize(mx.init.Zero(), ctx=ctx)


def _conv_geometry(conv: nn.Conv2D) -> dict:
    """A Conv2D's channels, kernel, padding, stride and groups (square, not dilated: refused otherwise)."""
    kw = conv._kwargs
    if _square(kw.get("dilate", (1, 1)), "dilations") != 1:
        raise UserError(f"convert(): {conv.name}: dilated convolutions are not supported")
    w = conv.weight.data()
    groups = int(kw.get("num_group", 1))
    return {"channels": w.shape[0], "in_channels": w.shape[1] * groups, "kernel": w.shape[2],
            "padding": _square(kw["pad"], "paddings"), "stride": _square(kw["stride"], "strides"), "groups": groups}


def _qconv(conv: nn.Conv2D, bn: nn.BatchNorm, q: QuantConfig) -> QConv2DBN:
    if bn._kwargs.get("fix_gamma"):
        raise UserError("convert(): BatchNorm with fix_gamma=True is not supported (gamma must be a parameter)")
    w = conv.weight.data()
    block = QConv2DBN(spec=q.spec(), relu=False, **_conv_geometry(conv))
    mean = bn.running_mean.data()
    if conv.bias is not None:  # fold a conv bias into the mean: BN(conv + b) = BN'(conv), mean' = mean - b
        mean = mean - conv.bias.data()
    _adopt(block, {"weight": w, "gamma": bn.gamma.data(), "beta": bn.beta.data(), "running_mean": mean,
                   "running_var": bn.running_var.data()}, conv.weight.list_ctx())
    return block


def _qconv_plain(conv: nn.Conv2D, q: QuantConfig) -> QConv2D:
    """A Conv2D without a BatchNorm after it (a classifier head)."""
    act = conv.act._act_type if conv.act is not None else None
    if act not in (None, "relu"):
        raise UserError(f"convert(): {conv.name}: Conv2D with activation {act!r} is not supported (relu or none)")
    block = QConv2D(spec=q.spec(), use_bias=conv.bias is not None, relu=act == "relu", **_conv_geometry(conv))
    values = {"weight": conv.weight.data(), **({"bias": conv.bias.data()} if conv.bias is not None else {})}
    _adopt(block, values, conv.weight.list_ctx())
    return block


def _qconv2dbn(conv: Conv2DBN, q: QuantConfig) -> QConv2DBN:
    block = QConv2DBN(conv.channels, conv.in_channels, q.spec(), kernel=conv.kernel, padding=conv.padding,
                      relu=conv.relu, stride=conv.stride, groups=conv.groups)
    _adopt(block, {k: p.data() for k, p in conv._collect_params_with_prefix().items()}, conv.weight.list_ctx())
    return block


def _qdense(dense: nn.Dense, q: QuantConfig) -> QDense:
    w = dense.weight.data()
    act = dense.act._act_type if dense.act is not None else None
    if act not in (None, "relu"):
        raise UserError(f"convert(): Dense with activation {act!r} is not supported (relu or none)")
    block = QDense(w.shape[0], w.shape[1], q.spec(), relu=act == "relu", flatten=bool(dense._flatten))
    bias = dense.bias.data() if dense.bias is not None else mx.nd.zeros(w.shape[0], ctx=w.context)
    _adopt(block, {"weight": w, "bias": bias}, dense.weight.list_ctx())
    return block


def _frozen_bn(bn: nn.BatchNorm, q: QuantConfig) -> nn.BatchNorm:
    """A BatchNorm that stays (no convolution precedes it): frozen like the folded ones, so that training
    uses the running statistics the int8 graph runs with (``paper`` BN mode: batch statistics)."""
    if q.bn_mode == "frozen":
        bn._kwargs["use_global_stats"] = True
    return bn


def _preact(block: gluon.Block, q: QuantConfig) -> QPreActResidual:
    """gluoncv's ``CIFARBasicBlockV2`` as a ``QPreActResidual`` (``bn2`` folds into ``conv1``)."""
    if q.scheme == "onednn":
        raise UserError(f"convert(): {block.name}: the onednn scheme cannot run pre-activation blocks on oneDNN; "
                        "use quant.scheme original")
    conv1 = _qconv(block.conv1, block.bn2, q)
    conv1.relu = True
    down = _qconv_plain(block.downsample, q) if block.downsample is not None else None
    new = QPreActResidual(_frozen_bn(block.bn1, q), conv1, _qconv_plain(block.conv2, q), down,
                          QAdd(q.spec(), relu=False))
    new.add.initialize(mx.init.Zero(), ctx=block.conv1.weight.list_ctx())
    return new


def _float_dense(qd: QDense) -> nn.Dense:
    """A ``QDense``'s values in a float ``Dense`` (``quant.quantize_last_layer: false``)."""
    d = nn.Dense(qd.units, activation="relu" if qd.relu else None, in_units=qd.in_units, flatten=qd.flatten)
    _adopt(d, {"weight": qd.weight.data(), "bias": qd.bias.data()}, qd.weight.list_ctx())
    return d


def _set_child(parent: gluon.Block, name: str, child: gluon.Block) -> None:
    """Replace a child in place, in a container or as an attribute (``__setattr__`` refuses a change of type)."""
    if not isinstance(parent, (nn.HybridSequential, nn.Sequential)):
        object.__setattr__(parent, name, child)
    parent._children[name] = child


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
            if isinstance(child, nn.Conv2D):
                child = _qconv_plain(child, q)
            elif isinstance(child, nn.BatchNorm):
                child = _frozen_bn(child, q)
            elif isinstance(child, nn.GlobalAvgPool2D) and (q.scheme == "onednn" or
                                                            (new and type(new[-1][1]).__name__ == RELU6)):
                # onednn: the pooling reads codes; after a ReLU6 the pooling must see the clamp, which the
                # int8 graph applies as saturation of the pooling's own (fixed) range
                child = QAvgPool(q.spec(), prefix=child.prefix)
                child.initialize(mx.init.Zero(), ctx=block.collect_params().list_ctx())
            new.append((name, child))
            i += 1
        block._children.clear()
        for name, child in new:
            block._children[name] = child
    for name, child in list(block._children.items()):
        if isinstance(child, Conv2DBN) and not isinstance(child, QConv2DBN):
            _set_child(block, name, _qconv2dbn(child, q))
        elif isinstance(child, nn.Dense):
            _set_child(block, name, _qdense(child, q))
        elif not isinstance(child, (QConv2DBN, QDense)):
            _convert_children(child, q)
        kind = type(child).__name__
        if kind == PREACT:
            _set_child(block, name, _preact(child, q))
            continue
        if kind == SHUFFLE_UNIT:
            if q.scheme == "onednn":
                raise UserError(f"convert(): {child.name}: the onednn scheme cannot run channel shuffle units on "
                                "oneDNN; use quant.scheme original")
            unit = QShuffleUnit(child, QConcat(q.spec()))
            unit.concat.initialize(mx.init.Zero(), ctx=child.branch2_conv.collect_params().list_ctx())
            _set_child(block, name, unit)
            continue
        if kind in RESIDUAL_V1 and hasattr(child, "body") and hasattr(child, "downsample"):
            new = QResidual(child.body, child.downsample, QAdd(q.spec()))
        elif kind == LINEAR_BOTTLENECK and getattr(child, "use_shortcut", False):
            new = QResidual(child.out, None, QAdd(q.spec(), relu=False), body_name="out")
        else:
            continue
        new.add.initialize(mx.init.Zero(), ctx=new.body.collect_params().list_ctx())
        _set_child(block, name, new)


def _keep_last_float(net: gluon.Block) -> None:
    """``quant.quantize_last_layer: false``: the last quantized layer, a ``QDense``, back to float."""
    path, last = quantized_layers(net, weights_only=True)[-1]
    if isinstance(last, QDense):
        parent = net
        *parents, name = path.split(".")
        for p in parents:
            parent = parent._children[p]
        _set_child(parent, name, _float_dense(last))


UINT8, INT8, INT8_NONNEG = "uint8", "int8", "int8 >= 0"  # how a tensor reaches its readers (onednn scheme)
RELU6_OUT = "relu6"  # a ReLU6 output: uint8, and at most 6


def _read(block: gluon.Block, state: str) -> None:
    """A quantized block reads a tensor in ``state``: its sign and, after a ReLU6, its fixed range.

    A ReLU6 output's range is fixed at ``6 * divisor / qmax`` (``quant.act_grid``; ``6 * 128/127``
    at 8 bits in the original scheme), so that 6 is exactly the grid's largest code: the clamp at 6
    is the grid's own saturation, and the int8 graph runs the ReLU6 as a ReLU."""
    block.input_signed = state not in (UINT8, RELU6_OUT)
    block.range_fixed = state == RELU6_OUT
    if block.range_fixed:
        _, qmax, divisor = input_grid(block)
        block.input_max.set_data(mx.nd.full((1,), 6.0 * divisor / qmax))


def _mark_signs(block: gluon.Block, state: str) -> str:
    """Mark how every quantized layer's input arrives (``state``: a ReLU output is read as ``UINT8``, a
    ReLU6 output also at a fixed range, ``_read``) and return the state of the block's output. The
    ``onednn`` scheme and learned ranges (unsigned grids on ReLU outputs) use the signs; a custom block
    whose call order is unknown gets signed inputs."""
    if isinstance(block, (QConv2DBN, QConv2D, QDense)):
        _read(block, state)
        return UINT8 if block.relu else INT8
    if isinstance(block, QAvgPool):  # pools in float: the next layer quantizes afresh
        _read(block, state)
        return INT8 if state == INT8 else UINT8
    if type(block).__name__ == RELU6:
        return RELU6_OUT
    if isinstance(block, nn.Activation):
        return UINT8 if block._act_type == "relu" else INT8
    if isinstance(block, PASS_SIGN):
        return state
    if isinstance(block, QShuffleUnit):  # the concat's output is a ReLU output where both halves are
        b1 = state if block.split else _mark_signs(block.branch1_conv, state)
        b2 = _mark_signs(block.branch2_conv, state)
        block.concat.input_signed = True
        return UINT8 if b1 == b2 == UINT8 else INT8
    if isinstance(block, QPreActResidual):  # conv1 reads relu(bn1(x)), conv2 conv1's ReLU output
        _read(block.conv1, UINT8)
        _read(block.conv2, UINT8)
        if block.downsample is not None:
            _read(block.downsample, state)
        block.add.input_signed = True
        return INT8
    if isinstance(block, QResidual) and block.add.spec.scheme != "onednn":
        # one range covers both branches (QAdd): signed unless both are non-negative; no typed buffers, so a
        # ReLU'd sum reaches its readers as a ReLU output
        body = _mark_signs(block.body, state)
        short = state if block.downsample is None else _mark_signs(block.downsample, state)
        block.add.input_signed = not {body, short} <= {UINT8, RELU6_OUT}
        return UINT8 if block.add.relu else INT8
    if isinstance(block, QResidual):
        _mark_signs(block.body, state)
        if not block.add.relu:  # a linear bottleneck: the add's output is signed
            block.add.input_signed = state not in (UINT8, RELU6_OUT)
            return INT8
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
    """Replace ``net``'s convolution+BatchNorm pairs and Dense layers by quantized blocks (in place),
    give each its spec and input signedness; returns ``net``."""
    try:
        for p in net.collect_params().values():
            p.data()
    except (RuntimeError, mx.base.MXNetError) as exc:
        raise UserError("convert(): initialize the network (or load a checkpoint) and run one forward pass "
                        f"first (parameters without data: {str(exc).splitlines()[0]})") from None
    _convert_children(net, q)
    if not quantized_layers(net, weights_only=True):
        raise UserError("convert(): no Conv2D+BatchNorm pair or Dense layer found to quantize")
    if not q.quantize_last_layer:
        _keep_last_float(net)
    set_layer_widths(net, q)
    _mark_signs(net, INT8)
    init_weight_steps(net)
    return net


def copy_to_float(qnet: gluon.HybridBlock, fnet: gluon.HybridBlock) -> gluon.HybridBlock:
    """The inverse of ``convert``: copy a converted network's (QAT) values into ``fnet``, the float model it
    was converted from (same structure, e.g. freshly built): each ``QConv2DBN`` into its ``Conv2DBN``, or
    into its Conv2D and the BatchNorm after it (a conv bias becomes 0, already folded into the mean), each
    ``QDense`` into its Dense; range states are dropped. For oneDNN, which takes the float graph and
    quantizes it itself. Returns ``fnet``."""
    def copy(src: gluon.Block, dst: gluon.Block, names: tuple) -> None:
        own = dst._collect_params_with_prefix()
        for k in names:
            own[k].set_data(src._collect_params_with_prefix()[k].data())

    def walk(qb: gluon.Block, fb: gluon.Block) -> None:
        names = list(fb._children)
        for name, qc in qb._children.items():
            if isinstance(qc, QAdd):
                continue
            fc = fb._children[name]
            if not qc._children and not isinstance(qc, (QConv2DBN, QConv2D, QDense)):  # a float leaf (BatchNorm)
                copy(qc, fc, tuple(fc._collect_params_with_prefix()))
                continue
            if isinstance(qc, QConv2DBN) and isinstance(fc, Conv2DBN):
                copy(qc, fc, ("weight", "gamma", "beta", "running_mean", "running_var"))
            elif isinstance(qc, QConv2DBN):
                copy(qc, fc, ("weight",))
                if fc.bias is not None:
                    fc.bias.set_data(mx.nd.zeros_like(fc.bias.data()))
                copy(qc, fb._children[names[names.index(name) + 1]], ("gamma", "beta", "running_mean", "running_var"))
            elif isinstance(qc, (QDense, nn.Dense, QConv2D)):
                copy(qc, fc, ("weight", "bias") if fc.bias is not None else ("weight",))
            else:
                walk(qc, fc)

    for p in fnet.collect_params().values():
        if p._data is None:
            p.initialize(mx.init.Zero(), ctx=qnet.collect_params().list_ctx())
    walk(qnet, fnet)
    return fnet
