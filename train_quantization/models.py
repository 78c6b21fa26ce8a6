"""Float networks: VGG-BN from its spec (layer types injected), and the gluoncv model zoo.

VGG16-BN as in the original experiment: 3x3 convolutions with padding 1 in stages of
[2, 2, 3, 3, 3] layers with [64, 128, 256, 512, 512] filters, each followed by BatchNorm
and ReLU, a 2x2 max pool after each stage; classifier Dense 512, ReLU, Dropout 0.5, Dense.
``width`` scales every channel count. ``conv_dropout`` (one probability per stage) adds Dropout after
each conv block that another conv follows in its stage, as Liu & Deng's (2015) VGG16-BN for CIFAR-10
(0.3 in the first stage, 0.4 after); Dropout is the identity at inference, so the int8 engines skip it.

Every network is built in float; ``conversion.convert`` turns it into its QAT form (one path for
all models), keeping parameter names, so checkpoints move between the two by name.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from mxnet import gluon
from mxnet.gluon import nn

from .config import ModelConfig, QuantConfig
from .layers import Conv2DBN, compiled_relu6, dense

VGG_STAGES = {"vgg11": [1, 1, 2, 2, 2], "vgg13": [2, 2, 2, 2, 2], "vgg16": [2, 2, 3, 3, 3], "vgg19": [2, 2, 4, 4, 4]}
VGG_FILTERS = [64, 128, 256, 512, 512]

ConvFactory = Callable[[int, int], gluon.HybridBlock]  # (channels, in_channels) -> conv+BN+ReLU
DenseFactory = Callable[[int, int, bool], gluon.HybridBlock]  # (units, in_units, relu)


class VGG(gluon.HybridBlock):
    """``features`` (conv blocks and pools) then ``classifier`` (Flatten, Dense, Dropout, Dense)."""

    def __init__(self, stages: list, filters: list, hidden: int, num_classes: int, in_channels: int,
                 image_size: int, dropout: float, conv: ConvFactory, dense_layer: DenseFactory,
                 conv_dropout: Sequence[float] = ()):
        super().__init__()
        self.features = nn.HybridSequential()
        size, ch = image_size, in_channels
        for s, (n, f) in enumerate(zip(stages, filters)):
            for i in range(n):
                self.features.add(conv(f, ch))
                ch = f
                if conv_dropout and conv_dropout[s] > 0 and i < n - 1:
                    self.features.add(nn.Dropout(conv_dropout[s]))
            if size >= 2:  # odd sizes round up (28 -> 14 -> 7 -> 4 -> 2 -> 1)
                self.features.add(nn.MaxPool2D(2, 2, ceil_mode=size % 2 == 1))
                size = (size + 1) // 2
        self.classifier = nn.HybridSequential()
        self.classifier.add(nn.Flatten(),
                            dense_layer(hidden, ch * size * size, True),
                            nn.Dropout(dropout),
                            dense_layer(num_classes, hidden, False))

    def hybrid_forward(self, F, x):  # noqa: ANN001
        return self.classifier(self.features(x))


# (expansion t, channels c, blocks n, stride s) of MobileNetV2; on 32x32 inputs the stem and the
# second stage keep stride 1 (the usual CIFAR variant), so the last stage works at 4x4
MOBILENETV2_CIFAR = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1)]


class CIFARMobileNetV2(gluon.HybridBlock):
    """MobileNetV2 (Sandler et al. 2018) for small images, from gluoncv's blocks: a 3x3 stem at stride 1,
    linear bottlenecks (depthwise 3x3, ReLU6, linear projection, residual add where shapes allow) with
    the CIFAR strides of ``MOBILENETV2_CIFAR``, a 1x1 conv to 1280 channels, global average pooling and
    a 1x1 conv classifier; ``width`` scales every channel count but the last 1280 (as gluoncv)."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, **kwargs: Any):
        super().__init__(**kwargs)
        from gluoncv.model_zoo.mobilenet import LinearBottleneck, _add_conv

        with self.name_scope():
            self.features = nn.HybridSequential(prefix="features_")
            with self.features.name_scope():
                ch = int(32 * width)
                _add_conv(self.features, ch, kernel=3, stride=1, pad=1, relu6=True)
                for t, c, n, stride in MOBILENETV2_CIFAR:
                    for i in range(n):
                        self.features.add(LinearBottleneck(ch, int(c * width), t, stride if i == 0 else 1))
                        ch = int(c * width)
                _add_conv(self.features, int(1280 * width) if width > 1.0 else 1280, relu6=True)
                self.features.add(nn.GlobalAvgPool2D())
            self.output = nn.HybridSequential(prefix="output_")
            with self.output.name_scope():
                self.output.add(nn.Conv2D(num_classes, 1, use_bias=False, prefix="pred_"), nn.Flatten())

    def hybrid_forward(self, F, x):  # noqa: ANN001
        return self.output(self.features(x))


def gluoncv_model(name: str, num_classes: int, in_channels: int, image_size: int) -> gluon.HybridBlock:
    """A gluoncv model zoo network, initialized, shapes known."""
    import mxnet as mx
    from gluoncv.model_zoo import get_model

    from .errors import UserError

    try:
        net = get_model(name, classes=num_classes)
    except ValueError as exc:
        raise UserError(f"model gluoncv:{name}: {str(exc).splitlines()[0][:200]}") from None
    compiled_relu6(net)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, in_channels, image_size, image_size)))
    return net


def vgg(m: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> VGG:
    """Float VGG-BN of ``m.arch`` at ``m.width`` (not initialized)."""
    filters = [max(1, int(round(f * m.width))) for f in VGG_FILTERS]
    return VGG(VGG_STAGES[m.arch], filters, max(1, int(round(512 * m.width))), num_classes, in_channels, image_size,
               m.dropout, Conv2DBN, lambda units, in_units, relu: dense(units, in_units, relu), m.conv_dropout)


def build_model(m: ModelConfig, num_classes: int, in_channels: int, image_size: int,
                quant: Optional[QuantConfig] = None) -> gluon.HybridBlock:
    """The float network (VGG: not initialized; gluoncv: initialized); with ``quant``, its QAT form
    (initialized, then ``convert``ed)."""
    import mxnet as mx

    from .config import parse_arch

    kind, name = parse_arch(m.arch)
    if kind == "gluoncv":
        net = gluoncv_model(name, num_classes, in_channels, image_size)
    elif kind == "mobilenetv2_cifar":
        net = compiled_relu6(CIFARMobileNetV2(m.width, num_classes))
        net.initialize(mx.init.Xavier(magnitude=2.0))
        net(mx.nd.zeros((1, in_channels, image_size, image_size)))
    else:
        net = vgg(m, num_classes, in_channels, image_size)
        if quant is not None:
            net.initialize(mx.init.Xavier(magnitude=2.0))
    if quant is None:
        return net
    from .conversion import convert

    return convert(net, quant)
