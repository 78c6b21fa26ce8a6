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
from train_quantization.config import ModelConfig, QuantConfig, QuantSpec, load_config
from train_quantization.conversion import convert
from train_quantization.errors import UserError
from train_quantization.layers import QAdd, QAvgPool, QConv2DBN, QDense, quantized_layers, set_quant_state
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
    q = convert(net, QuantConfig())
    set_quant_state(q, enabled=False)  # quantization off: the BN fold alone
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
                          nn.Conv2D(4, 1))  # a conv without BatchNorm: a QConv2D (weights and its bias)
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
    q = convert(net, QuantConfig())
    set_quant_state(q, enabled=False)
    assert isinstance(q.pre, nn.BatchNorm) and isinstance(q.head, QDense) and q.head.relu
    kinds = [type(c).__name__ for c in q.body._children.values()]
    assert kinds == ["QConv2DBN", "Activation", "QConv2D"] and q.body[2].use_bias
    np.testing.assert_allclose(q(x).asnumpy(), ref, rtol=1e-5, atol=1e-5)  # conv bias folded exactly
    fresh = Net()
    with pytest.raises(UserError, match="run one forward pass first"):
        convert(fresh, QuantConfig())


def test_qadd_puts_both_branches_on_one_grid():
    """Known tensors in, exact values out: s = input_max / 128, relu((round(a/s) + round(b/s)) * s)."""
    add = QAdd(QuantSpec())
    add.initialize()
    add.input_max.set_data(mx.nd.array([1.28]))  # s = 0.01
    a = np.array([0.005, 0.015, -0.025, 1.5, -0.3, 0.0], np.float32).reshape(1, 6, 1, 1)
    b = np.array([0.0, 0.0, 0.004, 0.0, 0.1, -2.0], np.float32).reshape(1, 6, 1, 1)
    y = add(mx.nd.array(a), mx.nd.array(b)).asnumpy().ravel()  # evaluation: the stored range
    # codes: a -> 0, 2, -2, 127 (saturated), -30, 0 ; b -> 0, 0, 0, 0, 10, -128 (half to even)
    np.testing.assert_allclose(y, np.array([0, 2, 0, 127, 0, 0]) * 0.01, atol=1e-7)
    with mx.autograd.record():  # training: the range follows max(max|a|, max|b|) = 2.0
        add(mx.nd.array(a), mx.nd.array(b))
    assert float(add.input_max.data().asscalar()) == pytest.approx(0.95 * 1.28 + 0.05 * 2.0, abs=1e-6)


def test_onednn_add_and_pool_known_codes():
    """The onednn scheme: the body joins unquantized, the shortcut as codes on its own range
    (uint8 at max/255.5 after a ReLU); the pooling averages its input's codes."""
    q = QuantSpec(scheme="onednn", per_channel=True)
    add = QAdd(q)
    add.input_signed = False
    add.initialize()
    add.input_max.set_data(mx.nd.array([2.555]))  # s = 0.01
    a = np.array([0.0123, -0.5, 0.2, -0.01], np.float32).reshape(1, 4, 1, 1)
    b = np.array([0.016, 0.3, 3.0, -0.2], np.float32).reshape(1, 4, 1, 1)  # codes 2, 30, 255 (saturated), 0
    y = add(mx.nd.array(a), mx.nd.array(b)).asnumpy().ravel()
    np.testing.assert_allclose(y, np.maximum(a.ravel() + np.array([2, 30, 255, 0]) * 0.01, 0), atol=1e-6)
    with mx.autograd.record():  # training: the range follows max|b| = 3.0 only (a is larger: ignored)
        add(mx.nd.array(a * 10), mx.nd.array(b))
    assert float(add.input_max.data().asscalar()) == pytest.approx(0.95 * 2.555 + 0.05 * 3.0, abs=1e-6)
    pool = QAvgPool(q)
    pool.initialize()
    pool.input_max.set_data(mx.nd.array([1.275]))  # signed input: s = 1.275 / 127.5 = 0.01
    x = np.array([0.004, 0.006, -0.013, 5.0], np.float32).reshape(1, 1, 2, 2)  # codes 0, 1, -1, 127
    assert float(pool(mx.nd.array(x)).asscalar()) == pytest.approx(127 * 0.01 / 4, abs=1e-7)


