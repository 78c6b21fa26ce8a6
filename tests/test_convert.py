"""convert(): any Gluon model to quantized blocks, by value; gluoncv's cifar_resnet20_v1 end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from conftest import ROOT
from train_quantization.config import ModelConfig, QuantConfig
from train_quantization.convert import convert
from train_quantization.errors import UserError
from train_quantization.layers import QConv2DBN, QDense, quantized_layers
from train_quantization.models import build_model


def _x(n=4, size=32):
    return mx.nd.array(np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32))


def test_resnet20_converts_by_value():
    net = build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32)
    for p in net.collect_params().values():  # non-trivial BN statistics, so the fold matters
        if p.name.endswith(("running_mean", "running_var", "gamma", "beta")):
            p.set_data(mx.nd.array(np.random.default_rng(1).uniform(0.5, 1.5, p.shape).astype(np.float32)))
    x = _x()
    ref = net(x).asnumpy()
    q = convert(net, QuantConfig(enabled=False))  # quantization off: the BN fold alone
    layers = quantized_layers(q)
    assert sum(isinstance(b, QConv2DBN) for _, b in layers) == 21 and isinstance(layers[-1][1], QDense)
    assert [b.stride for n, b in layers if n.endswith("downsample.0")] == [2, 2]
    assert not any(isinstance(c, nn.BatchNorm) for _, b in q._children.items() for c in b._children.values())
    q.hybridize()
    np.testing.assert_allclose(q(x).asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_rules_on_a_custom_block():
    class Net(nn.HybridBlock):
        def __init__(self):
            super().__init__()
            self.pre = nn.BatchNorm()  # no conv before it: stays float
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(4, 3, padding=1, use_bias=True), nn.BatchNorm(), nn.Activation("relu"),
                          nn.Conv2D(4, 1))  # a conv without BatchNorm: stays float
            self.head = nn.Dense(3, activation="relu")

        def hybrid_forward(self, F, x):  # noqa: ANN001
            return self.head(self.body(self.pre(x)))

    net = Net()
    net.initialize()
    x = _x(2, 8)
    net(x)
    for p in net.collect_params().values():
        if "bias" in p.name or "mean" in p.name:
            p.set_data(mx.nd.array(np.full(p.shape, 0.3, np.float32)))
    ref = net(x).asnumpy()
    q = convert(net, QuantConfig(enabled=False))
    assert isinstance(q.pre, nn.BatchNorm) and isinstance(q.head, QDense) and q.head.relu
    kinds = [type(c).__name__ for c in q.body._children.values()]
    assert kinds == ["QConv2DBN", "Activation", "Conv2D"]
    np.testing.assert_allclose(q(x).asnumpy(), ref, rtol=1e-5, atol=1e-5)  # conv bias folded exactly
    fresh = Net()
    with pytest.raises(UserError, match="run one forward pass first"):
        convert(fresh, QuantConfig())


def test_resnet20_float_qat_cli_and_clear_engine_error(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    m = ["--model", "gluoncv:cifar_resnet20_v1"]
    run("scripts/train_fp32.py", "--config", "configs/synthetic_tiny.yaml", "--out", str(tmp_path), "--name", "f",
        "--epochs", "3", "--lr", "0.1", *m)
    run("scripts/train_qat.py", "--config", "configs/synthetic_tiny.yaml", "--pretrained", str(tmp_path / "f"),
        "--out", str(tmp_path), "--name", "q", "--epochs", "1", *m)
    res = json.loads((tmp_path / "q" / "result.json").read_text())
    assert len(res["new_parameters"]) == 22 and res["fq_acc"] >= res["float_acc"] - 0.05, res
    assert res["float_acc"] >= 0.4  # learned something in 3 epochs on the 10-class set
    layers = json.loads((tmp_path / "q" / "layers.json").read_text())
    assert len(layers) == 22 and all(la["input_max"] > 0 for la in layers)
    r = subprocess.run([sys.executable, "scripts/sim_int8_infer.py", "--qat", str(tmp_path / "q")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "sequential networks" in r.stderr.strip().splitlines()[-1]
