"""Gluon blocks: float ``Conv2DBN`` and the quantization-aware ``QConv2DBN`` and ``QDense``.

The float and quantized blocks share parameter names (``weight``, ``gamma``, ``beta``,
``running_mean``, ``running_var``; ``weight``, ``bias`` for Dense), so a float checkpoint
loads into a QAT network by name; the only new parameter is each quantized layer's
activation range state ``input_max`` (``grad_req='null'``, saved with the checkpoint).

Activation range, in the graph (no Python reads a value, so the block hybridizes)::

    batch_max  = max|x|                              (no gradient)
    input_max <- batch_max                           first training batch (input_max == 0)
    input_max <- m * input_max + (1 - m) * batch_max later training batches
    input_max    unchanged                           evaluation
    s_a = input_max / 2**(bits-1),   x_q = clip(round(x / s_a), -2**(bits-1), 2**(bits-1)-1) * s_a

The state is written in-graph by ``sgd_mom_update`` (an op that declares a mutable input,
composed positionally; with lr=1, momentum=0, wd=0 it sets ``mom = -grad`` exactly), and
the train/eval switch comes from a ``BatchNorm`` over a constant (batch statistics in
training, stored ones in evaluation).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
from typing import Any, Iterator, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.base import _LIB, c_str, check_call
from mxnet.gluon import nn

from . import quant
from .config import QuantConfig, QuantSpec
from .errors import UserError

BN_EPS = 1e-5
BN_MOMENTUM = 0.9
_OP_HANDLES: dict = {}


def _positional_op(F: Any, op: str, inputs: list, **attrs: Any) -> Any:
    """Call ``op`` with positional inputs. Symbol wrappers pass inputs by keyword, which
    fails for optimizer ops (no input names registered), so compose the symbol directly."""
    if F is mx.nd:
        return getattr(mx.nd, op)(*inputs, **attrs)
    from mxnet._ctypes.symbol import _symbol_creator
    from mxnet.name import NameManager

    if op not in _OP_HANDLES:
        h = ctypes.c_void_p()
        check_call(_LIB.NNGetOpHandle(c_str(op), ctypes.byref(h)))
        _OP_HANDLES[op] = h.value
    name = NameManager.current.get(None, op)
    return _symbol_creator(_OP_HANDLES[op], inputs, None, list(attrs), [str(v) for v in attrs.values()], name, False)


def assign_state(F: Any, state: Any, value: Any) -> Any:
    """Write ``value`` into the parameter ``state`` in-graph; returns ``value`` (no gradient).

    ``sgd_mom_update(weight=0, grad=-value, mom=state, lr=1, momentum=0, wd=0)`` computes
    ``mom = 0 * mom - (0 * weight + 1 * grad) = value`` and returns ``weight + mom = value``,
    both exactly. Using its output keeps the write in the graph.
    """
    zero = F.zeros_like(value)
    out = _positional_op(F, "sgd_mom_update", [zero, F.negative(value), state],
                         lr=1.0, momentum=0.0, wd=0.0, rescale_grad=1.0)
    return F.BlockGrad(out)


def train_flag(F: Any, state: Any) -> Any:
    """1.0 in a training forward (``autograd.record(train_mode=True)``), 0.0 otherwise.

    BatchNorm over the single value ``2 * state + 1`` with ``state`` (>= 0) as moving mean and
    variance and ``gamma = sqrt(state + eps)``: batch statistics give exactly 0, the stored
    ones about ``state + 1 >= 1``. ``momentum=1`` leaves ``state`` unchanged
    (``state * 1 + mean * 0``).
    """
    st = F.BlockGrad(state)
    gamma = F.sqrt(st + 1e-3)
    out = F.BatchNorm(F.reshape(2.0 * st + 1.0, (1, 1)), gamma, F.zeros_like(st), state, state,
                      momentum=1.0, eps=1e-3, fix_gamma=False, use_global_stats=False)
    return F.BlockGrad(1.0 - F.clip(F.round(F.reshape(out, (1,))), 0.0, 1.0))


def _abs_max(F: Any, x: Any) -> Any:
    """The batch ``max|x|``, shape (1,), no gradient. oneDNN's ``quantize_v2`` without a calibration range
    takes ``max(|min x|, |max x|)`` (exact: no arithmetic on the values) as its int8 range in one parallel
    pass, 2-4x faster than MXNet's reductions or a global max pool; its int8 output is not used."""
    return F.reshape(F.contrib.quantize_v2(F.BlockGrad(x), out_type="int8")[2], (1,))


def update_range(F: Any, xs: tuple, state: Any, momentum: float) -> Any:
    """EMA of the batch ``max|x|`` over the tensors ``xs`` (see module docstring); returns the
    value to quantize with, shape (1,)."""
    bmax = _abs_max(F, xs[0])
    for x in xs[1:]:
        bmax = F.maximum(bmax, _abs_max(F, x))
    ema = float(momentum) * state + float(1.0 - momentum) * bmax
    new = F.where(state > 0, ema, bmax)
    return assign_state(F, state, F.where(train_flag(F, state), new, state))


