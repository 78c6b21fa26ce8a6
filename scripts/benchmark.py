#!/usr/bin/env python
"""Training step time (float vs QAT) and inference speed of every execution path, with the machine.

Training: hybridized float step vs QAT steps of the same network and batch, QAT with the
compiled quantizer (``qat_fused``, when it builds) and the stock-MXNet fallback
(``qat_stock``). Inference (``--inference``, default on): images/s at batch 64 and latency
at batch 1 of the variants of ``train_quantization.variants`` that need no trained model or data
(float and int8 in MXNet/oneDNN, the numpy engines, ONNX Runtime), plus artifact sizes and the
int8/float ratios. Weights are random (speed does not depend on them; the numpy engines' float32 fallback,
used without the compiled int8 GEMM, needs more GEMM chunks for larger weights). Everything is measured in
one process after warm-up, alternating between variants, as medians over the repeats. Prints
JSON, a markdown table and the machine (CPU, ISA flags, the ISA oneDNN dispatched).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# train_quantization first: it sets OMP_NUM_THREADS (all cores) before MXNet sizes its thread pool, so MXNet,
# the compiled quantizers, numpy's BLAS and ONNX Runtime all run on the same number of threads
from train_quantization import machine, variants  # noqa: E402, I001

import mxnet as mx  # noqa: E402, I001
from train_quantization.bench import INFERENCE, inference, training  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.int8 import engine, igemm, onnx_export  # noqa: E402


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/cifar10_vgg16_w025.yaml")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="alternating float/QAT blocks")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--range", choices=("ema", "lsq"), default="ema",
                   help="QAT ranges to time: ema (the original) or lsq (learned steps)")
    p.add_argument("--training", type=int, choices=(0, 1), default=1, help="time training steps (0/1)")
    p.add_argument("--inference", type=int, choices=(0, 1), default=1, help="also time inference (0/1)")
    p.add_argument("--onnx-target", choices=onnx_export.TARGETS, default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
    p.add_argument("--variants", default=",".join(INFERENCE),
                   help=f"inference paths to time, comma-separated, of {','.join(INFERENCE)} (default: all)")
    args = p.parse_args()
    keys = [k for k in args.variants.split(",") if k]
    unknown = sorted(set(keys) - set(INFERENCE))
    if unknown or not keys:
        raise UserError(f"--variants: unknown or empty {unknown}; choose from {','.join(INFERENCE)}")
    cfg = load_config(args.config)
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(args.batch_size, 3, args.image_size, args.image_size))
    y = mx.nd.array([i % 10 for i in range(args.batch_size)])
    res, nets = training(cfg, args, x, y)
    res = {"config": args.config, "batch_size": args.batch_size, "width": cfg.model.width,
           "per_channel": args.per_channel, "range": args.range, **res, "machine": machine.facts(),
           "mxnet": mx.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.inference:
        qnet = nets["qat_fused" if "qat_fused" in nets else "qat_stock"]
        res["inference"] = inference(cfg, qnet, nets["float"], x, args.repeats, args.onnx_target, keys)
        res["onnx_target"] = onnx_export.resolve_target(args.onnx_target)
        res["int8_over_float_b64"] = variants.int8_over_float(res["inference"])
        res["numpy_gemm"] = f"int8 ({igemm.isa()})" if engine.resolve("fast") == "int8" else "float32 BLAS"
    print(json.dumps(res, indent=2))
    if args.inference:
        print("\n" + variants.table(list(res["inference"].values()), accuracy=False))
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in res["int8_over_float_b64"].items())
        print(f"images/s ratios at batch 64: {ratios} (ONNX target {res['onnx_target']}; numpy engines' "
              f"GEMM: {res['numpy_gemm']})")
    if args.training:
        print(f"QAT / float training step: {', '.join(f'{k} {v:.3f}' for k, v in res['ratio'].items())}")
    print(f"machine: {machine.describe(res['machine'])}")


if __name__ == "__main__":
    main()
