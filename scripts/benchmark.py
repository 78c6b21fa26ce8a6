#!/usr/bin/env python
"""Training step time (float vs QAT) and inference speed of every execution path, with the machine.

Training: hybridized float step vs QAT steps of the same network and batch, QAT with the
compiled quantizer (``qat_fused``, when it builds) and the stock-MXNet fallback
(``qat_stock``). Inference (``--inference``, default on): images/s at batch 64 and latency
at batch 1 of the variants of ``train_quantization.variants`` that need no trained model or data
(float and int8 in MXNet/oneDNN, the numpy engines, ONNX Runtime), plus artifact sizes and the
int8/float ratios. Weights are random (speed does not depend on them). Everything is measured in
one process after warm-up, alternating between variants, as medians over the repeats. Prints
JSON, a markdown table and the machine (CPU, ISA flags, the ISA oneDNN dispatched).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from train_quantization import fused, machine, variants  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.convert import copy_to_float  # noqa: E402
from train_quantization.errors import cli_main  # noqa: E402
from train_quantization.int8 import onnx_export  # noqa: E402
from train_quantization.int8.export import export  # noqa: E402
from train_quantization.models import build_model  # noqa: E402

INFERENCE = ("float", "fake_quant", "sim", "integer", "onednn", "onnx_float", "onnx_int8")


def _stepper(net: gluon.HybridBlock, x: mx.nd.NDArray, y: mx.nd.NDArray):  # noqa: ANN202
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-4, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step() -> None:
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(x.shape[0])
        loss.wait_to_read()

    return step


def _time(step, n: int) -> float:  # noqa: ANN001
    t = time.perf_counter()
    for _ in range(n):
        step()
    mx.nd.waitall()
    return (time.perf_counter() - t) / n


def training(cfg, args: argparse.Namespace, x: mx.nd.NDArray, y: mx.nd.NDArray) -> tuple:  # noqa: ANN001
    """Median step times of float and QAT (fused, stock) training, alternating; returns the result and nets."""
    fnet = build_model(cfg.model, 10, 3, args.image_size)
    fnet.initialize(mx.init.Xavier(magnitude=2.0))
    fnet(x)
    nets = {"float": fnet}
    for kernel in ("fused", "stock"):
        if kernel == "fused" and not fused.available():
            continue
        qcfg = dataclasses.replace(cfg.quant, per_channel=args.per_channel, kernel=kernel)
        nets[f"qat_{kernel}"] = build_model(cfg.model, 10, 3, args.image_size, qcfg)
    steps = {}
    for k, net in nets.items():
        net.hybridize(static_alloc=True, static_shape=True)
        steps[k] = _stepper(net, x, y)
        _time(steps[k], args.warmup)
    times: dict = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, s in steps.items():
            times[k].append(_time(s, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"step_s": {k: round(v, 4) for k, v in med.items()},
           "ratio": {k: round(v / med["float"], 3) for k, v in med.items() if k != "float"},
           "ratio_per_repeat": {k: [round(b / a, 3) for a, b in zip(times["float"], v)]
                                for k, v in times.items() if k != "float"}}
    return res, nets


def inference(cfg, qnet: gluon.HybridBlock, fnet: gluon.HybridBlock, x: mx.nd.NDArray, repeats: int,  # noqa: ANN001
              target: str) -> dict:
    """Images/s at batch 64, latency at batch 1 and model bytes of every inference variant."""
    shape = tuple(x.shape[1:])
    with autograd.train_mode():  # set the ranges from one batch (no weight update)
        qnet(x)
    qweights = copy_to_float(qnet, build_model(cfg.model, 10, shape[0], shape[1]))
    qweights.hybridize(static_alloc=True)
    m = export(qnet, (0.0,) * shape[0], (1.0,) * shape[0], shape, [str(i) for i in range(10)])
    models = variants.Models(shape, fnet, x[:64], variants.bytes_on_disk(fnet), qnet, qweights, None, m,
                             onnx_target=target)
    fns = variants.build(models, list(INFERENCE))
    speed = variants.speeds({k: f for k, (f, _) in fns.items()}, x.asnumpy(), repeats)
    return {k: {"variant": variants.BY_KEY[k].name, "images_per_s_b64": round(speed[k][0], 1),
                "latency_ms_b1": round(speed[k][1], 3), "model_bytes": size} for k, (_, size) in fns.items()}


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
    p.add_argument("--inference", type=int, choices=(0, 1), default=1, help="also time inference (0/1)")
    p.add_argument("--onnx-target", choices=onnx_export.TARGETS, default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
    args = p.parse_args()
    cfg = load_config(args.config)
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(args.batch_size, 3, args.image_size, args.image_size))
    y = mx.nd.array([i % 10 for i in range(args.batch_size)])
    res, nets = training(cfg, args, x, y)
    res = {"config": args.config, "batch_size": args.batch_size, "width": cfg.model.width,
           "per_channel": args.per_channel, **res, "machine": machine.facts(), "mxnet": mx.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.inference:
        qnet = nets["qat_fused" if "qat_fused" in nets else "qat_stock"]
        res["inference"] = inference(cfg, qnet, nets["float"], x, args.repeats, args.onnx_target)
        res["onnx_target"] = onnx_export.resolve_target(args.onnx_target)
        res["int8_over_float_b64"] = variants.int8_over_float(res["inference"])
    print(json.dumps(res, indent=2))
    if args.inference:
        print("\n" + variants.table(list(res["inference"].values()), accuracy=False))
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in res["int8_over_float_b64"].items())
        print(f"int8 / float images/s at batch 64: {ratios} (ONNX target {res['onnx_target']})")
    print(f"QAT / float training step: {', '.join(f'{k} {v:.3f}' for k, v in res['ratio'].items())}")
    print(f"machine: {machine.describe(res['machine'])}")


if __name__ == "__main__":
    main()