def use_fused(q: QuantSpec) -> bool:
    """Whether blocks built now use the compiled quantizers (a static, per-block choice): ``tq_act_quant``
    and ``tq_weight_quant`` for EMA ranges, ``tq_lsq_quant`` for learned ones."""
    if q.kernel == "stock":
        return False
    from . import fused

    if q.kernel == "fused" and not fused.available():
        raise RuntimeError("quant.kernel is 'fused' but the compiled operator could not be built or loaded")
    return fused.available()


def quantize_input(F: Any, block: gluon.HybridBlock, x: Any, state: Any, ndim: int) -> tuple:
    """Update ``block``'s range state (training only) and fake-quantize ``x`` with it.

    Returns ``(x_q, s_a)``, ``s_a`` of shape (1,); ``(x, None)`` while ``block.quant_enabled`` is
    False. ``block.fused``: one compiled op does the same arithmetic (``csrc/tq_ops.cc``).
    ``block.input_signed``: whether ``x`` can be negative (the ``onednn`` scheme reads ReLU outputs
    as uint8). ``block.ranges_frozen``: the EMA keeps its value (momentum 1).
    """
    if not block.quant_enabled:
        return x, None
    q = block.spec
    qmin, qmax, divisor = input_grid(block)
    if q.range == "lsq":
        return lsq_input(F, block, x, state, qmin, qmax, divisor, ndim)
    momentum = 1.0 if block.ranges_frozen or block.range_fixed else q.momentum
    if block.fused:
        out = _positional_op(F, "tq_act_quant", [x, state, train_flag(F, state)], momentum=momentum,
                             qmin=qmin, qmax=qmax, divisor=divisor, ste=q.ste)
        return out[0], F.BlockGrad(out[1])
    if block.range_fixed:  # a ReLU6 output: the state is set (> 0) and never moves, no batch max to take
        amax = F.BlockGrad(state)
    else:
        amax = update_range(F, (x,), state, momentum)
    scale = F.where(amax > 0, amax, F.ones_like(amax)) / divisor
    return quant.fake_quant(F, x, F.reshape(scale, (1,) * ndim), qmin, qmax, q.ste), scale


def input_grid(block: gluon.HybridBlock) -> tuple:
    """``(qmin, qmax, divisor)`` of a quantized block's input (``quant.act_grid`` of its spec and sign;
    learned ranges use the unsigned grid on ReLU outputs)."""
    q = block.spec
    return quant.act_grid(q.act_bits, q.scheme, block.input_signed, q.range == "lsq")


def lsq_input(F: Any, block: gluon.HybridBlock, x: Any, state: Any, qmin: int, qmax: int, divisor: float,
              ndim: int) -> tuple:
    """LSQ on a block's input: the range state ``input_max`` is the learned parameter, ``s_a = input_max /
    divisor``; its gradient is scaled by ``g * divisor**2`` (``block.lsq_g = 1 / sqrt(N * qmax)``), which makes
    the update of ``s_a`` the paper's (``d input_max = divisor * d s_a``, ``dL/d input_max = dL/d s_a / divisor``).
    Frozen or fixed ranges get no gradient."""
    amax = F.BlockGrad(state) if block.ranges_frozen or block.range_fixed else state
    a = quant.scale_grad(F, amax, block.lsq_g * divisor * divisor)
    return lsq_quant(F, block, x, a / divisor, qmin, qmax, 1.0, ndim), F.BlockGrad(state / divisor)


def lsq_quant(F: Any, block: gluon.HybridBlock, x: Any, step: Any, qmin: int, qmax: int, g: float, ndim: int) -> Any:
    """``quant.lsq_fake_quant`` of ``x`` (``ndim`` dimensions) with ``step`` of shape (1,) or (x.shape[0],)
    (per output channel); ``block.fused``: one compiled op (``tq_lsq_quant``), the same outputs bit for bit,
    the same gradients up to summation order."""
    if block.fused:
        return _positional_op(F, "tq_lsq_quant", [x, step], qmin=qmin, qmax=qmax, g=repr(float(g)))
    return quant.lsq_fake_quant(F, x, F.reshape(step, (-1,) + (1,) * (ndim - 1)), qmin, qmax, g)


