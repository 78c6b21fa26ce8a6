"""The compiled quantizer and its stock-MXNet fallback compute the same thing."""
from __future__ import annotations

import dataclasses

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from train_quantization import fused
from train_quantization.config import ModelConfig, QuantConfig
from train_quantization.layers import quantized_layers
from train_quantization.models import build_model

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused operator could not be built here")


@pytest.mark.parametrize("ste", ["plain", "clipped"])
def test_fused_and_stock_paths_agree(tmp_path, ste):
    """From the same weights and states: outputs and updated ranges bit-identical at each of 4
    training steps, gradients equal to 1e-5."""
    q = QuantConfig(ste=ste)
    nets = {}
    for kernel in ("fused", "stock"):
        net = build_model(ModelConfig(width=0.125, dropout=0.0), 10, 3, 16,
                          dataclasses.replace(q, kernel=kernel))
        assert all(layer.fused == (kernel == "fused") for _, layer in quantized_layers(net))
        nets[kernel] = net
    nets["stock"].initialize(mx.init.Xavier())
    nets["stock"](mx.nd.zeros((1, 3, 16, 16)))
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
        assert r["fused"] == r["stock"]
    x = mx.nd.array(rng.standard_normal((8, 3, 16, 16)), dtype="float32")
    assert np.array_equal(nets["fused"](x).asnumpy(), nets["stock"](x).asnumpy())  # evaluation
