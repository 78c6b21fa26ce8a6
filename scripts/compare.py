#!/usr/bin/env python
"""One table: float (MXNet, ONNX Runtime), PTQ baselines (MXNet naive/entropy, channel-wise; our
EMA ranges without fine-tuning), and the QAT model as fake-quant, simulated int8, integer-only
int8, real oneDNN int8 fed with the learned ranges and ONNX Runtime int8 (QDQ export): every
variant of ``train_quantization.variants``. ONNX rows need the optional install (README). MXNet
1.9.1's tensor-wise PTQ fails on this graph (KeyError 'dense0_weight' in
contrib.quantization._quantize_params), so the MXNet PTQ rows are channel-wise.

  python scripts/compare.py --float runs/w025-fp32-s0 --qat runs/w025-qat-pt-s0

Columns: top-1 accuracy, top-1 agreement with the simulated engine, images/s at batch 64,
latency at batch 1 (medians), bytes of the model file. Writes compare.json and compare.md
into the QAT run folder, and every variant's top-1 predictions into predictions.npz.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import data as data_mod  # noqa: E402
from train_quantization import machine, variants  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.int8 import engine, onnx_export  # noqa: E402


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float", dest="float_run", required=True, help="float run folder (train_fp32.py)")
    p.add_argument("--qat", required=True, help="QAT run folder (train_qat.py) fine-tuned from it")
    p.add_argument("--data", help="dataset (default: the QAT run's data.source)")
    p.add_argument("--calib", type=int, default=1000, help="calibration images for PTQ (from the training set)")
    p.add_argument("--limit", type=int, default=0, help="evaluate N test images drawn at random (0: all)")
    p.add_argument("--batches", type=int, default=5, help="timing repeats per variant (medians)")
    p.add_argument("--onnx-target", choices=onnx_export.TARGETS, default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
    args = p.parse_args()
    qrun = Path(args.qat)
    if not (qrun / "config.yaml").is_file():
        raise UserError(f"{qrun} is not a run folder (no config.yaml)")
    cfg = load_config(qrun / "config.yaml", {"data.source": args.data})
    ds = data_mod.dataset_from_config(cfg.data)
    m = variants.from_runs(args.float_run, args.qat, cfg, ds, args.calib, args.onnx_target)
    fns = variants.build(m)
    if not onnx_export.available():
        print(f"ONNX Runtime rows skipped (not installed: {onnx_export.INSTALL})")
    idx = data_mod.sample(len(ds.test_x), args.limit)
    n, x, labels = len(idx), engine.normalize(m.int8, ds.test_x[idx]), ds.test_y[idx]
    rows, preds = variants.evaluate(fns, x, labels, args.batches)
    variants.kernel_agreement(m, x, rows, preds)
    out = {"float_run": str(args.float_run), "qat_run": str(qrun), "images": n, "calib_images": args.calib,
           "machine": machine.facts(), "onnx_target": onnx_export.resolve_target(args.onnx_target),
           "int8_over_float_b64": variants.int8_over_float({r["key"]: r for r in rows}),
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    print(variants.write_comparison(qrun, out, preds, labels))
    print(f"machine: {machine.describe(out['machine'])}; ONNX target {out['onnx_target']}")
    print(f"written: {qrun / 'compare.json'}, {qrun / 'compare.md'}")


if __name__ == "__main__":
    main()
