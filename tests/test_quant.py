"""Quantizer math and QAT blocks against float64 numpy references."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

from train_quantization import quant
from train_quantization.config import QuantSpec
from train_quantization.layers import QConv2DBN, QDense


def _fq_nd(x, s, lo, hi, ste="plain", hybrid=False):
    """fake_quant through an (optionally hybridized) block, returns (output, d out / d x)."""

    class FQ(gluon.HybridBlock):
        def hybrid_forward(self, F, x, s):  # noqa: ANN001
            return quant.fake_quant(F, x, s, lo, hi, ste)

    blk = FQ()
    if hybrid:
        blk.hybridize()
    xn = nd.array(x, dtype=x.dtype)
    xn.attach_grad()
    with autograd.record():
        y = blk(xn, nd.array(np.reshape(s, (1,) * (x.ndim - np.ndim(s)) + np.shape(s)) if np.ndim(s) == 0
                             else s, dtype=x.dtype))
    y.backward()
    return y.asnumpy(), xn.grad.asnumpy()


@pytest.mark.parametrize("hybrid", [False, True])
def test_fake_quant_ties_saturation_and_grid(hybrid):
    s = 0.5  # a power of two: every x below is exact, so the ties are real ties
    u = np.array([-0.5, 0.5, -1.5, 1.5, -2.5, 2.5, 3.5, -3.5, 0.25, -0.75, 2.0, -3.0])
    x = (u * s).astype(np.float32).reshape(1, -1)
    out, _ = _fq_nd(x, np.float32(s), -128, 127, hybrid=hybrid)
    expect = np.array([-0.0, 0.0, -2, 2, -2, 2, 4, -4, 0, -1, 2, -3]) * s  # half to even
    assert np.array_equal(out.ravel(), expect)
    # saturation at both ends, exactly qmin * s and qmax * s
    x = np.array([[-1e4, -64.3, -64.25, 63.5, 63.75, 1e4]], np.float32)
    out, _ = _fq_nd(x, np.float32(0.5), -128, 127, hybrid=hybrid)
    assert np.array_equal(out.ravel(), np.array([-64.0, -64.0, -64.0, 63.5, 63.5, 63.5], np.float32))
    # values already on the grid come back unchanged (random scale)
    s = np.float32(0.0371)
    codes = np.arange(-128, 128, dtype=np.float32)
    x = (codes * s).reshape(1, -1)
    out, _ = _fq_nd(x, s, -128, 127, hybrid=hybrid)
    assert np.array_equal(out, x)


def test_fake_quant_matches_numpy_reference_bitwise():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 5)) * 3).astype(np.float32)
    s = np.float32(0.0371)
    out, _ = _fq_nd(x, s, -128, 127)
    ref64 = np.clip(np.rint(x.astype(np.float64) / np.float64(s)), -128, 127) * np.float64(s)
    assert np.abs(out - ref64).max() <= 1e-6  # float32 vs float64 reference at a fixed tolerance
    assert np.array_equal(out, quant.fake_quant_np(x, s, -128, 127))  # float32 twin: bit-identical


def test_fake_quant_per_channel_scales():
    rng = np.random.default_rng(1)
    gains = np.array([0.01, 1, 10, 0], np.float32).reshape(4, 1, 1, 1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * gains
    s = quant.weight_scale_np(w, 127, per_channel=True).astype(np.float32)
    assert s.shape == (4, 1, 1, 1) and s[3, 0, 0, 0] == 1.0  # all-zero channel: scale 1, no division by 0
    out, _ = _fq_nd(w, s, -127, 127)
    ref = np.clip(np.rint(w.astype(np.float64) / s), -127, 127) * s
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(w).max()
    for c in range(3):  # every channel uses its full range
        assert np.abs(np.rint(w[c] / s[c])).max() == 127
    ms = quant.weight_scale(nd, nd.array(w), 127, True, 4).asnumpy()
    assert np.array_equal(ms, s)


@pytest.mark.parametrize("ste", ["plain", "clipped"])
def test_ste_gradient_is_the_expected_mask(ste):
    s = np.float32(0.25)
    x = np.array([[-40.0, -32.1, -32.0, -1.3, 0.0, 0.6, 31.75, 31.9, 50.0]], np.float32)
    _, g = _fq_nd(x, s, -128, 127, ste=ste)
    u = x / s
    mask = ((u >= -128) & (u <= 127)).astype(np.float32) if ste == "clipped" else np.ones_like(x)
    assert np.array_equal(g, mask)


def test_bn_fold_equals_conv_then_frozen_bn_and_gradients_match():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 6))
    blk = QConv2DBN(4, 3, QuantSpec(), relu=False)
    blk.quant_enabled = False
    blk.initialize()
    vals = {"gamma": rng.uniform(0.5, 2, 4), "beta": rng.standard_normal(4),
            "running_mean": rng.standard_normal(4), "running_var": rng.uniform(0.5, 2, 4)}
    for k, v in vals.items():
        getattr(blk, k).set_data(nd.array(v))
    ref_conv = gluon.nn.Conv2D(4, 3, padding=1, use_bias=False, in_channels=3)
    ref_bn = gluon.nn.BatchNorm(in_channels=4, epsilon=1e-5, use_global_stats=True)
    ref_conv.initialize()
    ref_bn.initialize()
    ref_conv.weight.set_data(blk.weight.data())
    for k, v in vals.items():
        getattr(ref_bn, k).set_data(nd.array(v))
    xn = nd.array(x, dtype="float32")
    with autograd.record():
        y = blk(xn)
        loss = (y * y).sum()
    loss.backward()
    with autograd.record():
        y_ref = ref_bn(ref_conv(xn.copy()))
        loss_ref = (y_ref * y_ref).sum()
    loss_ref.backward()
    assert np.abs(y.asnumpy() - y_ref.asnumpy()).max() <= 1e-4  # float32
    assert np.allclose(blk.weight.grad().asnumpy(), ref_conv.weight.grad().asnumpy(), rtol=1e-4, atol=1e-4)
    # float64 reference of the fold itself at 1e-5
    w = blk.weight.data().asnumpy().astype(np.float64)
    w_f, b_f = quant.fold_bn_np(w, None, vals["gamma"], vals["beta"], vals["running_mean"], vals["running_var"], 1e-5)
    inv = vals["gamma"] / np.sqrt(vals["running_var"] + 1e-5)
    assert np.allclose(w_f, w * inv[:, None, None, None], atol=1e-12)
    assert np.allclose(b_f, vals["beta"] - vals["running_mean"] * inv, atol=1e-12)
    wf32, bf32 = quant.fold_bn(nd, blk.weight.data(), None, *[nd.array(vals[k]) for k in
                                                               ("gamma", "beta", "running_mean", "running_var")], 1e-5)
    assert np.abs(wf32.asnumpy() - w_f).max() <= 1e-5 and np.abs(bf32.asnumpy() - b_f).max() <= 1e-5


@pytest.mark.parametrize("hybrid,kernel", [(False, "stock"), (True, "stock"), (True, "auto")])
def test_ema_range_exact_sequence_and_eval_leaves_it(hybrid, kernel):
    """The batch max|x| (here at a negative value) into the EMA, exactly, on the stock ops and the compiled one."""
    q = QuantSpec(momentum=0.95, kernel=kernel)
    blk = QDense(3, 4, q)
    blk.initialize()
    if hybrid:
        blk.hybridize(static_alloc=True)
    maxima = [2.0, 3.0, 0.5, 10.0, 1.25]
    expect, state = [], None
    for m in maxima:
        state = quant.ema_update_np(state, m, 0.95)
        expect.append(state)
    got = []
    for m in maxima:
        x = nd.array([[0.1, -m, 0.3, 0.2], [0.0, 0.5 * m, -0.1, 0.1]])
        with autograd.record():
            blk(x)
        got.append(blk.input_max.data().asnumpy()[0])
    assert np.array_equal(np.array(got, np.float32), np.array(expect, np.float32))
    assert got[0] == 2.0  # the first batch sets it
    before = blk.input_max.data().asnumpy().copy()
    blk(nd.array([[100.0, 0, 0, 0]]))  # evaluation: unchanged
    with autograd.record(train_mode=False):
        blk(nd.array([[100.0, 0, 0, 0]]))
    assert np.array_equal(blk.input_max.data().asnumpy(), before)


def test_hybridized_equals_imperative_and_qat_roundtrip(qat_run, tiny_ds, tmp_path):
    from train_quantization import cli
    from train_quantization.layers import quantized_layers

    net = qat_run["net"]
    x = qat_run["norm"](nd.array(tiny_ds.test_x[:32], dtype="uint8"))
    hyb = net(x).asnumpy()
    net.hybridize(active=False)
    imp = net(x).asnumpy()
    net.hybridize(static_alloc=True)
    assert np.array_equal(hyb, imp)
    path = tmp_path / "q.params"
    net.save_parameters(str(path))
    net2 = cli.build_for(qat_run["cfg"], tiny_ds, quant=True)
    assert cli.load_weights(net2, path, [mx.cpu()], expect_ranges=True) == []
    for (n1, l1), (n2, l2) in zip(quantized_layers(net), quantized_layers(net2)):
        assert n1 == n2 and l1.input_max.data().asscalar() == l2.input_max.data().asscalar() > 0
    assert np.array_equal(net2(x).asnumpy(), hyb)


def test_float_checkpoint_loads_with_only_ranges_new(qat_run):
    new = qat_run["new"]
    assert new and all(k.endswith(".input_max") for k in new)
    assert len(new) == 15  # 13 convolutions + 2 dense layers of VGG16


def test_qat_accuracy_within_one_point_of_float(float_run, qat_run):
    # the fixture learns on every CPU: 0.998-1.0 over seeds 0-4 x AVX2/AVX-512 oneDNN, every class predicted
    # (benchmarks/cpu_fixture.py)
    assert float_run["best"]["test_acc"] >= 0.9 and len(set(float_run["logits"].argmax(1).tolist())) == 10
    assert qat_run["acc"] >= float_run["best"]["test_acc"] - 0.01


def test_paper_bn_mode_consistent_after_freeze(float_run, tiny_ds):
    from conftest import tiny_config
    from train_quantization import cli, train
    from train_quantization.data import normalizer

    cfg = tiny_config(float_run["run"].parent, bn_mode="paper", bn_freeze_step=5)
    net = cli.build_for(cfg, tiny_ds, quant=True)
    cli.load_weights(net, float_run["run"] / "best.params", [mx.cpu()], expect_ranges=False)
    net.hybridize(static_alloc=True)
    norm = normalizer(*tiny_ds.mean_std())
    x = norm(nd.array(tiny_ds.train_x[:64], dtype="uint8"))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    y = nd.array(tiny_ds.train_y[:64])
    first = net.features[0].running_mean.data().asnumpy().copy()
    for _ in range(3):  # batch statistics: running statistics keep moving
        with autograd.record():
            out = net(x)
            loss(out, y).backward()
        trainer.step(64)
    assert not np.array_equal(first, net.features[0].running_mean.data().asnumpy())
    with autograd.record():  # before freezing: train mode normalizes with batch statistics
        pre_train = net.features(x).asnumpy()
    pre_eval = net.features(x).asnumpy()
    assert np.abs(pre_train - pre_eval).max() > 1e-3
    assert train.qat_phase(net, cfg, cfg.qat.bn_freeze_step - 1, None) == (True, False, False)
    assert train.qat_phase(net, cfg, cfg.qat.bn_freeze_step, None) == (True, False, True)
    frozen = net.features[0].running_mean.data().asnumpy().copy()
    net.collect_params().setattr("grad_req", "null")
    with autograd.record():  # after freezing: train-mode and eval-mode outputs agree
        post_train = net.features(x).asnumpy()
    post_eval = net.features(x).asnumpy()
    assert np.abs(post_train - post_eval).max() <= 1e-5 * max(1.0, np.abs(post_eval).max())
    assert np.array_equal(frozen, net.features[0].running_mean.data().asnumpy())


def test_two_devices_get_identical_ranges_equal_to_single_device():
    from train_quantization import train

    q = QuantSpec()
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((8, 6)).astype(np.float32) * (1 + i) for i in range(4)]
    single = gluon.nn.HybridSequential()
    single.add(QDense(4, 6, q))
    single.initialize(mx.init.Xavier(), ctx=mx.cpu(0))
    ctxs = [mx.cpu(0), mx.cpu(1)]
    multi = gluon.nn.HybridSequential()
    multi.add(QDense(4, 6, q))
    multi.initialize(ctx=ctxs)
    multi[0].weight.set_data(single[0].weight.data())
    for b in batches:
        with autograd.record():
            single(nd.array(b))
        parts = gluon.utils.split_and_load(nd.array(b), ctxs)
        with autograd.record():
            for p in parts:
                multi(p)
        train.sync_ranges(multi)
        r0, r1 = [a.asnumpy() for a in multi[0].input_max.list_data()]
        assert np.array_equal(r0, r1)
        assert np.allclose(r0, single[0].input_max.data().asnumpy(), rtol=1e-6)


@pytest.mark.parametrize("state", [0.0, 1e-6, 3.0, 2.0**25, 1e30])
def test_train_flag_for_any_range_state(state):
    from train_quantization.layers import train_flag

    s = nd.array([state])
    with autograd.record():
        on = train_flag(nd, s).asscalar()
    off = train_flag(nd, s).asscalar()
    assert (on, off) == (1.0, 0.0)
    assert s.asscalar() == np.float32(state)  # the BatchNorm inside leaves the state alone


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_loss_against_float64_reference(eps):
    from train_quantization.config import from_dict
    from train_quantization.errors import UserError
    from train_quantization.train import smoothed_loss

    rng = np.random.default_rng(0)
    logits, y = rng.normal(0, 3, (8, 10)), rng.integers(0, 10, 8)
    target = (1 - eps) * np.eye(10)[y] + eps / 10
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ref = -(target * logp).sum(1)
    got = smoothed_loss(eps, 10)(mx.nd.array(logits), mx.nd.array(y, dtype="int32")).asnumpy()
    assert np.abs(got - ref).max() <= 1e-5
    with pytest.raises(UserError, match="optim.label_smoothing"):
        from_dict({"optim": {"label_smoothing": 1.0}})


def test_weight_average_against_float64_reference(tmp_path):
    from train_quantization.config import from_dict
    from train_quantization.errors import UserError
    from train_quantization.train import WeightAverage

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2), gluon.nn.BatchNorm(in_channels=4))
    net.initialize()
    net.hybridize(static_alloc=True)
    params = list(net.collect_params().values())
    rng = np.random.default_rng(0)
    steps = [[rng.uniform(0.5, 1.5, p.shape) for p in params] for _ in range(4)]  # > 0: also variances
    avg, d = WeightAverage(net, 0.9), 0.9
    ref = [v.copy() for v in steps[0]]  # the first step's values start the average
    for t, values in enumerate(steps):
        for p, v in zip(params, values):
            p.set_data(mx.nd.array(v))
        avg.update()
        if t > 0:
            ref = [d * r + (1 - d) * v for r, v in zip(ref, values)]
    x = mx.nd.array(rng.normal(0, 1, (2, 2, 6, 6)))
    trained = net(x).asnumpy()
    with avg.swapped():
        assert max(np.abs(p.data().asnumpy() - r).max() for p, r in zip(params, ref)) <= 1e-6
        averaged = net(x).asnumpy()  # the cached graph sees the swapped values
    assert all((p.data().asnumpy() == np.float32(v)).all() for p, v in zip(params, steps[-1]))
    assert np.array_equal(net(x).asnumpy(), trained) and not np.allclose(averaged, trained)
    avg.save(tmp_path / "average.params")
    again = WeightAverage(net, 0.9)
    again.load(tmp_path / "average.params")
    assert all((a.asnumpy() == b.asnumpy()).all() for a, b in zip(again.avg, avg.avg))
    assert all((p.data().asnumpy() == np.float32(v)).all() for p, v in zip(params, steps[-1]))
    # BatchNorm statistics of the average: the mean of each batch's statistics under the averaged weights
    batches = [(mx.nd.array(rng.normal(0, 1, (5, 2, 6, 6))), None) for _ in range(3)]
    avg.recompute_bn(batches, lambda v: v, [mx.cpu()])
    w, b = ref[0], ref[1]  # conv weight and bias; a 3x3 convolution in float64
    zs = [np.einsum("nchwij,kcij->nkhw", np.lib.stride_tricks.sliding_window_view(x.asnumpy().astype(np.float64),
                                                                                 (3, 3), axis=(2, 3)), w)
          + b[None, :, None, None] for x, _ in batches]
    mean_ref = np.mean([z.mean(axis=(0, 2, 3)) for z in zs], axis=0)
    var_ref = np.mean([z.var(axis=(0, 2, 3)) for z in zs], axis=0)
    names = [p.name for p in params]
    got = {n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1]: a.asnumpy() for n, a in zip(names, avg.avg)}
    assert np.abs(got["running_mean"] - mean_ref).max() <= 1e-5
    assert np.abs(got["running_var"] - var_ref).max() <= 1e-5 * var_ref.max()
    assert all((p.data().asnumpy() == np.float32(v)).all() for p, v in zip(params, steps[-1]))  # net untouched
    with pytest.raises(UserError, match="optim.average_decay"):
        from_dict({"optim": {"average_decay": 1.0}})
