#!/usr/bin/env python
"""Training step time: hybridized float step vs QAT steps of the same network and batch.

QAT is timed with the compiled quantizer (``qat_fused``, when it builds) and with the
stock-MXNet fallback (``qat_stock``). Measured in one process after warm-up, alternating
blocks of steps, reported as medians over the repeats. Prints JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from train_quantization import fused  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.errors import cli_main  # noqa: E402
from train_quantization.models import build_model  # noqa: E402


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
    args = p.parse_args()
    cfg = load_config(args.config)
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(args.batch_size, 3, args.image_size, args.image_size))
    y = mx.nd.array([i % 10 for i in range(args.batch_size)])
    fnet = build_model(cfg.model, 10, 3, args.image_size)
    fnet.initialize(mx.init.Xavier(magnitude=2.0))
    fnet(x)
    nets = {"float": fnet}
    for kernel in ("fused", "stock"):
        qcfg = dataclasses.replace(cfg.quant, per_channel=args.per_channel, kernel=kernel)
        if kernel == "fused" and not fused.available():
            continue
        nets[f"qat_{kernel}"] = build_model(cfg.model, 10, 3, args.image_size, qcfg)
        nets[f"qat_{kernel}"].initialize(mx.init.Xavier(magnitude=2.0))
    steps = {}
    for k, net in nets.items():
        net.hybridize(static_alloc=True, static_shape=True)
        steps[k] = _stepper(net, x, y)
        _time(steps[k], args.warmup)
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, s in steps.items():
            times[k].append(_time(s, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"config": args.config, "batch_size": args.batch_size, "width": cfg.model.width,
           "per_channel": args.per_channel, "step_s": {k: round(v, 4) for k, v in med.items()},
           "ratio": {k: round(v / med["float"], 3) for k, v in med.items() if k != "float"},
           "ratio_per_repeat": {k: [round(b / a, 3) for a, b in zip(times["float"], v)]
                                for k, v in times.items() if k != "float"},
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "mxnet": mx.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