def test_signs_follow_the_graph():
    """ReLU outputs are read as uint8 (onednn); the stem has no ReLU, so the first block's shortcut
    is int8, and oneDNN's conv + sum then writes every later block output into an int8 buffer."""
    net = build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32,
                      QuantConfig(scheme="onednn", per_channel=True))
    signed = {n: b.input_signed for n, b in quantized_layers(net)}
    assert signed["features.0"] and signed["features.2.0.body.0"] and signed["features.2.0.add"]
    assert not signed["features.2.0.body.3"] and not signed["features.4.2.body.3"]  # after the body's ReLU
    assert not signed["features.3.0.downsample.0"] and signed["features.3.0.add"]  # a downsample has no ReLU
    assert signed["features.3.1.body.0"] and signed["features.3.1.add"]  # after the downsample block: int8
    assert not signed["features.3.2.body.0"] and not signed["features.3.2.add"]  # its uint8-typed output
    assert not signed["features.5"] and not signed["output"]
    assert isinstance(dict(quantized_layers(net))["features.5"], QAvgPool)


def _trained_resnet(seed: int = 0, arch: str = "gluoncv:cifar_resnet20_v1", **quant):
    mx.random.seed(seed)
    net = build_model(ModelConfig(arch=arch), 10, 3, 32, QuantConfig(**quant))
    for p in net.collect_params().values():  # non-trivial BN statistics
        if p.name.endswith(("running_mean", "gamma", "beta")):
            p.set_data(mx.nd.array(np.random.default_rng(1).uniform(-0.2, 1.2, p.shape).astype(np.float32)))
    net.hybridize(static_alloc=True)
    x = _x(192)
    with mx.autograd.train_mode():  # ranges from three batches
        for i in range(3):
            net(x[i * 64:(i + 1) * 64])
    return net, x


@pytest.mark.parametrize("scheme", ["original", "onednn"])
def test_resnet20_engines_follow_the_fake_quant_graph(scheme):
    from conftest import assert_kernels_agree
    from train_quantization.conversion import copy_to_float
    from train_quantization.int8 import engine, onednn, onnx_export
    from train_quantization.int8.export import export

    net, x = _trained_resnet(scheme=scheme, per_channel=scheme == "onednn")
    assert sum(isinstance(b, QAdd) for _, b in quantized_layers(net)) == 9
    ranges = {n: float(b.input_max.data().asscalar()) for n, b in quantized_layers(net)}
    if scheme == "onednn":  # an identity shortcut's range is its block's first conv's, bit for bit
        assert ranges["features.2.1.add"] == ranges["features.2.1.body.0"]
        assert ranges["features.4.2.add"] == ranges["features.4.2.body.0"]
    fq = net(x).asnumpy()
    m = export(net, (0.0,) * 3, (1.0,) * 3, (3, 32, 32), [str(i) for i in range(10)])
    kinds = [op.type for op in m.layers]
    assert kinds.count("add") == 9 and kinds.count("conv") == 21 and kinds[-2:] == ["avgpool", "dense"]
    assert m.layers[12].name.endswith("downsample.0") and m.layers[13].inputs == [11, 12]
    assert all(op.shortcut_only == (scheme == "onednn") for op in m.layers if op.type == "add")
    xs = x.asnumpy()
    assert_kernels_agree(m, xs[:64])
    sim, integer = engine.simulate(m, xs), engine.run_integer(m, xs)
    spread = np.abs(fq).max()
    assert np.abs(sim - fq).max() <= 0.01 * spread and np.mean(sim.argmax(1) == fq.argmax(1)) >= 0.99
    assert np.abs(integer - sim).max() <= 0.02 * spread and np.mean(integer.argmax(1) == sim.argmax(1)) >= 0.99
    fnet = copy_to_float(net, build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32))
    fnet.hybridize(static_alloc=True)
    block = onednn.with_learned_ranges(fnet, net, (3, 32, 32), x[:64])
    table = onednn.calib_table(block)
    assert table["data_quantize"] == pytest.approx((-ranges["features.0"], ranges["features.0"]), abs=1e-6)
    assert len(table) == 23  # the input, every fused conv output (block outputs fused with their add), the pool
    # the first block's shortcut is the stem's int8 output: oneDNN keeps its output in that int8
    # buffer (codes 0..127), so its range is doubled; a uint8 shortcut (block 2) keeps the range
    assert table["quantized_sg_mkldnn_conv_bn_add_act_2"][1] == pytest.approx(
        ranges["features.2.1.body.0"] * 255.5 / 127.5, rel=1e-6)
    assert table["quantized_sg_mkldnn_conv_bn_add_act_6"][1] == pytest.approx(ranges["features.3.0.body.0"], rel=1e-6)
    od = onednn.logits(block, xs)
    # of the mean logit magnitude, measured: onednn scheme 0.0024 with VNNI kernels, 0.022 with AVX2 ones
    # (their int8-input convolutions, machine.onednn_vnni); original scheme 0.033 and 0.045
    assert np.abs(od - sim).mean() <= (0.035 if scheme == "onednn" else 0.07) * np.abs(sim).mean()
    assert np.mean(od.argmax(1) == sim.argmax(1)) >= 0.97
    if onnx_export.available():
        ort = onnx_export.runner(onnx_export.session(onnx_export.build_qdq(m)))(xs)
        # equal but for rare rounding ties (the add sums dequantized floats; onednn: the body's conv
        # runs in float before the add, so float rounding moves a few codes): mean difference tiny
        tol = 1e-4 if scheme == "original" else 5e-4
        assert np.abs(ort - sim).mean() <= tol * spread and np.mean(ort.argmax(1) == sim.argmax(1)) >= 0.99


