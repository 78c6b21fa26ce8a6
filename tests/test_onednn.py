"""Real int8 on oneDNN: the learned ranges land in the graph; PTQ baselines run."""
from __future__ import annotations

import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from conftest import ROOT
from train_quantization import cli, machine
from train_quantization.int8 import engine, onednn
from train_quantization.int8.export import export
from train_quantization.layers import quantized_layers


@pytest.fixture(scope="module")
def nets(qat_run, float_run, tiny_ds):
    qnet = qat_run["net"]
    fnet = cli.build_for(qat_run["cfg"], tiny_ds, quant=False)
    path = qat_run["run"] / "last.params"
    qnet.save_parameters(str(path))
    fnet.load_parameters(str(path), ignore_extra=True)
    fnet.hybridize(static_alloc=True)
    m = export(qnet, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
    calib = mx.nd.array(engine.normalize(m, tiny_ds.train_x[:256]))
    return qnet, fnet, m, calib


def test_learned_ranges_land_in_the_int8_graph_and_agree(nets, tiny_ds):
    qnet, fnet, m, calib = nets
    block = onednn.with_learned_ranges(fnet, qnet, (3, 16, 16), calib)
    table = onednn.calib_table(block)
    ranges = [float(la.input_max.data().asscalar()) for _, la in quantized_layers(qnet)]
    got = [v for k, v in table.items() if k != "data_quantize"]
    assert table["data_quantize"] == pytest.approx((-ranges[0], ranges[0]), abs=1e-6)
    assert len(got) == len(ranges) - 1  # every fused layer whose output feeds a quantized layer
    for (lo, hi), r in zip(got, ranges[1:]):
        assert lo == 0.0 and hi == pytest.approx(r, abs=1e-6)
    x = engine.normalize(m, tiny_ds.test_x)
    sim = engine.simulate(m, x).argmax(1)
    one = onednn.logits(block, x).argmax(1)
    # the original scheme is not oneDNN's arithmetic (127.5/255.5 divisors, uint8 after ReLU)
    assert np.mean(one == sim) >= 0.97
    assert np.mean(one == tiny_ds.test_y) >= np.mean(sim == tiny_ds.test_y) - 0.02


@pytest.mark.parametrize("mode", ["naive", "entropy"])
def test_ptq_baselines_run(nets, float_run, tiny_ds, mode):
    _, _, m, calib = nets
    fnet = cli.build_for(float_run["cfg"], tiny_ds, quant=False)
    cli.load_weights(fnet, float_run["run"] / "best.params", [mx.cpu()], expect_ranges=False)
    block = onednn.ptq(fnet, (3, 16, 16), calib, mode)
    assert len(onednn.calib_table(block)) >= 14
    acc = np.mean(onednn.logits(block, engine.normalize(m, tiny_ds.test_x)).argmax(1) == tiny_ds.test_y)
    assert acc >= float_run["best"]["test_acc"] - 0.03


def test_onednn_scheme_grids_and_deployment(float_run, tiny_ds, tmp_path):
    """QAT with ``quant.scheme: onednn``: uint8 codes after ReLU (0..255), int8 at the input,
    per-channel weights at 127.5/max; the engines follow the graph; oneDNN runs it."""
    from conftest import qat_finetune

    run = qat_finetune(float_run, tiny_ds, tmp_path, "onednn", scheme="onednn", per_channel=True)
    qnet = run["net"]
    m = export(qnet, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
    assert m.scheme == "onednn"
    first, second = m.quantized()[:2]
    assert (first.act.qmin, first.act.qmax) == (-128, 127) and (second.act.qmin, second.act.qmax) == (0, 255)
    r0 = float(qnet.features[0].input_max.data().asscalar())
    assert first.act.scale == pytest.approx(r0 / 127.5, rel=1e-6)
    assert second.w.max() == 127 and second.w.min() >= -128
    x = engine.normalize(m, tiny_ds.test_x)
    rec = {}
    sim = engine.simulate(m, x, rec)
    assert rec["features.1"].max() > 127  # uint8 codes in use
    assert np.mean(sim.argmax(1) == run["logits"].argmax(1)) >= 0.998  # simulation = fake-quant graph
    assert np.mean(engine.run_integer(m, x).argmax(1) == sim.argmax(1)) >= 0.998
    fnet = cli.build_for(run["cfg"], tiny_ds, quant=False)
    qnet.save_parameters(str(tmp_path / "q.params"))
    fnet.load_parameters(str(tmp_path / "q.params"), ignore_extra=True)
    block = onednn.with_learned_ranges(fnet, qnet, (3, 16, 16), mx.nd.array(x[:256]))
    one = onednn.logits(block, x).argmax(1)
    kernels = engine.simulate(onednn.kernel_model(qnet, m), x).argmax(1)  # the artifact itself with VNNI
    # measured 100 % and 100 % with AVX2 and with AVX-512 VNNI kernels (DNNL_MAX_CPU_ISA)
    assert np.mean(one == kernels) >= 0.995 and np.mean(one == sim.argmax(1)) >= 0.99


def test_onednn_scheme_weight_codes_are_mxnets():
    """Scheme onednn: the exported weight codes are the ones MXNet 1.9.1's oneDNN convolution makes from
    the float graph: BatchNorm folded with ``gamma / sqrt(var + eps)`` in float64 (then float32), the
    folded weights times ``127.5 / max|w_c|`` in float32, rounded half away from zero, saturated."""
    from train_quantization.config import QuantSpec
    from train_quantization.int8.export import _quantized
    from train_quantization.layers import QConv2DBN

    rng = np.random.default_rng(3)
    blk = QConv2DBN(256, 8, QuantSpec(scheme="onednn", per_channel=True), relu=False)
    blk.initialize()
    w = rng.standard_normal((256, 8, 3, 3)).astype(np.float32)
    w[::2] *= -1.0  # the largest magnitude negative in about half the channels: -max is where codes can differ
    gamma, var = rng.uniform(0.3, 3, 256).astype(np.float32), rng.uniform(0.01, 4, 256).astype(np.float32)
    for p, v in ((blk.weight, w), (blk.gamma, gamma), (blk.running_var, var)):
        p.set_data(mx.nd.array(v))
    alpha = (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)
    w_f = w * alpha[:, None, None, None]
    u = w_f * (np.float32(127.5) / np.abs(w_f).reshape(256, -1).max(1))[:, None, None, None]
    want = np.clip(np.sign(u) * np.floor(np.abs(u) + np.float32(0.5)), -128, 127)
    assert np.array_equal(_quantized(blk, "conv", [-1]).w, want)
    # the float32 fold (gamma / sqrt(var + eps) in float32) moves some channels' -max by one code
    w32 = w * (gamma / np.sqrt(var + np.float32(1e-5)))[:, None, None, None]
    u32 = w32 * (np.float32(127.5) / np.abs(w32).reshape(256, -1).max(1))[:, None, None, None]
    assert not np.array_equal(np.clip(np.rint(u32), -128, 127), want)


def test_conv_dropout_trains_and_every_engine_skips_it(tiny_ds, tmp_path):
    """VGG with Dropout between the conv blocks of a stage (``model.conv_dropout``): the artifact holds the
    same 13 convolutions, and the simulation, the integer-only engine and oneDNN follow the QAT network."""
    from conftest import qat_finetune, train_float
    from train_quantization.int8.model import Conv

    frun = train_float(tmp_path, tiny_ds, name="drop", model={"conv_dropout": [0.1] * 5})
    qrun = qat_finetune(frun, tiny_ds, tmp_path, "drop-q")
    fnet = cli.build_for(qrun["cfg"], tiny_ds, quant=False)
    assert sum(isinstance(b, mx.gluon.nn.Dropout) for b in fnet.features) == 1 + 1 + 2 + 2 + 2
    best = frun["best"]["test_acc"]
    assert best >= 0.8 and qrun["acc"] >= best - 0.05, (best, qrun["acc"])
    qnet = qrun["net"]
    m = export(qnet, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
    assert sum(isinstance(op, Conv) for op in m.layers) == 13
    x = engine.normalize(m, tiny_ds.test_x)
    sim = engine.simulate(m, x).argmax(1)
    assert np.mean(sim == qrun["logits"].argmax(1)) >= 0.998
    assert np.array_equal(engine.run_integer(m, x).argmax(1), sim)
    path = tmp_path / "q.params"
    qnet.save_parameters(str(path))
    fnet.load_parameters(str(path), ignore_extra=True)
    block = onednn.with_learned_ranges(fnet, qnet, (3, 16, 16), mx.nd.array(x[:256]))
    assert np.mean(onednn.logits(block, x).argmax(1) == sim) >= 0.97  # as the original scheme's test above


AMX_CHILD = """
import sys, numpy as np
import train_quantization  # first: it enables AMX before MXNet runs anything
import mxnet as mx, os
from train_quantization import machine
from train_quantization.int8 import onednn
block = mx.gluon.SymbolBlock.imports(sys.argv[1] + "-symbol.json", ["data"], sys.argv[1] + "-0000.params")
np.save(sys.argv[2], onednn.logits(block, np.load(sys.argv[3])))
print("amx_on", machine.amx_on(), "left", os.environ.get("DNNL_MAX_CPU_ISA"), "isa", machine.onednn_isa())
"""


@pytest.mark.skipif(not machine.has_amx() or "DNNL_MAX_CPU_ISA" in os.environ,
                    reason="needs an AMX CPU and no DNNL_MAX_CPU_ISA cap")
def test_amx_int8_computes_what_the_vnni_kernels_compute(nets, tiny_ds, tmp_path):
    """The same oneDNN int8 graph in a process that switched AMX on (``machine.enable_amx``: its convolutions
    run on AMX tiles) gives the logits of this process, which imported MXNet first and runs AVX-512 VNNI."""
    qnet, fnet, m, calib = nets
    block = onednn.with_learned_ranges(fnet, qnet, (3, 16, 16), calib)
    x = engine.normalize(m, tiny_ds.test_x).astype(np.float32)
    here = onednn.logits(block, x)
    block.export(str(tmp_path / "q"))
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "DNNL_MAX_CPU_ISA"}
    env["DNNL_VERBOSE"] = "1"
    out = subprocess.run([sys.executable, "-c", AMX_CHILD, str(tmp_path / "q"), str(tmp_path / "amx.npy"),
                          str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "amx_on True left None isa" in out.stdout and "AMX" in out.stdout.splitlines()[-1]
    assert "avx512_core_amx_int8" in out.stdout  # oneDNN's verbose lines name the kernels that ran
    assert not machine.amx_on()  # MXNet was imported before train_quantization here
    np.testing.assert_array_equal(np.load(tmp_path / "amx.npy"), here)


def test_amx_stays_off_under_a_cap():
    """``DNNL_MAX_CPU_ISA`` set by the user wins: nothing is switched on and the variable is left as it was."""
    code = "import os, train_quantization.machine as m; import train_quantization; " \
           "print(m.amx_on(), os.environ['DNNL_MAX_CPU_ISA'])"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DNNL_MAX_CPU_ISA="AVX2"),
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "AVX2"]
