"""VGG-BN defined once, built with float or quantized blocks (layer types are injected).

VGG16-BN as in the original experiment: 3x3 convolutions with padding 1 in stages of
[2, 2, 3, 3, 3] layers with [64, 128, 256, 512, 512] filters, each followed by BatchNorm
and ReLU, a 2x2 max pool after each stage; classifier Dense 512, ReLU, Dropout 0.5, Dense.
``width`` scales every channel count. Float and quantized networks have identical
parameter names, so ``load_parameters`` moves weights between them.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from mxnet import gluon
from mxnet.gluon import nn

from .config import ModelConfig, QuantConfig
from .layers import Conv2DBN, QConv2DBN, QDense, dense, quantized_layers, set_layer_widths

VGG_STAGES = {"vgg11": [1, 1, 2, 2, 2], "vgg13": [2, 2, 2, 2, 2], "vgg16": [2, 2, 3, 3, 3], "vgg19": [2, 2, 4, 4, 4]}
VGG_FILTERS = [64, 128, 256, 512, 512]

ConvFactory = Callable[[int, int], gluon.HybridBlock]  # (channels, in_channels) -> conv+BN+ReLU
DenseFactory = Callable[[int, int, bool, bool], gluon.HybridBlock]  # (units, in_units, relu, last)


class VGG(gluon.HybridBlock):
    """``features`` (conv blocks and pools) then ``classifier`` (Flatten, Dense, Dropout, Dense)."""

    def __init__(self, stages: list, filters: list, hidden: int, num_classes: int, in_channels: int,
                 image_size: int, dropout: float, conv: ConvFactory, dense_layer: DenseFactory):
        super().__init__()
        self.features = nn.HybridSequential()
        size, ch = image_size, in_channels
        for n, f in zip(stages, filters):
            for _ in range(n):
                self.features.add(conv(f, ch))
                ch = f
            if size >= 2:  # odd sizes round up (28 -> 14 -> 7 -> 4 -> 2 -> 1)
                self.features.add(nn.MaxPool2D(2, 2, ceil_mode=size % 2 == 1))
                size = (size + 1) // 2
        self.classifier = nn.HybridSequential()
        self.classifier.add(nn.Flatten(),
                            dense_layer(hidden, ch * size * size, True, False),
                            nn.Dropout(dropout),
                            dense_layer(num_classes, hidden, False, True))

    def hybrid_forward(self, F, x):  # noqa: ANN001
        return self.classifier(self.features(x))


def float_factories() -> tuple:
    return Conv2DBN, lambda units, in_units, relu, last: dense(units, in_units, relu)


def quant_factories(q: QuantConfig) -> tuple:
    def dense_q(units: int, in_units: int, relu: bool, last: bool) -> gluon.HybridBlock:
        if last and not q.quantize_last_layer:
            return dense(units, in_units, relu)
        return QDense(units, in_units, q, relu=relu)

    return functools.partial(QConv2DBN, qcfg=q), dense_q


def gluoncv_model(name: str, num_classes: int, in_channels: int, image_size: int,
                  quant: Optional[QuantConfig] = None) -> gluon.HybridBlock:
    """A gluoncv model zoo network (initialized, shapes known), converted when ``quant`` is given."""
    import mxnet as mx
    from gluoncv.model_zoo import get_model

    from .convert import convert
    from .errors import UserError

    try:
        net = get_model(name, classes=num_classes)
    except ValueError as exc:
        raise UserError(f"model gluoncv:{name}: {str(exc).splitlines()[0][:200]}") from None
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, in_channels, image_size, image_size)))
    return net if quant is None else convert(net, quant)


def build_model(m: ModelConfig, num_classes: int, in_channels: int, image_size: int,
                quant: Optional[QuantConfig] = None) -> gluon.HybridBlock:
    """Float VGG when ``quant`` is None, else the same topology with QConv2DBN/QDense
    (``gluoncv:<name>``: the model zoo network, converted by ``convert``)."""
    if m.arch.startswith("gluoncv:"):
        return gluoncv_model(m.arch.split(":", 1)[1], num_classes, in_channels, image_size, quant)
    if m.arch not in VGG_STAGES:
        raise ValueError(f"unknown architecture {m.arch!r}")
    filters = [max(1, int(round(f * m.width))) for f in VGG_FILTERS]
    conv, dense_layer = float_factories() if quant is None else quant_factories(quant)
    net = VGG(VGG_STAGES[m.arch], filters, max(1, int(round(512 * m.width))), num_classes,
              in_channels, image_size, m.dropout, conv, dense_layer)
    if quant is not None:
        set_layer_widths(net, quant)
        for i, (_, block) in enumerate(quantized_layers(net)):
            block.input_signed = i == 0  # VGG: every quantized layer after the first reads a ReLU output
    return net