@pytest.mark.parametrize("add_bits", [0, 8])
def test_resnet20_learned_ranges_export_the_grids_the_graph_uses(add_bits):
    """Learned ranges at W4A4 in the original scheme: an add's one range covers the body's signed output, so
    its grid is signed in the graph and the artifact alike (4-bit, or 8-bit with ``add_bits``); a block's
    ReLU'd output reaches the next block on the unsigned 4-bit grid. The simulation then follows the
    fake-quant graph, code for code with the integer-only engine."""
    from conftest import layerwise_codes, top1_agreement
    from train_quantization.int8 import engine
    from train_quantization.int8.export import export
    from train_quantization.layers import init_weight_steps

    ema, x = _trained_resnet(weight_bits=4, act_bits=4, per_channel=True)
    net = build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32,
                      QuantConfig(weight_bits=4, act_bits=4, per_channel=True, range="lsq", add_bits=add_bits))
    src = ema._collect_params_with_prefix()
    for name, p in net._collect_params_with_prefix().items():  # the EMA net's weights, statistics and ranges
        if name in src:  # weight steps: from the folded weights next
            p.set_data(src[name].data())
    init_weight_steps(net)
    signed = {n: b.input_signed for n, b in quantized_layers(net)}
    assert all(signed[n] for n in signed if n.endswith(".add"))
    assert not signed["features.3.1.body.0"] and not signed["features.2.1.body.0"]  # after a block's ReLU
    m = export(net, (0.0,) * 3, (1.0,) * 3, (3, 32, 32), [str(i) for i in range(10)])
    grids = {op.name: op.act for op in m.layers if op.type in ("add", "conv")}
    assert (grids["features.3.0.add"].qmin, grids["features.3.0.add"].qmax) == ((-128, 127) if add_bits else (-8, 7))
    assert (grids["features.3.1.body.0"].qmin, grids["features.3.1.body.0"].qmax) == (0, 15)
    assert {b.spec.act_bits for n, b in quantized_layers(net) if n.endswith(".add")} == {add_bits or 4}
    xs = x.asnumpy()
    fq, sim = net(x).asnumpy(), engine.simulate(m, xs)
    assert np.abs(sim - fq).max() <= 1e-3 * np.abs(fq).max() and top1_agreement(sim, fq) >= 0.99
    ref, got = layerwise_codes(m, xs, engine.simulate, engine.run_integer)
    assert all(np.abs(ref[n] - got[n]).max() <= 1 for n in ref)


