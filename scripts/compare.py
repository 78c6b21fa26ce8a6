#!/usr/bin/env python
"""One table: float (MXNet, ONNX Runtime), PTQ baselines (MXNet naive/entropy,
channel-wise; our EMA ranges without fine-tuning), and the QAT model as fake-quant, simulated
int8, integer-only int8, real oneDNN int8 fed with the learned ranges and ONNX Runtime int8
(QDQ export). ONNX rows need the optional install (README). MXNet 1.9.1's tensor-wise PTQ
fails on this graph (KeyError 'dense0_weight' in contrib.quantization._quantize_params), so
the MXNet PTQ rows are channel-wise; per-tensor PTQ is our EMA row (and sweep_bits.py).

  python scripts/compare.py --float runs/w025-fp32-s0 --qat runs/w025-qat-pt-s0

Columns: top-1 accuracy, top-1 agreement with the simulated engine, images/s at batch 64,
latency at batch 1 (median), bytes of the model file. Writes compare.json and compare.md
into the QAT run folder, and every variant's top-1 predictions into predictions.npz.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from train_quantization import cli, machine  # noqa: E402
from train_quantization import data as data_mod  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.int8 import engine, onednn, onnx_export  # noqa: E402
from train_quantization.int8 import model as int8_model  # noqa: E402
from train_quantization.int8.export import export  # noqa: E402


def _speed(fn, x: np.ndarray, batches: int, latency_runs: int) -> tuple:  # noqa: ANN001
    """(images/s at batch 64, median latency in ms at batch 1), after warm-up."""
    b64, b1 = x[:64], x[:1]
    fn(b64)
    fn(b1)
    t = time.perf_counter()
    for _ in range(batches):
        fn(b64)
    ips = 64 * batches / (time.perf_counter() - t)
    lat = []
    for _ in range(latency_runs):
        t = time.perf_counter()
        fn(b1)
        lat.append(time.perf_counter() - t)
    return ips, 1000 * statistics.median(lat)


def _mx_fn(block):  # noqa: ANN001, ANN202
    return lambda a: block(mx.nd.array(a)).asnumpy()


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float", dest="float_run", required=True, help="float run folder (train_fp32.py)")
    p.add_argument("--qat", required=True, help="QAT run folder (train_qat.py) fine-tuned from it")
    p.add_argument("--data", help="dataset (default: the QAT run's data.source)")
    p.add_argument("--calib", type=int, default=1000, help="calibration images for PTQ (from the training set)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N test images (0: all)")
    p.add_argument("--batches", type=int, default=5, help="timed batches of 64 per variant")
    p.add_argument("--onnx-target", choices=onnx_export.TARGETS, default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
    args = p.parse_args()
    qrun = Path(args.qat)
    if not (qrun / "config.yaml").is_file():
        raise UserError(f"{qrun} is not a run folder (no config.yaml)")
    cfg = load_config(qrun / "config.yaml", {"data.source": args.data})
    ds = data_mod.dataset_from_config(cfg.data)
    mean, std = ds.mean_std()
    h, w, c = ds.image_shape
    shape = (c, h, w)
    ctx = [mx.cpu()]
    fnet = cli.build_for(cfg, ds, quant=False)
    fpath = cli.resolve_params(args.float_run)
    cli.load_weights(fnet, fpath, ctx, expect_ranges=False)
    qnet = cli.build_for(cfg, ds, quant=True)
    qpath = cli.resolve_params(str(qrun), "last.params")
    cli.load_weights(qnet, qpath, ctx, expect_ranges=True)
    qweights = cli.float_with_qat_weights(cfg, ds, qnet)  # for oneDNN
    for net in (fnet, qnet, qweights):
        net.hybridize(static_alloc=True)
    m = export(qnet, mean, std, shape, ds.classes)
    n = args.limit or len(ds.test_x)
    x = engine.normalize(m, ds.test_x[:n])
    labels = ds.test_y[:n]
    rng = np.random.default_rng(cfg.seed)
    calib = mx.nd.array(engine.normalize(m, ds.train_x[rng.choice(len(ds.train_x), args.calib, replace=False)]))
    with tempfile.TemporaryDirectory() as d:
        art = int8_model.save(m, Path(d) / "m.npz")
        art_bytes = int8_model.artifact_size(art)
    ema, _ = cli.qat_from_float(cfg, ds, fpath, ctx)  # our quantizer, EMA ranges, float weights: PTQ, no QAT
    ema.hybridize(static_alloc=True)
    with mx.autograd.train_mode():
        for i in range(0, args.calib, cfg.data.batch_size):
            ema(calib[i:i + cfg.data.batch_size]).wait_to_read()
    variants = {
        "float (MXNet)": (_mx_fn(fnet), fpath.stat().st_size),
        "PTQ naive, channel-wise (oneDNN int8)": (_mx_fn(onednn.ptq(fnet, shape, calib, "naive")), None),
        "PTQ entropy, channel-wise (oneDNN int8)": (_mx_fn(onednn.ptq(fnet, shape, calib, "entropy")), None),
        "PTQ EMA ranges, no fine-tuning (ours, fake-quant)": (_mx_fn(ema), None),
        "QAT fake-quant (MXNet)": (_mx_fn(qnet), qpath.stat().st_size),
        "QAT simulated int8 (numpy)": (lambda a: engine.simulate(m, a), art_bytes),
        "QAT integer-only (numpy)": (lambda a: engine.run_integer(m, a), art_bytes),
        "QAT oneDNN int8, learned ranges": (_mx_fn(onednn.with_learned_ranges(qweights, qnet, shape, calib)), None),
    }
    if onnx_export.available():
        with tempfile.TemporaryDirectory() as d:
            f_onnx = onnx_export.save_float(fnet, shape, Path(d) / "f.onnx")
            q_onnx = onnx_export.save_qdq(m, Path(d) / "q.onnx", args.onnx_target)
            variants["float (ONNX Runtime)"] = (onnx_export.runner(onnx_export.session(f_onnx)),
                                                f_onnx.stat().st_size)
            variants["QAT int8 QDQ (ONNX Runtime)"] = (onnx_export.runner(onnx_export.session(q_onnx)),
                                                       q_onnx.stat().st_size)
    else:
        print(f"ONNX Runtime rows skipped (not installed: {onnx_export.INSTALL})")
    rows, preds = [], {}
    for name, (fn, size) in variants.items():
        logits = np.concatenate([fn(x[i:i + 250]) for i in range(0, n, 250)])
        preds[name] = logits.argmax(1)
        slow = "numpy" in name
        ips, lat = _speed(fn, x, 2 if slow else args.batches, 5 if slow else 30)
        rows.append({"variant": name, "acc": float((preds[name] == labels).mean()), "images_per_s_b64": round(ips, 1),
                     "latency_ms_b1": round(lat, 2), "model_bytes": size})
    sim = preds["QAT simulated int8 (numpy)"]
    for r in rows:
        r["agree_sim"] = float((preds[r["variant"]] == sim).mean())
    out = {"float_run": str(args.float_run), "qat_run": str(qrun), "images": n, "calib_images": args.calib,
           "machine": machine.facts(), "onnx_target": onnx_export.resolve_target(args.onnx_target),
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    cli.write_json(qrun / "compare.json", out)
    tmp = qrun / "predictions.tmp.npz"  # for report.py: where float and int8 disagree
    np.savez_compressed(tmp, labels=labels, variants=np.array(list(preds)), preds=np.stack(list(preds.values())))
    os.replace(tmp, qrun / "predictions.npz")
    lines = ["| variant | top-1 % | = simulated % | images/s (batch 64) | latency ms (batch 1) | model bytes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['model_bytes']:,}" if r["model_bytes"] else "float32 weights, quantized at load"
        lines.append(f"| {r['variant']} | {100 * r['acc']:.2f} | {100 * r['agree_sim']:.2f} | "
                     f"{r['images_per_s_b64']:.0f} | {r['latency_ms_b1']:.2f} | {size} |")
    (qrun / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"machine: {machine.describe(out['machine'])}; ONNX target {out['onnx_target']}")
    print(f"written: {qrun / 'compare.json'}, {qrun / 'compare.md'}")


if __name__ == "__main__":
    main()