def add_range_state(block: gluon.HybridBlock, spec: QuantSpec) -> None:
    """Give ``block`` what a quantized input needs: its ``spec``, the range state ``input_max`` (a
    parameter, saved with the checkpoint, no gradient), the quantizer choice, ``input_signed`` (True
    until ``convert`` marks the input as a ReLU output) and the runtime switches ``quant_enabled``
    (False: float with the BN fold, a quantization delay) and ``ranges_frozen`` (``set_quant_state``);
    ``range_fixed``: the range never learns (the input of a ReLU6 output, set by ``convert``)."""
    block.spec = spec
    block.fused = use_fused(spec)
    block.input_signed = True
    block.quant_enabled, block.ranges_frozen, block.range_fixed = True, False, False
    block.lsq_g = 1.0  # LSQ gradient scale of the input range, set from the input's size (set_lsq_scales)
    learned = spec.range == "lsq"
    block.input_max = block.params.get("input_max", shape=(1,), init="zeros", grad_req="write" if learned else "null",
                                       differentiable=learned)


def quantize_weights(F: Any, block: gluon.HybridBlock, w_f: Any, b_f: Any, s_a: Any, ndim: int,
                     weight_step: Optional[Any] = None) -> tuple:
    """Fake-quantized ``(w_q, b_q)``: narrow symmetric weights, bias on the int32 grid. Learned ranges
    (``weight_step``, per channel or per tensor): LSQ with ``g = 1 / sqrt(N * qmax)``, N the weights of
    a channel or of the layer."""
    if not block.quant_enabled:
        return w_f, b_f
    q = block.spec
    qmin, qmax, divisor = quant.weight_grid(q.weight_bits, q.scheme)
    if weight_step is not None:
        n = int(np.prod(block.weight.shape)) // (block.weight.shape[0] if q.per_channel else 1)
        w_q = lsq_quant(F, block, w_f, weight_step, qmin, qmax, 1.0 / math.sqrt(n * qmax), ndim)
        s_w = F.reshape(weight_step, (-1,) + (1,) * (ndim - 1))
        return w_q, quant.fake_quant_bias(F, b_f, F.BlockGrad(s_w), s_a, q.ste)
    s_w, mult = quant.weight_scales(F, w_f, divisor, q.per_channel, ndim, q.mxnet_arithmetic)
    return (quant.fake_quant(F, w_f, s_w, qmin, qmax, q.ste, multiplier=mult),
            quant.fake_quant_bias(F, b_f, s_w, s_a, q.ste))


def fold_and_quantize(F: Any, block: gluon.HybridBlock, weight: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                      s_a: Any, weight_step: Optional[Any] = None) -> tuple:
    """BN fold (``quant.fold_bn``) then ``quantize_weights``: ``(w_q, b_q)``. ``block.fused`` with EMA
    ranges and quantization on: one compiled op over the weights (``tq_weight_quant`` in
    ``csrc/tq_ops.cc``), bit-identical outputs, the same gradients up to summation order."""
    q = block.spec
    if block.fused and block.quant_enabled and weight_step is None:
        qmin, qmax, divisor = quant.weight_grid(q.weight_bits, q.scheme)
        out = _positional_op(F, "tq_weight_quant", [weight, gamma, beta, mean, var, s_a], qmin=qmin, qmax=qmax,
                             divisor=divisor, eps=BN_EPS, bias_qmax=quant.BIAS_QMAX,
                             per_channel=int(q.per_channel), mxnet_arithmetic=int(q.mxnet_arithmetic), ste=q.ste)
        return out[0], out[1]
    w_f, b_f = quant.fold_bn(F, weight, None, gamma, beta, mean, var, BN_EPS, inv_in_float64=q.mxnet_arithmetic)
    return quantize_weights(F, block, w_f, b_f, s_a, 4, weight_step)


