#!/usr/bin/env python
"""Int8 inference of a QAT model: float-simulated and integer-only engines, int8 artifact.

  --qat RUN            evaluate the QAT run folder's model (exports it in memory)
  --qat RUN --export F also write the int8 artifact F
  --artifact F         evaluate from the artifact alone (numpy only, no MXNet)
  --engine onnx|all    ONNX Runtime's int8 kernels on the QDQ export (--onnx F writes it)

Reports accuracy, top-1 agreement with the fake-quant evaluation (and between engines),
the largest logit difference, where disagreements sit (``*_disagree_margin_*``: the largest top-1/top-2
margin of the reference among the images two engines decide differently; ``*_disagree_closest_*``: the share
of all images at or below it), the artifact's size next to the float checkpoint, and the machine.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import data as data_mod  # noqa: E402
from train_quantization import evaluate  # noqa: E402
from train_quantization.errors import cli_main  # noqa: E402


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
    p.add_argument("--sim-precision", choices=("float64", "float32"), default="float64",
                   help="the simulation's values between layers: float64 (the exact codes but within 2**-52 of a "
                        "rounding boundary) or float32 (the fake-quant graph's and ONNX Runtime's division)")
    p.add_argument("--limit", type=int, default=0, help="evaluate N test images drawn at random (0: all)")
    p.add_argument("--json", help="write the report here (default: <run>/int8_eval.json with --qat)")
    args = p.parse_args()
    model, ds, fq_logits, report = evaluate.load_model(args.qat, args.artifact, args.data, args.checkpoint,
                                                       args.export)
    idx = data_mod.sample(len(ds.test_x), args.limit)
    engines = {"both": ["sim", "integer"], "all": ["sim", "integer", "onnx"]}.get(args.engine, [args.engine])
    if args.onnx:
        report["onnx"] = str(model.to_onnx(args.onnx, args.onnx_target))
    report.update(evaluate.evaluate(model, ds.test_x[idx], ds.test_y[idx], engines,
                                    None if fq_logits is None else fq_logits[idx], args.onnx_target,
                                    args.sim_precision))
    report["images"] = len(idx)
    evaluate.write(report, args.json or (str(Path(args.qat) / "int8_eval.json") if args.qat else None),
                   args.onnx_target if "onnx" in engines or args.onnx else None)
    for k, v in report.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")


if __name__ == "__main__":
    main()
