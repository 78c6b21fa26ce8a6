"""Shared fixtures: a small synthetic set, and a float model and a QAT model trained on it once."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10_jpeg.tar.gz"

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from train_quantization import cli, train  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.qat import calibrate  # noqa: E402


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if "slow" not in (config.getoption("-m") or ""):
        skip = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def tiny_config(tmp: Path, model: Optional[dict] = None, **keys: object):
    """The tiny config writing under ``tmp``; ``model`` sets ``model`` fields, ``keys`` ``quant`` or ``qat``
    (recipe) fields by name."""
    cfg = load_config(ROOT / "configs" / "synthetic_tiny.yaml", {"out": str(tmp), "data.cache_dir": ""})
    recipe = {k: v for k, v in keys.items() if k in {f.name for f in dataclasses.fields(cfg.qat)}}
    quant = {k: v for k, v in keys.items() if k not in recipe}
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, **quant),
                               qat=dataclasses.replace(cfg.qat, **recipe),
                               model=dataclasses.replace(cfg.model, **(model or {})))


@pytest.fixture(scope="session")
def tiny_ds():
    cfg = load_config(ROOT / "configs" / "synthetic_tiny.yaml")
    return data_mod.dataset_from_config(cfg.data)


def train_float(tmp: Path, ds, seed: int = 0, name: str = "fp32", model: Optional[dict] = None) -> dict:
    """A float VGG16 (width 0.125; ``model``: other model fields) trained for 6 epochs on the synthetic set,
    with its test logits."""
    cfg = dataclasses.replace(tiny_config(tmp, model), name=name, seed=seed)
    train.seed_all(seed)
    net = cli.build_for(cfg, ds, quant=False)
    cli.init_net(net, [mx.cpu()])
    net.hybridize(static_alloc=True)
    run = train.make_run_dir(cfg, "fp32", "tiny")
    best, _ = train.fit(net, cfg, ds, run, [mx.cpu()])
    _, test_loader = data_mod.make_loaders(ds, 64, 250, False, 0)
    ev = train.evaluate(net, test_loader, data_mod.normalizer(*ds.mean_std()), [mx.cpu()], return_outputs=True)
    return {"run": run, "cfg": cfg, "best": best, "logits": ev["logits"]}


@pytest.fixture(scope="session")
def float_run(tmp_path_factory, tiny_ds):
    """The float fixture (``train_float``, seed 0)."""
    return train_float(tmp_path_factory.mktemp("float"), tiny_ds)


def qat_finetune(float_run, tiny_ds, tmp: Path, name: str, **keys: object) -> dict:
    cfg = dataclasses.replace(tiny_config(tmp, **keys), name=name, model=float_run["cfg"].model)
    train.seed_all(0)
    net, new = cli.qat_from_float(cfg, tiny_ds, float_run["run"] / "best.params", [mx.cpu()])
    net.hybridize(static_alloc=True)
    run = train.make_run_dir(cfg, "qat", "tiny")
    loader, test_loader = data_mod.make_loaders(tiny_ds, 64, 250, False, 0)
    norm = data_mod.normalizer(*tiny_ds.mean_std())
    calibrate(net, cfg, tiny_ds, [mx.cpu()])  # as train_qat: the EMA ranges from qat.calib_batches batches
    ptq_acc = train.evaluate(net, test_loader, norm, [mx.cpu()])["acc"]
    train.fit(net, cfg, tiny_ds, run, [mx.cpu()], qat=True)
    ev = train.evaluate(net, test_loader, norm, [mx.cpu()], return_outputs=True)
    return {"run": run, "cfg": cfg, "net": net, "new": new, "acc": ev["acc"], "logits": ev["logits"],
            "norm": norm, "ptq_acc": ptq_acc}


@pytest.fixture(scope="session")
def qat_run(float_run, tiny_ds, tmp_path_factory):
    """The float model fine-tuned for 2 QAT epochs (W8A8, per tensor)."""
    return qat_finetune(float_run, tiny_ds, tmp_path_factory.mktemp("qat"), "qat")


W3A3 = dict(weight_bits=3, act_bits=3, epochs=4, lr=0.002, ste="clipped")  # the low-bit QAT recipe of the tests


@pytest.fixture(scope="session")
def w3a3(float_run, tiny_ds, tmp_path_factory):
    """W3A3 QAT (clipped STE, 4 epochs at lr 0.002, EMA ranges): where post-training quantization loses 8-36
    points of the float fixture's accuracy and QAT wins most of it back (at W4A4 PTQ already keeps 98-99 %)."""
    return qat_finetune(float_run, tiny_ds, tmp_path_factory.mktemp("w3a3"), "w3a3", **W3A3)


@pytest.fixture(scope="session")
def w3a3_lsq(float_run, tiny_ds, tmp_path_factory):
    """The same W3A3 recipe with learned ranges (``quant.range: lsq``)."""
    return qat_finetune(float_run, tiny_ds, tmp_path_factory.mktemp("lsq"), "lsq", range="lsq", **W3A3)


os.environ.setdefault("MXNET_STORAGE_FALLBACK_LOG_VERBOSE", "0")


# ----------------------------------------------------------------------------- engine comparisons
FLOAT_TOL = 1e-4  # engines with identical codes give logits equal to float rounding: below this * max(1, |logit|)


def decided(logits, tol: float = FLOAT_TOL):
    """Images whose top-two logits differ by more than ``tol * max(1, |top|)``: float rounding
    alone cannot swap their top-1 (a tie, e.g. two classes that a model never predicts, can)."""
    import numpy as np

    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > tol * np.maximum(1.0, np.abs(top2[:, 1]))


def top1_agreement(ref, other, tol: float = FLOAT_TOL) -> float:
    """Share of the ``decided`` images of ``ref`` where ``other`` has the same top-1."""
    import numpy as np

    keep = decided(ref, tol)
    assert keep.mean() >= 0.9, f"only {keep.sum()} of {len(keep)} images are decided"
    return float(np.mean(ref[keep].argmax(1) == other[keep].argmax(1)))


def assert_kernels_agree(model, x) -> None:
    """Both engines with each fast GEMM kernel (``int8`` when the library builds, ``float32``) against the
    float64 reference: the same input codes at every quantized layer and the same logits, bit for bit."""
    from train_quantization.int8 import engine, igemm

    for run in (engine.simulate, engine.run_integer):
        ref: dict = {}
        want = run(model, x, ref, kernel="reference")
        for kernel in ["float32"] + (["int8"] if igemm.available() else []):
            got: dict = {}
            out = run(model, x, got, kernel=kernel)
            assert got.keys() == ref.keys() and all(np.array_equal(got[n], ref[n]) for n in ref), (run, kernel)
            assert np.array_equal(out, want), (run, kernel)


def layerwise_codes(model, x, ref_engine, other_engine) -> tuple:
    """Every quantized layer's input codes from ``ref_engine``, and from ``other_engine`` when each of
    its layers reads ``ref_engine``'s codes: a difference cannot come from an earlier layer."""
    ref, got = {}, {}
    ref_engine(model, x, ref)
    other_engine(model, x, got, force=ref)
    return ref, got

