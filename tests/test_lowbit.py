"""Bit widths 2-8: exact grids, the engines at 4 bits, and what QAT buys over PTQ at W4A4."""
from __future__ import annotations

import numpy as np
import pytest
from mxnet import nd

from conftest import qat_finetune
from train_quantization import quant
from train_quantization.int8 import engine
from train_quantization.int8.export import export


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_and_range_of_every_width(bits):
    wmin, wmax = quant.qrange(bits, signed=True, narrow=True)
    amin, amax = quant.qrange(bits, signed=True)
    assert (wmin, wmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert (amin, amax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    # activations: scale = moving_max / 2**(bits-1); codes of a ramp over [-1.5, 1.5] * moving_max
    moving_max = np.float32(3.0)
    s = moving_max / np.float32(quant.act_divisor(bits))
    x = np.linspace(-1.5, 1.5, 61, dtype=np.float32) * moving_max
    codes = quant.quantize_np(x, s, amin, amax)
    assert codes.min() == amin and codes.max() == amax
    assert np.array_equal(codes, np.clip(np.rint(x / s), amin, amax))
    y = quant.fake_quant(nd, nd.array(x.reshape(1, -1)), nd.array([[s]]), amin, amax).asnumpy().ravel()
    assert np.array_equal(y, (codes * s).astype(np.float32))
    assert len(np.unique(y)) <= 2**bits
    # weights: the largest magnitude lands exactly on +-qmax
    w = np.array([-0.8, -0.1, 0.0, 0.05, 0.4], np.float32)
    sw = quant.weight_scale_np(w, wmax)
    assert quant.quantize_np(w, sw, wmin, wmax)[0] == wmin


@pytest.fixture(scope="module")
def w4a4(float_run, tiny_ds, tmp_path_factory):
    return qat_finetune(float_run, tiny_ds, tmp_path_factory.mktemp("w4a4"), "w4a4", weight_bits=4, act_bits=4,
                        epochs=4, lr=0.01)


def test_engines_agree_at_4_bits(w4a4, tiny_ds):
    m = export(w4a4["net"], *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
    assert all(la["arrays"]["w"].min() >= -7 and la["arrays"]["w"].max() <= 7 for la in m.quantized())
    rec_s, rec_i = {}, {}
    x = engine.normalize(m, tiny_ds.test_x[:100])
    ls = engine.simulate(m, x, rec_s)
    li = engine.run_integer(m, x, rec_i)
    for name, codes in rec_s.items():
        assert codes.min() >= -8 and codes.max() <= 7
        assert np.mean(codes != rec_i[name]) <= 1e-3
    assert np.mean(ls.argmax(1) == li.argmax(1)) >= 0.99
    fq = w4a4["logits"][:100].argmax(1)
    assert np.mean(ls.argmax(1) == fq) >= 0.99


def test_w4a4_qat_beats_ptq(w4a4, float_run):
    """PTQ here: the same EMA ranges from the calibration batches, no fine-tuning."""
    import json

    start = json.loads((w4a4["run"] / "metrics.jsonl").read_text().splitlines()[0])
    float_acc = float_run["best"]["test_acc"]
    ptq = w4a4["ptq_acc"]
    assert w4a4["acc"] >= ptq + 0.03, (ptq, w4a4["acc"], float_acc, start)