def test_copy_to_float_inverts_convert():
    from train_quantization.conversion import copy_to_float

    net = build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32)
    for p in net.collect_params().values():
        if p.name.endswith(("running_mean", "running_var", "gamma", "beta")):
            p.set_data(mx.nd.array(np.random.default_rng(2).uniform(0.5, 1.5, p.shape).astype(np.float32)))
    x = _x()
    ref = net(x).asnumpy()
    q = convert(net, QuantConfig())
    set_quant_state(q, enabled=False)
    back = copy_to_float(q, build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v1"), 10, 3, 32))
    np.testing.assert_array_equal(back(x).asnumpy(), ref)


def test_resnet20_through_the_clis(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    m = ["--model", "gluoncv:cifar_resnet20_v1"]
    run("scripts/train_fp32.py", "--config", "configs/synthetic_tiny.yaml", "--out", str(tmp_path), "--name", "f",
        "--epochs", "3", "--lr", "0.1", *m)
    # the float run folder knows its model and data: neither --model nor --config is repeated
    run("scripts/train_qat.py", "--pretrained", str(tmp_path / "f"), "--out", str(tmp_path), "--name", "q",
        "--epochs", "1")
    res = json.loads((tmp_path / "q" / "result.json").read_text())
    assert load_config(tmp_path / "q" / "config.yaml").model.arch == "gluoncv:cifar_resnet20_v1"
    assert len(res["new_parameters"]) == 31 and res["fq_acc"] >= res["float_acc"] - 0.05, res  # 22 layers, 9 adds
    assert res["float_acc"] >= 0.4  # learned something in 3 epochs on the 10-class set
    layers = json.loads((tmp_path / "q" / "layers.json").read_text())
    assert len(layers) == 31 and all(la["input_max"] > 0 for la in layers)
    run("scripts/sim_int8_infer.py", "--qat", str(tmp_path / "q"), "--engine", "all")
    ev = json.loads((tmp_path / "q" / "int8_eval.json").read_text())
    assert ev["sim_agree_fake_quant"] >= 0.99 and ev["integer_agree_sim"] >= 0.99, ev
    run("scripts/compare.py", "--float", str(tmp_path / "f"), "--qat", str(tmp_path / "q"), "--calib", "256",
        "--batches", "1")
    rows = {r["variant"]: r for r in json.loads((tmp_path / "q" / "compare.json").read_text())["rows"]}
    assert rows["QAT oneDNN int8, learned ranges"]["agree_sim"] >= 0.97, rows
    assert rows["float (MXNet)"]["acc"] == pytest.approx(res["float_acc"], abs=1e-9)
    # the oneDNN scheme: the same agreement target as for VGG16 (tests/test_onednn.py)
    run("scripts/train_qat.py", "--config", "configs/synthetic_tiny.yaml", "--pretrained", str(tmp_path / "f"),
        "--out", str(tmp_path), "--name", "o", "--epochs", "1", "--scheme", "onednn", *m)
    run("scripts/compare.py", "--float", str(tmp_path / "f"), "--qat", str(tmp_path / "o"), "--calib", "256",
        "--batches", "1")
    rows = {r["variant"]: r for r in json.loads((tmp_path / "o" / "compare.json").read_text())["rows"]}
    assert rows["QAT oneDNN int8, learned ranges"]["agree_sim"] >= 0.995, rows
    assert rows["QAT integer-only (numpy)"]["agree_sim"] >= 0.99 and rows["QAT fake-quant (MXNet)"]["agree_sim"] >= 0.99


def test_preactivation_resnet_through_every_engine():
    """cifar_resnet20_v2: the BN before each block's first conv cannot fold into it; it stays a frozen
    BatchNorm in training and a per-channel affine in the int8 graph (11 of them: the input BN, 9 blocks'
    bn1, the final BN); 22 weighted layers, 9 adds without ReLU; the engines follow the fake-quant graph."""
    from conftest import assert_kernels_agree, layerwise_codes, top1_agreement
    from train_quantization.conversion import copy_to_float
    from train_quantization.int8 import engine, onednn, onnx_export
    from train_quantization.int8.export import export
    from train_quantization.layers import QPreActResidual

    net, x = _trained_resnet(arch="gluoncv:cifar_resnet20_v2")
    layers = quantized_layers(net)
    assert len(quantized_layers(net, weights_only=True)) == 22 and sum(isinstance(b, QAdd) for _, b in layers) == 9
    blocks = [b for b in net.features._children.values() for b in getattr(b, "_children", {}).values()]
    assert sum(isinstance(b, QPreActResidual) for b in blocks) == 9
    assert all(b.bn1._kwargs["use_global_stats"] for b in blocks if isinstance(b, QPreActResidual))
    fq = net(x).asnumpy()
    m = export(net, (0.0,) * 3, (1.0,) * 3, (3, 32, 32), [str(i) for i in range(10)])
    kinds = [op.type for op in m.layers]
    assert kinds.count("affine") == 11 and kinds.count("add") == 9
    assert all(not op.relu for op in m.layers if op.type == "add")
    xs = x.asnumpy()
    assert_kernels_agree(m, xs[:64])
    ref, got = layerwise_codes(m, xs, engine.simulate, engine.run_integer)
    assert all(np.abs(ref[n] - got[n]).max() <= 1 for n in ref)  # measured: none differ (float32 division: 1.4e-5)
    assert sum(int((ref[n] != got[n]).sum()) for n in ref) <= 1e-6 * sum(c.size for c in ref.values())
    sim = engine.simulate(m, xs)
    assert top1_agreement(sim, fq, tol=1e-3) >= 0.99 and np.abs(sim - fq).max() <= 0.02 * np.abs(fq).max()
    if onnx_export.available():
        ort = onnx_export.runner(onnx_export.session(onnx_export.build_qdq(m, "avx2")))(xs)
        assert top1_agreement(sim, ort, tol=1e-3) >= 0.99
    fnet = copy_to_float(net, build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v2"), 10, 3, 32))
    with pytest.raises(UserError, match="affine ops .a BatchNorm that no convolution precedes"):
        onednn.with_learned_ranges(fnet, net, (3, 32, 32), x[:64])
    q = convert(build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v2"), 10, 3, 32), QuantConfig())
    set_quant_state(q, enabled=False)
    back = copy_to_float(q, build_model(ModelConfig(arch="gluoncv:cifar_resnet20_v2"), 10, 3, 32))
    for k, p in q._collect_params_with_prefix().items():
        if k.startswith("features.1.0.bn1"):  # a float BatchNorm's values go back as they are
            assert np.array_equal(p.data().asnumpy(), back._collect_params_with_prefix()[k].data().asnumpy())
