"""The compiled quantizer and its stock-MXNet fallback compute the same thing."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from train_quantization import fused
from train_quantization.config import ModelConfig, QuantConfig
from train_quantization.layers import quantized_layers
from train_quantization.models import build_model

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused operator could not be built here")


@pytest.mark.parametrize("arch,ste,rng_", [("vgg16", "plain", "ema"), ("vgg16", "clipped", "ema"),
                                           ("mobilenetv2_cifar", "plain", "ema"), ("vgg16", "plain", "lsq"),
                                           ("mobilenetv2_cifar", "plain", "lsq")])
def test_fused_and_stock_paths_agree(tmp_path, arch, ste, rng_):
    """From the same weights and states: outputs bit-identical at each of 4 training steps, gradients
    equal to 1e-5, updated EMA ranges bit-identical (learned ones: to 1e-6). The stock graph takes the batch
    max from oneDNN's ``quantize_v2`` and skips it on ReLU6 outputs (fixed ranges); the compiled op does
    neither."""
    q = QuantConfig(ste=ste, range=rng_, per_channel=rng_ == "lsq")
    nets = {}
    for kernel in ("fused", "stock"):
        net = build_model(ModelConfig(arch=arch, width=0.125 if arch == "vgg16" else 0.25, dropout=0.0), 10, 3, 16,
                          dataclasses.replace(q, kernel=kernel))
        assert all(layer.fused == (kernel == "fused") for _, layer in quantized_layers(net))
        nets[kernel] = net
    nets["stock"].initialize(mx.init.Xavier())
    nets["stock"](mx.nd.zeros((1, 3, 16, 16)))
    for _, layer in quantized_layers(nets["stock"]):
        if rng_ == "lsq" and not layer.range_fixed:  # learned ranges start where calibration would put them
            layer.input_max.set_data(mx.nd.array([3.0]))
    nets["stock"].save_parameters(str(tmp_path / "p.params"))
    nets["fused"].load_parameters(str(tmp_path / "p.params"))
    rng = np.random.default_rng(0)
    trainers = {}
    for net in nets.values():
        net.hybridize(static_alloc=True)
    for k, net in nets.items():
        trainers[k] = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(4):
        x = mx.nd.array(rng.standard_normal((16, 3, 16, 16)) * (1 + step), dtype="float32")
        y = mx.nd.array(rng.integers(0, 10, 16))
        outs, grads = {}, {}
        # same weights and range states at every step; the gradients differ in rounding only
        nets["stock"].save_parameters(str(tmp_path / "p.params"))
        nets["fused"].load_parameters(str(tmp_path / "p.params"))
        for k, net in nets.items():
            with autograd.record():
                out = net(x)
                loss = loss_fn(out, y)
            loss.backward()
            outs[k] = out.asnumpy()
            grads[k] = {n: p.grad().asnumpy() for n, p in net._collect_params_with_prefix().items()
                        if p.grad_req != "null"}
            trainers[k].step(16)
        assert np.array_equal(outs["fused"], outs["stock"])
        for (n1, g1), (n2, g2) in zip(sorted(grads["fused"].items()), sorted(grads["stock"].items())):
            # not bitwise: the stock graph sums gradient contributions in another order
            assert np.allclose(g1, g2, rtol=1e-5, atol=1e-6), n1
        r = {k: [la.input_max.data().asscalar() for _, la in quantized_layers(net)] for k, net in nets.items()}
        if rng_ == "lsq":
            np.testing.assert_allclose(r["fused"], r["stock"], rtol=1e-6)
        else:
            assert r["fused"] == r["stock"]
    x = mx.nd.array(rng.standard_normal((8, 3, 16, 16)), dtype="float32")
    assert np.array_equal(nets["fused"](x).asnumpy(), nets["stock"](x).asnumpy())  # evaluation


def _weight_case(seed: int, channels: int = 6):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 4, 3, 3)).astype(np.float32) * rng.uniform(0.01, 2, (channels, 1, 1, 1))
    w[1] = 0.0  # an all-zero channel: scale 1, codes 0
    w[2, 0, 0, 0] = -np.abs(w[2]).max() * 1.5  # -max|w_f| of its channel sits on the lower bound
    gamma = rng.uniform(0.2, 2.0, channels).astype(np.float32)
    gamma[3] = 0.0  # a dead BN channel folds to all-zero weights
    beta, mean = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    var = rng.uniform(0.1, 3.0, channels).astype(np.float32)
    return w, gamma, beta, mean, var, np.array([0.03], np.float32)


@pytest.mark.parametrize("per_channel,scheme,bits,ste", [
    (False, "original", 8, "plain"), (True, "original", 8, "clipped"), (False, "original", 4, "clipped"),
    (True, "original", 2, "plain"), (True, "onednn", 8, "plain"), (True, "onednn", 8, "clipped")])
def test_weight_op_equals_the_stock_graph(per_channel, scheme, bits, ste):
    """tq_weight_quant (BN fold + weight and bias fake quantization) gives the stock graph's w_q and b_q
    bit for bit, and its gradients to 1e-6 of the stock graph's."""
    from types import SimpleNamespace

    from train_quantization.config import QuantSpec
    from train_quantization.layers import fold_and_quantize

    spec = QuantSpec(weight_bits=bits, per_channel=per_channel, scheme=scheme, ste=ste)
    arrays = [mx.nd.array(a) for a in _weight_case(bits)]
    rng = np.random.default_rng(1)
    heads = [mx.nd.array(rng.standard_normal(a.shape).astype(np.float32)) for a in arrays[:2]]
    res = {}
    for fused_op in (True, False):
        block = SimpleNamespace(spec=spec, fused=fused_op, quant_enabled=True)
        inputs = [a.copy() for a in arrays]
        for a in inputs[:3]:
            a.attach_grad()
        with autograd.record():
            w_q, b_q = fold_and_quantize(mx.nd, block, *inputs)
        autograd.backward([w_q, b_q], heads)
        res[fused_op] = [w_q.asnumpy(), b_q.asnumpy()] + [a.grad.asnumpy() for a in inputs[:3]]
    for name, a, b in zip(("w_q", "b_q"), res[True][:2], res[False][:2]):
        assert np.array_equal(a, b), name
    for name, a, b in zip(("dw", "dgamma", "dbeta"), res[True][2:], res[False][2:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_op_against_a_float64_reference(per_channel):
    """Codes from a float64 fold and scale; gradients the straight-through fold's: dw = g * inv,
    dbeta = g_b, dgamma = (sum g * w - g_b * mean) / sqrt(var + eps)."""
    w, gamma, beta, mean, var, s_a = _weight_case(5)
    args = dict(qmin=-127, qmax=127, divisor=127.0, eps=1e-5, bias_qmax=2**22, per_channel=int(per_channel),
                mxnet_arithmetic=0, ste="plain")
    inputs = [mx.nd.array(a) for a in (w, gamma, beta, mean, var, s_a)]
    for a in inputs[:3]:
        a.attach_grad()
    g, g_b = np.random.default_rng(2).standard_normal(w.shape), np.random.default_rng(3).standard_normal(6)
    with autograd.record():
        w_q, b_q = mx.nd.tq_weight_quant(*inputs, **args)
    autograd.backward([w_q, b_q], [mx.nd.array(g), mx.nd.array(g_b)])
    inv = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    w_f = w * inv[:, None, None, None]
    m = np.abs(w_f).max(axis=(1, 2, 3), keepdims=True) if per_channel else np.abs(w_f).max() + 0 * w_f[:, :1, :1, :1]
    s_w = np.where(m > 0, m / 127.0, 1.0)
    codes = w_q.asnumpy() / s_w
    assert np.abs(codes - np.rint(w_f / s_w)).max() < 1e-3 and np.abs(np.rint(codes)).max() == 127
    assert not codes[1].any() and not codes[3].any()
    b_codes = b_q.asnumpy() / (s_w.reshape(-1) * s_a[0])
    assert np.abs(b_codes - np.rint((beta - mean * inv) / (s_w.reshape(-1) * s_a[0]))).max() < 1e-2
    np.testing.assert_allclose(inputs[0].grad.asnumpy(), g * inv[:, None, None, None], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(inputs[2].grad.asnumpy(), g_b, rtol=1e-6)
    dgamma = ((g * w).sum(axis=(1, 2, 3)) - g_b * mean) / np.sqrt(var.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(inputs[1].grad.asnumpy(), dgamma, rtol=1e-5, atol=1e-6)


def test_compiled_relu6_is_clip_bit_for_bit():
    """tq_relu6 against MXNet's clip(x, 0, 6): the same values and gradients on the bounds (0, -0, 6 pass the
    gradient), just outside them and in between; a MobileNetV2 step equal with either, and the exported
    graph holds clip."""
    x = mx.nd.array([-1.0, -0.0, 0.0, 0.125, 2.5, 6.0, 6.0000005, 7.0, -1e-7])
    dy = mx.nd.arange(1, 10)
    out = {}
    for name, op in (("clip", lambda v: mx.nd.clip(v, 0, 6)), ("tq", mx.nd.tq_relu6)):
        v = x.copy()
        v.attach_grad()
        with autograd.record():
            y = op(v)
        y.backward(dy)
        out[name] = (y.asnumpy(), v.grad.asnumpy())
    assert out["tq"][0].tolist() == [0.0, -0.0, 0.0, 0.125, 2.5, 6.0, 6.0, 6.0, 0.0]
    assert np.signbit(out["tq"][0][1]) and out["tq"][1].tolist() == [0, 2, 3, 4, 5, 6, 0, 0, 0]
    np.testing.assert_array_equal(out["tq"][0], out["clip"][0])
    np.testing.assert_array_equal(out["tq"][1], out["clip"][1])

    from gluoncv.nn import ReLU6 as GluonCVReLU6

    from train_quantization.layers import ReLU6, stock_relu6
    from train_quantization.models import CIFARMobileNetV2

    before: list = []
    CIFARMobileNetV2(0.25).apply(lambda b: before.append(b) if isinstance(b, GluonCVReLU6) else None)
    net = build_model(ModelConfig(arch="mobilenetv2_cifar", width=0.25), 10, 3, 16)
    relus: list = []
    net.apply(lambda b: relus.append(b) if isinstance(b, (ReLU6, GluonCVReLU6)) else None)
    assert len(relus) == len(before) > 30 and all(type(b) is ReLU6 and b.fast for b in relus)
    net.hybridize(static_alloc=True)
    xb = mx.nd.array(np.random.default_rng(0).normal(size=(4, 3, 16, 16)))
    grads = []
    for stock in (False, True):
        with stock_relu6(net) if stock else contextlib.nullcontext():
            with autograd.record():
                loss = net(xb).sum()
            loss.backward()
            grads.append([p.grad().asnumpy().copy() for p in net.collect_params().values() if p.grad_req != "null"])
            ops = {n["op"] for n in json.loads(net._cached_graph[1].tojson())["nodes"]}
            assert ("clip" in ops, "tq_relu6" in ops) == (stock, not stock)
    assert all(b.fast for b in relus)
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("per_channel,bits", [(False, 2), (True, 3), (True, 4), (False, 8)])
def test_lsq_op_equals_the_stock_graph_and_a_float64_reference(per_channel, bits):
    """tq_lsq_quant against quant.lsq_fake_quant: y and dx bit for bit; the step's gradient against
    ``g * sum(dy * lsq_grad_np(x / s))`` in float64 to 1e-6 of ``g * sum|dy|`` (the stock graph sums in
    float32: to 1e-4 of it)."""
    from train_quantization import quant

    rng = np.random.default_rng(bits)
    qmin, qmax = quant.qrange(bits, narrow=True)
    x = (rng.standard_normal((8, 5, 7, 9)) * rng.uniform(0.1, 3, (8, 1, 1, 1))).astype(np.float32)
    step = rng.uniform(0.05, 0.5, 8 if per_channel else 1).astype(np.float32)
    x[0, 0, 0, :3] = np.array([qmin, qmax, 0.5], np.float32) * step[0]  # on both bounds, a tie
    x[1, 0, 0, 0] = -0.0
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = 0.37
    res = {}
    for name, fn in (("op", lambda v, s: mx.nd.tq_lsq_quant(v, s, qmin=qmin, qmax=qmax, g=g)),
                     ("stock", lambda v, s: quant.lsq_fake_quant(mx.nd, v, s.reshape((-1, 1, 1, 1)), qmin, qmax, g))):
        xs, ss = mx.nd.array(x), mx.nd.array(step)
        xs.attach_grad()
        ss.attach_grad()
        with autograd.record():
            y = fn(xs, ss)
        y.backward(mx.nd.array(dy))
        res[name] = y.asnumpy(), xs.grad.asnumpy(), ss.grad.asnumpy()
    np.testing.assert_array_equal(res["op"][0], res["stock"][0])
    np.testing.assert_array_equal(res["op"][1], res["stock"][1])
    s64 = step.astype(np.float64).reshape(-1, 1, 1, 1)
    codes = res["op"][0] / s64
    assert np.abs(codes - np.rint(codes)).max() < 1e-5
    ref_codes = np.clip(np.rint(x / step.reshape(-1, 1, 1, 1)), qmin, qmax)  # half to even
    assert np.array_equal(np.rint(codes), ref_codes) and ref_codes.min() == qmin and ref_codes[0, 0, 0, 2] == 0
    axes = (1, 2, 3) if per_channel else (0, 1, 2, 3)
    u32 = x / step.reshape(-1, 1, 1, 1)  # the quantizer's float32 x / s decides inside or at a bound
    ref = g * (dy * quant.lsq_grad_np(u32, 1.0, qmin, qmax)).sum(axis=axes)
    spread = g * np.abs(dy).sum(axis=axes)
    assert np.abs(res["op"][2] - ref).max() <= 1e-6 * spread.max()
    assert np.abs(res["stock"][2] - ref).max() <= 1e-4 * spread.max()
    np.testing.assert_allclose(res["op"][1], np.where((u32 >= qmin) & (u32 <= qmax), dy, 0.0), rtol=1e-6)
