#!/usr/bin/env python
"""Int8 inference of a QAT model: float-simulated and integer-only engines, int8 artifact.

  --qat RUN            evaluate the QAT run folder's model (exports it in memory)
  --qat RUN --export F also write the int8 artifact F
  --artifact F         evaluate from the artifact alone (numpy only, no MXNet)
  --engine onnx|all    ONNX Runtime's int8 kernels on the QDQ export (--onnx F writes it)

Reports accuracy, top-1 agreement with the fake-quant evaluation (and between engines),
the largest logit difference, and the artifact's size next to the float checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.int8 import engine  # noqa: E402
from train_quantization.int8 import model as int8_model


def _fake_quant_logits(run: Path, data: str | None, ckpt: str) -> tuple:
    from train_quantization import cli, train
    from train_quantization import data as data_mod
    from train_quantization.config import load_config
    from train_quantization.int8.export import export

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


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qat", help="QAT run folder (from train_qat.py)")
    p.add_argument("--checkpoint", default="last.params", help="file in the QAT run folder (default last.params)")
    p.add_argument("--artifact", help="evaluate this int8 artifact (.npz) instead of --qat")
    p.add_argument("--export", help="write the int8 artifact here (with --qat)")
    p.add_argument("--data", help="dataset (default: the run's data.source); needed with --artifact")
    p.add_argument("--engine", choices=("sim", "integer", "onnx", "both", "all"), default="both",
                   help="both: sim and integer; onnx: ONNX Runtime int8 (optional install); all: the three")
    p.add_argument("--onnx", help="also write the QDQ ONNX model to this file")
    p.add_argument("--onnx-target", choices=("auto", "avx2", "vnni"), default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N test images (0: all)")
    p.add_argument("--json", help="write the report here (default: <run>/int8_eval.json with --qat)")
    args = p.parse_args()
    if bool(args.qat) == bool(args.artifact):
        raise UserError("pass exactly one of --qat RUN_DIR or --artifact FILE")
    fq_logits, report = None, {}
    if args.qat:
        run = Path(args.qat)
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run} is not a run folder (no config.yaml); pass the folder train_qat.py printed")
        model, ds, fq_logits, pretrained = _fake_quant_logits(run, args.data, args.checkpoint)
        path = Path(args.export) if args.export else Path(tempfile.mkdtemp()) / "model.int8.npz"
        int8_model.save(model, path)
        report["artifact"] = str(path) if args.export else None
        report["artifact_bytes"] = int8_model.artifact_size(path)
        if pretrained and Path(pretrained).is_file():
            report["float_params_bytes"] = Path(pretrained).stat().st_size
            report["size_ratio"] = report["artifact_bytes"] / report["float_params_bytes"]
        model = int8_model.load(path)  # evaluate what the file holds
    else:
        from train_quantization import data as data_mod
        from train_quantization.config import DataConfig

        model = int8_model.load(args.artifact)
        if not args.data:
            raise UserError("--artifact needs --data (the dataset to evaluate on)")
        ds = data_mod.dataset_from_config(DataConfig(source=args.data))
        h, w, c = ds.image_shape
        if (c, h, w) != tuple(model.input_shape):
            raise UserError(f"the artifact expects {tuple(model.input_shape)} (C, H, W) inputs, the data has "
                            f"{(c, h, w)}; pass the dataset it was trained on")
        report["artifact"] = args.artifact
        report["artifact_bytes"] = int8_model.artifact_size(args.artifact)
    n = args.limit or len(ds.test_x)
    images, labels = ds.test_x[:n], ds.test_y[:n]
    engines = {"both": ["sim", "integer"], "all": ["sim", "integer", "onnx"]}.get(args.engine, [args.engine])
    if args.onnx:
        from train_quantization.int8.onnx_export import save_qdq

        report["onnx"] = str(save_qdq(model, args.onnx, args.onnx_target))
    preds = {}
    if fq_logits is not None:
        fq_logits = fq_logits[:n]
        preds["fake_quant"] = fq_logits.argmax(1)
        report["fake_quant_acc"] = float((preds["fake_quant"] == labels).mean())
    for name in engines:
        t0 = time.time()
        logits = engine.predict(model, images, name, progress=True, onnx_target=args.onnx_target)
        preds[name] = logits.argmax(1)
        report[f"{name}_acc"] = float((preds[name] == labels).mean())
        report[f"{name}_seconds"] = round(time.time() - t0, 2)
        if fq_logits is not None:
            report[f"{name}_agree_fake_quant"] = float((preds[name] == preds["fake_quant"]).mean())
            report[f"{name}_max_logit_diff_fake_quant"] = float(np.abs(logits - fq_logits).max())
    for other in ("integer", "onnx"):
        if "sim" in preds and other in preds:
            report[f"{other}_agree_sim"] = float((preds[other] == preds["sim"]).mean())
    report["images"] = int(n)
    if "onnx" in engines or args.onnx:
        from train_quantization.int8.onnx_export import resolve_target

        report["onnx_target"] = resolve_target(args.onnx_target)
    from train_quantization.machine import facts

    report["machine"] = facts()
    out = args.json or (str(Path(args.qat) / "int8_eval.json") if args.qat else None)
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    for k, v in report.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")


if __name__ == "__main__":
    main()
