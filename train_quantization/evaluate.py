"""Evaluate an int8 model: the simulated, integer-only and ONNX Runtime engines against the labels and
the fake-quant network (``sim_int8_infer.py``)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .int8 import engine
from .int8 import model as int8_model


def fake_quant_logits(run: Path, data: str | None, ckpt: str) -> tuple:
    """The QAT run's int8 model, dataset, fake-quant logits on the test set and float checkpoint path."""
    from . import cli, train
    from . import data as data_mod
    from .config import load_config
    from .int8.export import export

    cfg = load_config(run / "config.yaml", {"data.source": data})
    ctxs = train.parse_ctx("cpu")
    ds = data_mod.dataset_from_config(cfg.data)
    net = cli.build_for(cfg, ds, quant=True)
    cli.load_weights(net, cli.resolve_params(str(run), ckpt), ctxs, expect_ranges=True)
    net.hybridize(static_alloc=True)
    _, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
    mean, std = ds.mean_std()
    ev = train.evaluate(net, test_loader, data_mod.normalizer(mean, std), ctxs, return_outputs=True)
    h, w, c = ds.image_shape
    m = export(net, mean, std, (c, h, w), ds.classes)
    pretrained = None
    res = run / "result.json"
    if res.is_file():
        pretrained = json.loads(res.read_text()).get("pretrained")
    return m, ds, ev["logits"], pretrained




def load_model(qat: Optional[str], artifact: Optional[str], data: Optional[str], checkpoint: str,
               export_to: Optional[str]) -> tuple:
    """``(int8 model, dataset, fake-quant logits or None, report)`` from a QAT run folder (exported, and
    written to ``export_to``) or an artifact file with a dataset."""
    report: dict = {}
    if bool(qat) == bool(artifact):
        raise UserError("pass exactly one of --qat RUN_DIR or --artifact FILE")
    if qat:
        run = Path(qat)
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run} is not a run folder (no config.yaml); pass the folder train_qat.py printed")
        model, ds, fq_logits, pretrained = fake_quant_logits(run, data, checkpoint)
        path = Path(export_to) if export_to else Path(tempfile.mkdtemp()) / "model.int8.npz"
        int8_model.save(model, path)
        report.update(artifact=str(path) if export_to else None, artifact_bytes=int8_model.artifact_size(path))
        if pretrained and Path(pretrained).is_file():
            report["float_params_bytes"] = Path(pretrained).stat().st_size
            report["size_ratio"] = report["artifact_bytes"] / report["float_params_bytes"]
        return int8_model.load(path), ds, fq_logits, report  # evaluate what the file holds
    from . import data as data_mod
    from .config import DataConfig

    model = int8_model.load(artifact)
    if not data:
        raise UserError("--artifact needs --data (the dataset to evaluate on)")
    ds = data_mod.dataset_from_config(DataConfig(source=data))
    h, w, c = ds.image_shape
    if (c, h, w) != tuple(model.input_shape):
        raise UserError(f"the artifact expects {tuple(model.input_shape)} (C, H, W) inputs, the data has "
                        f"{(c, h, w)}; pass the dataset it was trained on")
    report.update(artifact=artifact, artifact_bytes=int8_model.artifact_size(artifact))
    return model, ds, None, report


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of each row: how far an image is from a tie."""
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def agreement(report: dict, name: str, ref_name: str, ref: np.ndarray, other: np.ndarray) -> None:
    """Top-1 agreement of engine ``name`` with ``ref_name``, their largest logit difference and where the
    disagreements sit: ``disagree_margin``, the largest top-1/top-2 margin of ``ref`` among the images on
    which they disagree (at most twice the logit difference), and ``disagree_closest``, the share of all
    images at or below that margin (0 without disagreement). A small share says the two engines differ only on
    the images nearest a tie, where rounding one code differently tips the decision."""
    differ = ref.argmax(1) != other.argmax(1)
    gap = margin(ref)
    worst = float(gap[differ].max(initial=0.0))
    report[f"{name}_agree_{ref_name}"] = float(1.0 - differ.mean())
    report[f"{name}_max_logit_diff_{ref_name}"] = float(np.abs(other - ref).max())
    report[f"{name}_disagree_margin_{ref_name}"] = worst
    report[f"{name}_disagree_closest_{ref_name}"] = float((gap <= worst).mean()) if differ.any() else 0.0


def evaluate(model: int8_model.Int8Model, images: np.ndarray, labels: np.ndarray, engines: list,
             fq_logits: Optional[np.ndarray] = None, onnx_target: str = "auto",
             sim_precision: str = "float64") -> dict:
    """Accuracy and time of each engine; agreement with the fake-quant network and of the other engines with
    the simulation (``agreement``: top-1, logit difference, margin of the disagreements); the simulation
    at ``sim_precision`` (``engine.simulate``)."""
    report, logits = {}, {}
    if "sim" in engines:
        report["sim_precision"] = sim_precision
    if fq_logits is not None:
        report["fake_quant_acc"] = float((fq_logits.argmax(1) == labels).mean())
    for name in engines:
        t0 = time.time()
        logits[name] = engine.predict(model, images, name, progress=True, onnx_target=onnx_target,
                                      precision=sim_precision)
        report[f"{name}_acc"] = float((logits[name].argmax(1) == labels).mean())
        report[f"{name}_seconds"] = round(time.time() - t0, 2)
        if fq_logits is not None:
            agreement(report, name, "fake_quant", fq_logits, logits[name])
    for other in ("integer", "onnx"):
        if "sim" in logits and other in logits:
            agreement(report, other, "sim", logits["sim"], logits[other])
    return report


def write(report: dict, path: Optional[str], onnx_target: Optional[str] = None) -> None:
    """Add the machine (and the ONNX target used) to ``report`` and write it to ``path`` if given."""
    from .machine import facts

    if onnx_target:
        from .int8.onnx_export import resolve_target

        report["onnx_target"] = resolve_target(onnx_target)
    report["machine"] = facts()
    if path:
        from .train import atomic_write_text

        atomic_write_text(Path(path), json.dumps(report, indent=2))
