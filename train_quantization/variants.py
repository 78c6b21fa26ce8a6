"""Every way this project runs a model at inference, in one registry, and one way to time them.

A ``Variant`` has a key (what JSON records and reports use), a display name, and ``build``: from
the ``Models`` at hand (float network, QAT network, int8 artifact, calibration images) it returns
``(f, bytes)``: ``f(x) -> logits`` for normalized float32 NCHW batches, and the size of what it
runs from (None: float32 weights quantized at load). ``compare.py`` runs them on a trained model
(accuracy, agreement, speed), ``benchmark.py`` on random weights (speed), ``report.py`` reads
their rows by key. ``speeds`` times any of them in one process, alternating, as medians.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import mxnet as mx
import numpy as np

from .errors import UserError
from .int8 import model as int8_model
from .int8 import onednn, onnx_export

log = logging.getLogger("train_quantization")


@dataclass
class Models:
    """What the variants are built from; ``qat``-based variants need ``qat_net`` and ``int8``."""

    shape: tuple  # C, H, W
    float_net: mx.gluon.HybridBlock  # float weights
    calib: mx.nd.NDArray  # normalized calibration images (PTQ, logit range of oneDNN)
    float_bytes: Optional[int] = None
    qat_net: Optional[mx.gluon.HybridBlock] = None
    qat_float_graph: Optional[mx.gluon.HybridBlock] = None  # the float graph holding the QAT weights (oneDNN)
    qat_bytes: Optional[int] = None
    int8: Optional[int8_model.Int8Model] = None
    ema_net: Optional[mx.gluon.HybridBlock] = None  # our quantizer, EMA ranges, float weights (PTQ)
    onnx_target: str = "auto"
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tq-variants-")))


def _mx(block: mx.gluon.Block) -> Callable:
    return lambda a: block(mx.nd.array(a)).asnumpy()


def _artifact_bytes(m: Models) -> int:
    return int8_model.artifact_size(int8_model.save(m.int8, m.tmp / "model.int8.npz"))


def _onnx(m: Models, quantized: bool) -> tuple:
    if quantized:
        path = onnx_export.save_qdq(m.int8, m.tmp / "q.onnx", m.onnx_target)
    else:
        path = onnx_export.save_float(m.float_net, m.shape, m.tmp / "f.onnx")
    return onnx_export.runner(onnx_export.session(path)), path.stat().st_size


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    build: Callable[[Models], tuple]
    qat: bool = True  # needs the QAT model
    numpy: bool = False  # a numpy engine: fewer timed batches
    onnx: bool = False  # needs ONNX Runtime (optional install)


VARIANTS = (
    Variant("float", "float (MXNet)", lambda m: (_mx(m.float_net), m.float_bytes), qat=False),
    Variant("ptq_naive", "PTQ naive, channel-wise (oneDNN int8)",
            lambda m: (_mx(onednn.ptq(m.float_net, m.shape, m.calib, "naive")), None), qat=False),
    Variant("ptq_entropy", "PTQ entropy, channel-wise (oneDNN int8)",
            lambda m: (_mx(onednn.ptq(m.float_net, m.shape, m.calib, "entropy")), None), qat=False),
    Variant("ptq_ema", "PTQ EMA ranges, no fine-tuning (ours, fake-quant)", lambda m: (_mx(m.ema_net), None)),
    Variant("fake_quant", "QAT fake-quant (MXNet)", lambda m: (_mx(m.qat_net), m.qat_bytes)),
    Variant("sim", "QAT simulated int8 (numpy)", lambda m: (m.int8.simulate, _artifact_bytes(m)), numpy=True),
    Variant("integer", "QAT integer-only (numpy)", lambda m: (m.int8.run_integer, _artifact_bytes(m)), numpy=True),
    Variant("onednn", "QAT oneDNN int8, learned ranges",
            lambda m: (_mx(onednn.with_learned_ranges(m.qat_float_graph, m.qat_net, m.shape, m.calib)), None)),
    Variant("onnx_float", "float (ONNX Runtime)", lambda m: _onnx(m, False), qat=False, onnx=True),
    Variant("onnx_int8", "QAT int8 QDQ (ONNX Runtime)", lambda m: _onnx(m, True), onnx=True),
)
BY_KEY = {v.key: v for v in VARIANTS}


def build(models: Models, keys: Optional[list] = None) -> dict:
    """``{key: (f, bytes)}`` of the variants named by ``keys`` (default: all that ``models`` can run;
    the ONNX ones only where ONNX Runtime is installed)."""
    out = {}
    for v in VARIANTS:
        if keys is not None and v.key not in keys:
            continue
        if (v.qat and models.qat_net is None) or (v.key == "ptq_ema" and models.ema_net is None):
            continue
        if v.onnx and not onnx_export.available():
            continue
        try:
            out[v.key] = v.build(models)
        except UserError as exc:  # a runtime that cannot run this model (said why in one line)
            log.warning("%s: skipped: %s", v.name, exc)
    return out


SETTLE_S = 0.3  # seconds between timed variants


def speeds(fns: dict, x: np.ndarray, repeats: int = 5) -> dict:
    """Median images/s at batch 64 (of the repeats) and median latency (ms) at batch 1 (of every call) of
    each ``{key: f}``, timed in this process after a warm-up, alternating between the variants ``repeats``
    times (a numpy engine runs 3 batches and 4 single images per repeat, the others 5 and 20). Each block
    follows one untimed call at its batch size, as a deployment at a fixed batch size runs: a hybridized
    static-shape graph re-plans its memory when the batch size changes (for the full-width oneDNN int8
    VGG16 at batch 1, that one call costs more than the 20 timed ones together). Each variant starts after a pause of
    ``SETTLE_S``: the previous runtime's idle worker threads spin-wait for a while (OpenMP, ONNX Runtime)
    and would take the cores from the next."""
    b64 = np.concatenate([x] * (64 // len(x) + 1))[:64]
    b1 = x[:1]
    for f in fns.values():
        f(b64)
        f(b1)
    ips: dict = {k: [] for k in fns}
    lat: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            n64, n1 = (3, 4) if BY_KEY.get(k, VARIANTS[0]).numpy else (5, 20)
            time.sleep(SETTLE_S)
            f(b64)  # untimed: a static-shape MXNet graph re-plans its memory at each change of batch size
            t = time.perf_counter()
            for _ in range(n64):
                f(b64)
            ips[k].append(n64 * 64 / (time.perf_counter() - t))
            f(b1)
            for _ in range(n1):
                t = time.perf_counter()
                f(b1)
                lat[k].append(1000 * (time.perf_counter() - t))
    return {k: (statistics.median(ips[k]), statistics.median(lat[k])) for k in fns}


def int8_over_float(rows: dict) -> dict:
    """int8 over float throughput at batch 64 within each runtime, and the numpy engines over MXNet float, from
    ``{key: {"images_per_s_b64": ...}}``."""
    pairs = {"oneDNN / MXNet float": ("onednn", "float"), "ONNX Runtime int8 / float": ("onnx_int8", "onnx_float"),
             "numpy simulated / MXNet float": ("sim", "float"),
             "numpy integer-only / MXNet float": ("integer", "float")}
    return {name: round(rows[a]["images_per_s_b64"] / rows[b]["images_per_s_b64"], 2)
            for name, (a, b) in pairs.items() if a in rows and b in rows}


def table(rows: list, accuracy: bool) -> str:
    """Markdown table of variant rows (``compare.json``'s ``rows``)."""
    head = ["variant"] + (["top-1 %", "= simulated %"] if accuracy else []) + \
        ["images/s (batch 64)", "latency ms (batch 1)", "model bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size = f"{r['model_bytes']:,}" if r.get("model_bytes") else "float32 weights, quantized at load"
        acc = [f"{100 * r['acc']:.2f}", f"{100 * r['agree_sim']:.2f}"] if accuracy else []
        lines.append("| " + " | ".join([r["variant"]] + acc + [f"{r['images_per_s_b64']:.0f}",
                                                                f"{r['latency_ms_b1']:.2f}", size]) + " |")
    return "\n".join(lines)


def bytes_on_disk(block: Any) -> int:
    """Bytes of a Gluon block's parameters as ``save_parameters`` writes them."""
    with tempfile.TemporaryDirectory() as d:
        block.save_parameters(os.path.join(d, "p.params"))
        return os.path.getsize(os.path.join(d, "p.params"))


def from_runs(float_run: str, qat_run: str, cfg: Any, ds: Any, calib_images: int, onnx_target: str = "auto") -> Models:
    """The float run's and QAT run's networks, the int8 artifact and ``calib_images`` PTQ calibration images."""
    from . import cli
    from .int8 import engine
    from .int8.export import export

    ctx = [mx.cpu()]
    h, w, c = ds.image_shape
    fnet = cli.build_for(cfg, ds, quant=False)
    fpath = cli.resolve_params(float_run)
    cli.load_weights(fnet, fpath, ctx, expect_ranges=False)
    qnet = cli.build_for(cfg, ds, quant=True)
    qpath = cli.resolve_params(qat_run, "last.params")
    cli.load_weights(qnet, qpath, ctx, expect_ranges=True)
    ema, _ = cli.qat_from_float(cfg, ds, fpath, ctx)  # our quantizer, EMA ranges, float weights: PTQ, no QAT
    qweights = cli.float_with_qat_weights(cfg, ds, qnet)
    for net in (fnet, qnet, qweights, ema):
        net.hybridize(static_alloc=True, static_shape=True)  # inference: static memory and shapes, as oneDNN's
    m = export(qnet, *ds.mean_std(), (c, h, w), ds.classes)
    pick = np.random.default_rng(cfg.seed).choice(len(ds.train_x), calib_images, replace=False)
    calib = mx.nd.array(engine.normalize(m, ds.train_x[pick]))
    with mx.autograd.train_mode():
        for i in range(0, calib_images, cfg.data.batch_size):
            ema(calib[i:i + cfg.data.batch_size]).wait_to_read()
    return Models((c, h, w), fnet, calib, fpath.stat().st_size, qnet, qweights, qpath.stat().st_size, m, ema,
                           onnx_target)




def _batched(f: Callable, x: np.ndarray, batch: int = 250) -> np.ndarray:
    """``f`` over ``x`` in batches, concatenated."""
    return np.concatenate([f(x[i:i + batch]) for i in range(0, len(x), batch)])


def evaluate(fns: dict, x: np.ndarray, labels: np.ndarray, repeats: int) -> tuple:
    """``(rows, top-1 predictions)`` of the variants ``{key: (f, bytes)}`` on normalized images ``x``:
    accuracy, agreement with the simulated engine, speed (``speeds``), model bytes."""
    preds = {k: _batched(f, x).argmax(1) for k, (f, _) in fns.items()}
    speed = speeds({k: f for k, (f, _) in fns.items()}, x, repeats)
    rows = [{"key": k, "variant": BY_KEY[k].name, "acc": float((preds[k] == labels).mean()),
             "agree_sim": float((preds[k] == preds["sim"]).mean()), "images_per_s_b64": round(speed[k][0], 1),
             "latency_ms_b1": round(speed[k][1], 3), "model_bytes": size} for k, (_, size) in fns.items()]
    return rows, preds


def kernel_agreement(m: Models, x: np.ndarray, rows: list, preds: dict) -> None:
    """Add to the oneDNN row ``agree_kernel_sim``: its top-1 agreement with the simulation of the arithmetic
    this CPU's oneDNN kernels run (``onednn.kernel_model``; the artifact's simulation on a CPU with VNNI)."""
    if "onednn" not in preds or "sim" not in preds:
        return
    kernels = onednn.kernel_model(m.qat_net, m.int8)
    sim = preds["sim"] if kernels is m.int8 else _batched(kernels.simulate, x).argmax(1)
    for r in rows:
        if r["key"] == "onednn":
            r["agree_kernel_sim"] = float((preds["onednn"] == sim).mean())


def write_comparison(run: Path, out: dict, preds: dict, labels: np.ndarray) -> str:
    """``compare.json`` (``out``), ``predictions.npz`` (every variant's top-1, for report.py's disagreement
    matrix) and ``compare.md`` into the QAT run folder; returns the markdown table."""
    from .cli import write_json

    write_json(run / "compare.json", out)
    tmp = run / "predictions.tmp.npz"
    np.savez_compressed(tmp, labels=labels, variants=np.array(list(preds)), preds=np.stack(list(preds.values())),
                        names=np.array([BY_KEY[k].name for k in preds]))
    os.replace(tmp, run / "predictions.npz")
    text = table(out["rows"], accuracy=True)
    kernel = [r["agree_kernel_sim"] for r in out["rows"] if "agree_kernel_sim" in r]
    if kernel:
        from .machine import onednn_vnni

        how = ("with VNNI: the artifact's arithmetic" if onednn_vnni() else "without VNNI: int8-input convolutions "
               "on even weight codes, products summed in pairs in int16")
        text += (f"\n\noneDNN int8 = the simulation of this CPU's oneDNN kernels ({how}; onednn.kernel_model): "
                 f"{100 * kernel[0]:.2f} %")
    (run / "compare.md").write_text(text + "\n")
    return text
