"""Speed measurements: training step time float vs QAT, and inference speed of every variant,
on random weights (``benchmark.py``)."""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import mxnet as mx
from mxnet import autograd, gluon

from . import fused, variants
from .conversion import copy_to_float
from .int8.export import export
from .layers import quantized_layers
from .models import build_model

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
    """Median step times of float and QAT (fused, stock) training, alternating, with ``args.range`` (ema or lsq)
    ranges; returns the result and nets (with ``args.training`` 0: no timing, an empty result, the nets after
    one step)."""
    fnet = build_model(cfg.model, 10, 3, args.image_size)
    fnet.initialize(mx.init.Xavier(magnitude=2.0))
    fnet(x)
    nets = {"float": fnet}
    for kernel in ("fused", "stock"):
        if kernel == "fused" and not fused.available():
            continue
        qcfg = dataclasses.replace(cfg.quant, per_channel=args.per_channel, kernel=kernel, range=args.range)
        nets[f"qat_{kernel}"] = qnet = build_model(cfg.model, 10, 3, args.image_size, qcfg)
        for _, layer in quantized_layers(qnet):
            if args.range == "lsq" and not layer.range_fixed:  # a learned range must start > 0 (x / 0 is inf)
                layer.input_max.set_data(mx.nd.full((1,), 4.0))
    steps = {}
    for k, net in nets.items():
        net.hybridize(static_alloc=True, static_shape=True)
        steps[k] = _stepper(net, x, y)
        _time(steps[k], args.warmup if args.training else 1)
    if not args.training:
        return {}, nets
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
              target: str, keys: tuple = INFERENCE) -> dict:
    """Images/s at batch 64, latency at batch 1 and model bytes of the inference variants ``keys``."""
    shape = tuple(x.shape[1:])
    with autograd.train_mode():  # set the ranges from one batch (no weight update)
        qnet(x)
    qweights = copy_to_float(qnet, build_model(cfg.model, 10, shape[0], shape[1]))
    qweights.hybridize(static_alloc=True, static_shape=True)
    m = export(qnet, (0.0,) * shape[0], (1.0,) * shape[0], shape, [str(i) for i in range(10)])
    models = variants.Models(shape, fnet, x[:64], variants.bytes_on_disk(fnet), qnet, qweights,
                             variants.bytes_on_disk(qnet), m,
                             onnx_target=target)
    fns = variants.build(models, list(keys))
    speed = variants.speeds({k: f for k, (f, _) in fns.items()}, x.asnumpy(), repeats)
    return {k: {"variant": variants.BY_KEY[k].name, "images_per_s_b64": round(speed[k][0], 1),
                "latency_ms_b1": round(speed[k][1], 3), "model_bytes": size} for k, (_, size) in fns.items()}