class Conv2DBN(gluon.HybridBlock):
    """Float convolution (no bias; ``groups`` > 1: grouped, ``groups == channels``: depthwise),
    BatchNorm, optional ReLU."""

    def __init__(self, channels: int, in_channels: int, kernel: int = 3, padding: int = 1,
                 relu: bool = True, stride: int = 1, groups: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.channels, self.in_channels, self.kernel, self.padding, self.relu, self.stride = (
            channels, in_channels, kernel, padding, relu, stride)
        self.groups = groups
        self.weight = self.params.get("weight", shape=(channels, in_channels // groups, kernel, kernel),
                                      init=mx.init.Xavier(magnitude=2.0))
        self.gamma = self.params.get("gamma", shape=(channels,), init="ones")
        self.beta = self.params.get("beta", shape=(channels,), init="zeros")
        self.running_mean = self.params.get("running_mean", shape=(channels,), init="zeros",
                                            grad_req="null", differentiable=False)
        self.running_var = self.params.get("running_var", shape=(channels,), init="ones",
                                           grad_req="null", differentiable=False)

    def _conv(self, F: Any, x: Any, w: Any, b: Optional[Any] = None) -> Any:
        return F.Convolution(x, w, b, kernel=(self.kernel,) * 2, pad=(self.padding,) * 2, stride=(self.stride,) * 2,
                             num_filter=self.channels, num_group=self.groups, no_bias=b is None)

    def hybrid_forward(self, F: Any, x: Any, weight: Any, gamma: Any, beta: Any,
                       running_mean: Any, running_var: Any) -> Any:
        y = F.BatchNorm(self._conv(F, x, weight), gamma, beta, running_mean, running_var,
                        eps=BN_EPS, momentum=BN_MOMENTUM, fix_gamma=False)
        return F.Activation(y, act_type="relu") if self.relu else y


class QConv2DBN(Conv2DBN):
    r"""Conv2D + BatchNorm folded and fake-quantized (Jacob et al. 2018, section 3.2).

    With the BatchNorm running statistics :math:`\mu, \sigma^2` (frozen mode)::

        w_f = w * gamma / sqrt(var + eps)            (per output channel)
        b_f = beta - mean * gamma / sqrt(var + eps)
        y   = conv(fq_a(x), fq_w(w_f)) + fq_b(b_f)    then ReLU

    ``fq_w``: symmetric, narrow range, scale ``max|w_f| / (2**(b-1) - 1)`` per tensor or per
    channel; ``fq_a``: see ``quantize_input``. The fold is in the graph, so the gradient
    reaches ``w``, ``gamma`` and ``beta`` through it.

    ``bn_mode="paper"`` (Krishnamoorthi 2018, section 3.2.1), until ``freeze_bn()``: training
    batches normalize with their own statistics while the weights are still folded with the
    running ones, via the correction ``sigma / sigma_B``::

        c = conv(fq_a(x), fq_w(w_f))                 w_f folded with running sigma
        y = BatchNorm_batch(c * sigma / gamma)       = c * sigma / sigma_B + beta - gamma * mu_B / sigma_B

    (the batch statistics are those of the quantized-weight output), and the running
    statistics keep updating. Evaluation, and training after ``freeze_bn()``, use ``c + fq_b(b_f)``.
    """

    def __init__(self, channels: int, in_channels: int, spec: QuantSpec, kernel: int = 3,
                 padding: int = 1, relu: bool = True, stride: int = 1, groups: int = 1, **kwargs: Any):
        super().__init__(channels, in_channels, kernel, padding, relu, stride, groups, **kwargs)
        self.bn_frozen = spec.bn_mode == "frozen"
        add_range_state(self, spec)
        if self.bn_frozen and not spec.train_bn_affine:
            self.gamma.grad_req = self.beta.grad_req = "null"

    def freeze_bn(self) -> None:
        """Switch paper mode to running statistics for good (call ``hybridize()`` again)."""
        self.bn_frozen = True

    def hybrid_forward(self, F: Any, x: Any, weight: Any, gamma: Any, beta: Any, running_mean: Any,
                       running_var: Any, input_max: Any, weight_step: Optional[Any] = None) -> Any:
        xq, s_a = quantize_input(F, self, x, input_max, ndim=4)
        w_q, b_q = fold_and_quantize(F, self, weight, gamma, beta, running_mean, running_var, s_a, weight_step)
        if self.bn_frozen:
            y = self._conv(F, xq, w_q, b_q)
        else:
            c = self._conv(F, xq, w_q)
            sigma = F.sqrt(running_var + BN_EPS)
            g_safe = F.where(F.abs(gamma) > 1e-12, gamma, F.ones_like(gamma) * 1e-12)
            z = F.broadcast_mul(c, F.reshape(F.BlockGrad(sigma) / g_safe, (1, -1, 1, 1)))
            batch = F.BatchNorm(z, gamma, beta, running_mean, running_var, eps=BN_EPS,
                                momentum=BN_MOMENTUM, fix_gamma=False)
            folded = F.broadcast_add(c, F.reshape(b_q, (1, -1, 1, 1)))
            y = F.where(F.broadcast_like(F.reshape(train_flag(F, input_max), (1, 1, 1, 1)), c), batch, folded)
        return F.Activation(y, act_type="relu") if self.relu else y


class QDense(gluon.HybridBlock):
    """Fully connected layer with fake-quantized input and weights (2-D input).

    ``y = fq_a(x) @ fq_w(W).T + fq_b(b)`` (then ReLU if ``relu``); same parameter names as
    ``gluon.nn.Dense`` plus the range state ``input_max``.
    """

    def __init__(self, units: int, in_units: int, spec: QuantSpec, relu: bool = False, flatten: bool = False,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.units, self.in_units, self.relu, self.flatten = units, in_units, relu, flatten
        self.weight = self.params.get("weight", shape=(units, in_units), init=None)
        self.bias = self.params.get("bias", shape=(units,), init="zeros")
        add_range_state(self, spec)

    def hybrid_forward(self, F: Any, x: Any, weight: Any, bias: Any, input_max: Any,
                       weight_step: Optional[Any] = None) -> Any:
        if self.flatten:
            x = F.flatten(x)
        xq, s_a = quantize_input(F, self, x, input_max, ndim=2)
        w_q, b_q = quantize_weights(F, self, weight, bias, s_a, 2, weight_step)
        y = F.FullyConnected(xq, w_q, b_q, num_hidden=self.units, flatten=False)
        return F.Activation(y, act_type="relu") if self.relu else y


class QConv2D(gluon.HybridBlock):
    """Convolution without a BatchNorm after it (e.g. a classifier head), fake-quantized like ``QDense``:
    ``y = conv(fq_a(x), fq_w(W)) + fq_b(b)`` (then ReLU if ``relu``). Same parameter names as
    ``gluon.nn.Conv2D`` (``weight``, ``bias`` when it has one) plus the range state ``input_max``."""

    def __init__(self, channels: int, in_channels: int, spec: QuantSpec, kernel: int = 1, padding: int = 0,
                 stride: int = 1, groups: int = 1, use_bias: bool = False, relu: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.channels, self.in_channels, self.kernel, self.padding, self.stride, self.groups = (
            channels, in_channels, kernel, padding, stride, groups)
        self.relu, self.use_bias = relu, use_bias
        self.weight = self.params.get("weight", shape=(channels, in_channels // groups, kernel, kernel), init=None)
        if use_bias:
            self.bias = self.params.get("bias", shape=(channels,), init="zeros")
        add_range_state(self, spec)

    def hybrid_forward(self, F: Any, x: Any, weight: Any, input_max: Any, bias: Optional[Any] = None,
                       weight_step: Optional[Any] = None) -> Any:
        xq, s_a = quantize_input(F, self, x, input_max, ndim=4)
        b = bias if bias is not None else F.sum(F.zeros_like(weight), axis=(1, 2, 3))
        w_q, b_q = quantize_weights(F, self, weight, b, s_a, 4, weight_step)
        y = F.Convolution(xq, w_q, b_q, kernel=(self.kernel,) * 2, pad=(self.padding,) * 2, stride=(self.stride,) * 2,
                          num_filter=self.channels, num_group=self.groups)
        return F.Activation(y, act_type="relu") if self.relu else y


class QAdd(gluon.HybridBlock):
    r"""Quantized residual add (ResNet v1: then ReLU), defined per scheme.

    ``original``: both inputs are fake-quantized with the same scale, learned like a layer input
    from the larger of the two magnitudes::

        input_max <- EMA of max(max|a|, max|b|)          (training only, as in ``update_range``)
        s = input_max / 2**(bits-1)
        y = relu((clip(round(a / s)) + clip(round(b / s))) * s)

    so the sum is exact in integers: two signed codes add to a 9-bit code at scale ``s``.

    ``onednn``: oneDNN fuses the body's last convolution with the add (``conv + sum`` post-op):
    its accumulator joins unrequantized and only the shortcut ``b`` is read as codes, uint8 if
    it is a ReLU output (``input_signed`` False), else int8, on its own learned range::

        input_max <- EMA of max|b|,   y = relu(a + fq(b))

    For an identity shortcut this range is bit-identical to that of the block's first
    convolution (same input, same update), so ``b``'s codes are the ones that layer reads, as
    in oneDNN where both read one uint8 tensor. Every engine defines the add the same way
    (``int8/engine.py``); the next layers requantize the sum to their own input scales.
    """

    def __init__(self, spec: QuantSpec, relu: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.relu = relu
        add_range_state(self, spec)  # onednn: input_signed False when the shortcut is a ReLU output

    def hybrid_forward(self, F: Any, a: Any, b: Any, input_max: Any) -> Any:
        q = self.spec
        if self.quant_enabled and q.scheme == "onednn":
            b, _ = quantize_input(F, self, b, input_max, ndim=4)
        elif self.quant_enabled and q.range == "lsq":  # one learned range for both branches, the export's grid
            qmin, qmax, divisor = input_grid(self)
            a = lsq_input(F, self, a, input_max, qmin, qmax, divisor, 4)[0]
            b = lsq_input(F, self, b, input_max, qmin, qmax, divisor, 4)[0]
        elif self.quant_enabled:
            qmin, qmax, divisor = quant.act_grid(q.act_bits, q.scheme, True)
            momentum = 1.0 if self.ranges_frozen or self.range_fixed else q.momentum
            amax = update_range(F, (a, b), input_max, momentum)
            scale = F.reshape(F.where(amax > 0, amax, F.ones_like(amax)) / divisor, (1, 1, 1, 1))
            a = quant.fake_quant(F, a, scale, qmin, qmax, q.ste)
            b = quant.fake_quant(F, b, scale, qmin, qmax, q.ste)
        y = self._combine(F, a, b)
        return F.Activation(y, act_type="relu") if self.relu else y

    def _combine(self, F: Any, a: Any, b: Any) -> Any:
        return a + b


class QConcat(QAdd):
    """Channel concatenation of two branches on one learned scale (ShuffleNetV2): the add's quantizer,
    ``concat(fq(a), fq(b))`` instead of the sum, so the int8 graph concatenates codes of one grid."""

    def __init__(self, spec: QuantSpec, **kwargs: Any):
        super().__init__(spec, relu=False, **kwargs)

    def _combine(self, F: Any, a: Any, b: Any) -> Any:
        return F.concat(a, b, dim=1)


class QShuffleUnit(gluon.HybridBlock):
    """gluoncv's ``shuffleUnitV2`` with its concatenation quantized: the input split in two halves (or, in a
    downsampling unit, two branches of convolutions of the whole input), ``QConcat``, a channel shuffle
    of 2 groups. The branches keep their names (``branch1_conv``, ``branch2_conv``)."""

    def __init__(self, unit: gluon.HybridBlock, concat: QConcat, **kwargs: Any):
        super().__init__(**kwargs)
        self.split, self.in_channels, self.channels = unit.split, unit.in_channels, 2 * unit.equal_channels
        if not unit.split:
            self.branch1_conv = unit.branch1_conv
        self.branch2_conv, self.concat = unit.branch2_conv, concat

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        if self.split:
            half = self.in_channels // 2
            b1 = F.slice_axis(x, axis=1, begin=0, end=half)
            b2 = self.branch2_conv(F.slice_axis(x, axis=1, begin=half, end=self.in_channels))
        else:
            b1, b2 = self.branch1_conv(x), self.branch2_conv(x)
        y = F.reshape(self.concat(b1, b2), shape=(0, -4, 2, -1, -2))
        return F.reshape(F.swapaxes(y, 1, 2), shape=(0, -3, -2))


class QAvgPool(gluon.HybridBlock):
    """Global average pooling of fake-quantized input (the ``onednn`` scheme; ``convert`` puts it in
    place of ``GlobalAvgPool2D``): ``y = mean_hw(fq(x))`` with ``x``'s own learned range.

    oneDNN hands the last block's output to the pooling as codes (uint8 after a ReLU) on one range;
    the pooling runs in float on their values and the next layer quantizes the mean at its own input
    range. This block learns that range, so the graph computes what the int8 network computes.
    """

    def __init__(self, spec: QuantSpec, **kwargs: Any):
        super().__init__(**kwargs)
        add_range_state(self, spec)

    def hybrid_forward(self, F: Any, x: Any, input_max: Any) -> Any:
        xq, _ = quantize_input(F, self, x, input_max, ndim=4)
        return F.Pooling(xq, kernel=(1, 1), global_pool=True, pool_type="avg")


class QPreActResidual(gluon.HybridBlock):
    r"""A pre-activation residual block (ResNet v2, He et al. 2016; gluoncv's ``CIFARBasicBlockV2``) with
    its convolutions quantized::

        y = QAdd(conv2(conv1(relu(bn1(x)))), downsample(x) or x)        no ReLU after the add

    ``conv1`` is a ``QConv2DBN`` (the block's ``bn2`` folded into it, then ReLU), ``conv2`` and
    ``downsample`` are ``QConv2D``. ``bn1`` precedes a convolution, so it cannot fold into one: it stays
    a BatchNorm with its running statistics (frozen, like the folded ones) and the int8 graph runs it as
    a per-channel affine on the add's output (``int8.model.Affine``) whose ReLU'd result ``conv1`` quantizes.
    Children keep the float block's names (``bn1``, ``conv1``, ``conv2``, ``downsample``); the folded
    ``bn2``'s values live in ``conv1``."""

    def __init__(self, bn1: gluon.HybridBlock, conv1: gluon.HybridBlock, conv2: gluon.HybridBlock,
                 downsample: Optional[gluon.HybridBlock], add: "QAdd", **kwargs: Any):
        super().__init__(**kwargs)
        self.bn1, self.conv1, self.conv2, self.downsample, self.add = bn1, conv1, conv2, downsample, add

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        h = self.conv2(self.conv1(F.Activation(self.bn1(x), act_type="relu")))
        return self.add(h, self.downsample(x) if self.downsample is not None else x)


class QResidual(gluon.HybridBlock):
    """A residual block with a quantized add: ``QAdd(body(x), downsample(x) or x)``: a ResNet v1 block
    (gluoncv's ``CIFARBasicBlockV1``, ``BasicBlockV1``, ``BottleneckV1``: ReLU after the add) or a
    MobileNetV2 linear bottleneck (no ReLU). The body keeps its child name (``body_name``: ``body``,
    or ``out`` in gluoncv's ``LinearBottleneck``), so parameter paths stay those of the float block."""

    def __init__(self, body: gluon.HybridBlock, downsample: Optional[gluon.HybridBlock], add: QAdd,
                 body_name: str = "body", **kwargs: Any):
        super().__init__(**kwargs)
        self.body_name = body_name
        self.register_child(body, body_name)
        self.downsample, self.add = downsample, add

    @property
    def body(self) -> gluon.HybridBlock:
        return self._children[self.body_name]

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.add(self.body(x), self.downsample(x) if self.downsample is not None else x)


class ReLU6(gluon.HybridBlock):
    """``min(max(x, 0), 6)``, the value and gradient of gluoncv's ``ReLU6`` (MXNet's ``clip``; the gradient
    passes on ``[0, 6]``), with the compiled ``tq_relu6`` when it loads (``fused.available()``): ``clip``
    branches per element and a ReLU6's half-negative inputs make it about 3x a pass over memory, most of
    a MobileNetV2 training step. ``fast`` False runs ``clip`` (``stock_relu6``)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        from . import fused

        self.fast = fused.available()

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return _positional_op(F, "tq_relu6", [x]) if self.fast else F.clip(x, 0, 6, name="relu6")


def compiled_relu6(net: gluon.Block) -> gluon.Block:
    """Replace every gluoncv ``ReLU6`` in ``net`` (before it is hybridized) by ``ReLU6`` (same name, no
    parameters); returns ``net``."""
    from gluoncv.nn import ReLU6 as GluonCVReLU6

    def walk(block: gluon.Block) -> None:
        for key, child in list(block._children.items()):
            if type(child) is GluonCVReLU6:
                new = ReLU6(prefix=child.prefix)
                block._children[key] = new
                for attr, value in list(vars(block).items()):
                    if value is child:
                        block.__dict__[attr] = new
            else:
                walk(child)

    walk(net)
    return net


def _clear_graphs(net: gluon.Block) -> None:
    net.apply(lambda b: b._clear_cached_op() if isinstance(b, gluon.HybridBlock) else None)


@contextlib.contextmanager
def stock_relu6(net: gluon.Block) -> Iterator[None]:
    """Inside: every ``ReLU6`` runs MXNet's ``clip``, so that a graph exported from ``net`` holds MXNet
    operators only (oneDNN's quantization pass fuses ``clip`` into the convolution; the ONNX exporter maps
    it to ``Clip``). The cached graphs are rebuilt on both sides."""
    fast: list = []
    net.apply(lambda b: fast.append(b) if isinstance(b, ReLU6) and b.fast else None)
    for b in fast:
        b.fast = False
    _clear_graphs(net)
    try:
        yield
    finally:
        for b in fast:
            b.fast = True
        _clear_graphs(net)


def dense(units: int, in_units: int, relu: bool) -> nn.Dense:
    """Float Dense with the parameter names ``QDense`` uses."""
    return nn.Dense(units, activation="relu" if relu else None, in_units=in_units, flatten=False)


def quantized_layers(net: gluon.Block, weights_only: bool = False) -> list:
    """All blocks of ``net`` with an activation range (``QConv2DBN``, ``QConv2D``, ``QDense``, ``QAdd``,
    ``QAvgPool``) in registration order, with their structural names; ``weights_only``: the first three."""
    kinds = (QConv2DBN, QConv2D, QDense) if weights_only else (QConv2DBN, QConv2D, QDense, QAdd, QAvgPool)
    out = []

    def walk(block: gluon.Block, prefix: str) -> None:
        for name, child in block._children.items():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, kinds):
                out.append((path, child))
            walk(child, path)

    walk(net, "")
    return out


def range_input(block: gluon.Block, inputs: tuple) -> Any:
    """The values a layer's range covers: its input, or both inputs of a ``QAdd`` (flattened; the
    ``onednn`` scheme's add covers its shortcut only)."""
    if isinstance(block, QAdd) and block.spec.scheme == "onednn":
        return inputs[1]
    if isinstance(block, QAdd):
        return mx.nd.concat(inputs[0].reshape((-1,)), inputs[1].reshape((-1,)), dim=0)
    return inputs[0]


def visit_layer_inputs(net: gluon.HybridBlock, loader: gluon.data.DataLoader, norm: Any, ctx: mx.Context,
                       batches: int, fn: Any) -> None:
    """Run ``batches`` evaluation batches through ``net`` and call ``fn(name, block, x)`` with the input
    ``x`` of every quantized layer (``range_input``). Forward hooks fire on imperative children only,
    so the network runs un-hybridized here and is hybridized again afterwards."""
    net.hybridize(active=False)
    hooks = [layer.register_forward_pre_hook(
        lambda block, inputs, name=name: fn(name, block, range_input(block, inputs)))
        for name, layer in quantized_layers(net)]
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            net(norm(x.as_in_context(ctx)))
    finally:
        for h in hooks:
            h.detach()
        net.hybridize(static_alloc=True)


def set_layer_widths(net: gluon.Block, q: QuantConfig) -> None:
    """Give each quantized layer its spec (``q.spec`` at the layer's widths).

    Order of precedence: ``q.layer_bits[path]``, then ``q.first_last_bits`` for the first and
    the last quantized layer (the network input's and the logits' layers) and ``q.add_bits`` for
    the residual adds, then the global ``q.weight_bits``/``q.act_bits``. Call before ``hybridize()``.
    """
    layers = quantized_layers(net)
    paths = [p for p, _ in layers]
    unknown = sorted(set(q.layer_bits) - set(paths))
    if unknown:
        raise UserError(f"config key 'quant.layer_bits' names unknown layers {unknown}; "
                        f"quantized layers are {paths}")
    weighted = [p for p, _ in quantized_layers(net, weights_only=True)]
    ends = {weighted[0], weighted[-1]} if weighted else set()
    for path, block in layers:
        wb, ab = q.weight_bits, q.act_bits
        if q.first_last_bits and path in ends:
            wb = ab = q.first_last_bits
        if q.add_bits and isinstance(block, QAdd):
            ab = q.add_bits
        wb, ab = q.layer_bits.get(path, (wb, ab))
        block.spec = q.spec(wb, ab, grouped=getattr(block, "groups", 1) > 1)


def set_quant_state(net: gluon.Block, enabled: Optional[bool] = None, freeze_ranges: Optional[bool] = None) -> None:
    """Switch fake quantization on/off (quantization delay) or stop the range EMA in every quantized
    layer (block state, not config). Call ``hybridize()`` after."""
    for _, block in quantized_layers(net):
        if enabled is not None:
            block.quant_enabled = enabled
        if freeze_ranges is not None:
            block.ranges_frozen = freeze_ranges


def init_weight_steps(net: gluon.Block, lsq_init: bool = False) -> None:
    """Learned ranges: give every weighted quantized layer a trainable ``weight_step`` (per output channel
    or one), initialized at ``max|w_f| / qmax`` (what the max scale would use; 1 for an all-zero channel),
    or with ``lsq_init`` at LSQ's own ``2 mean|w_f| / sqrt(Q_P)`` (``quant.lsq_init_step``)."""
    for _, block in quantized_layers(net, weights_only=True):
        q = block.spec
        if q.range != "lsq":
            continue
        w = block.weight.data()
        if isinstance(block, QConv2DBN):
            w, _ = quant.fold_bn(mx.nd, w, None, block.gamma.data(), block.beta.data(), block.running_mean.data(),
                                 block.running_var.data(), BN_EPS)
        _, qmax, divisor = quant.weight_grid(q.weight_bits, q.scheme)
        if lsq_init:
            step = quant.lsq_init_step(w.asnumpy(), qmax, 0 if q.per_channel else None).reshape((-1,))
            step = mx.nd.array(step.astype(np.float32), ctx=w.context)
        else:
            step = quant.weight_scale(mx.nd, w, divisor, q.per_channel, w.ndim).reshape((-1,))
        if getattr(block, "weight_step", None) is not None and block.weight_step._data is not None:
            block.weight_step.set_data(step)
            continue
        block.weight_step = block.params.get("weight_step", shape=step.shape, init="ones", differentiable=True)
        block.weight_step._load_init(step, block.weight.list_ctx())


def set_lsq_scales(net: gluon.HybridBlock, loader: gluon.data.DataLoader, norm: Any, ctx: mx.Context) -> None:
    """Learned ranges: each input range's gradient scale ``1 / sqrt(N * qmax)`` from one batch (N: the
    elements of one sample's input; a residual add: of one branch)."""
    seen: dict = {}

    def record(name: str, block: Any, x: Any) -> None:
        if x.ndim > 1:  # a layer's input: (batch, ...); a residual add's two branches come flattened
            seen["batch"] = x.shape[0]
        n = x.size / seen["batch"] / (1 if x.ndim > 1 else 2)
        block.lsq_g = 1.0 / math.sqrt(max(n, 1.0) * input_grid(block)[1])

    layers = [b for _, b in quantized_layers(net) if b.spec.range == "lsq"]
    if layers:
        visit_layer_inputs(net, loader, norm, ctx, 1, record)


@contextlib.contextmanager
def ema_ranges(net: gluon.HybridBlock) -> Iterator[None]:
    """Learned-range layers follow the EMA of the batch maximum inside the block (calibration: LSQ starts
    from the EMA range); other layers are unchanged."""
    learned = [(b, b.spec) for _, b in quantized_layers(net) if b.spec.range == "lsq"]
    for b, spec in learned:
        b.spec = dataclasses.replace(spec, range="ema")
    if learned:
        net.hybridize(static_alloc=True)
    try:
        yield
    finally:
        for b, spec in learned:
            b.spec = spec
        if learned:
            net.hybridize(static_alloc=True)
