#!/usr/bin/env python
"""Training step time (float vs QAT) and inference speed of every execution path.

Training: hybridized float step vs QAT steps of the same network and batch, QAT with the
compiled quantizer (``qat_fused``, when it builds) and the stock-MXNet fallback
(``qat_stock``). Inference (``--inference``, default on): images/s at batch 64 and latency
at batch 1 for float (MXNet, ONNX Runtime), fake-quant, the simulated and integer-only numpy
engines, oneDNN int8 with the learned ranges and ONNX Runtime int8 (QDQ), plus artifact sizes.
Weights are random (speed does not depend on them). Everything is measured in one process
after warm-up, alternating between variants, as medians over the repeats. Prints JSON and
a markdown table.
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

from train_quantization import fused, machine  # noqa: E402
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
    p.add_argument("--inference", type=int, choices=(0, 1), default=1, help="also time inference (0/1)")
    p.add_argument("--onnx-target", choices=("auto", "avx2", "vnni"), default="auto",
                   help="ONNX Runtime int8 kernels to export for (auto: vnni on a CPU with VNNI, else avx2)")
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
           "machine": machine.facts(), "mxnet": mx.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.inference:
        res["inference"] = inference(cfg, nets["qat_fused" if "qat_fused" in nets else "qat_stock"], fnet, x,
                                     args.repeats, args.onnx_target)
        res["onnx_target"] = onnx_target(args.onnx_target)
        res["int8_over_float_b64"] = _int8_ratios(res["inference"])
    print(json.dumps(res, indent=2))
    if args.inference:
        print("\n| variant | images/s (batch 64) | latency ms (batch 1) | model bytes |\n|---|---|---|---|")
        for k, v in res["inference"].items():
            print(f"| {k} | {v['images_per_s_b64']:.0f} | {v['latency_ms_b1']:.2f} | {v.get('bytes') or '-'} |")
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in res["int8_over_float_b64"].items())
        print(f"int8 / float images/s at batch 64: {ratios} (ONNX target {res['onnx_target']})")
    print(f"machine: {machine.describe(res['machine'])}")


def onnx_target(target: str) -> str:
    from train_quantization.int8.onnx_export import resolve_target

    return resolve_target(target)


def _int8_ratios(inf: dict) -> dict:
    """int8 over float throughput at batch 64, each within its runtime."""
    pairs = {"oneDNN / MXNet float": ("oneDNN int8 (MXNet)", "float (MXNet)"),
             "ONNX Runtime int8 / float": ("int8 QDQ (ONNX Runtime)", "float (ONNX Runtime)")}
    return {k: round(inf[a]["images_per_s_b64"] / inf[b]["images_per_s_b64"], 2)
            for k, (a, b) in pairs.items() if a in inf and b in inf}


def inference(cfg, qnet: gluon.HybridBlock, fnet: gluon.HybridBlock, x: mx.nd.NDArray,  # noqa: ANN001
              repeats: int, target: str = "auto") -> dict:
    """Median images/s at batch 64 and latency at batch 1 of every inference path."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from train_quantization.int8 import engine, onednn, onnx_export
    from train_quantization.int8 import model as int8_model
    from train_quantization.int8.export import export

    shape = tuple(x.shape[1:])
    with autograd.train_mode():  # set the ranges from one batch (no weight update)
        qnet(x)
    qweights = build_model(cfg.model, 10, shape[0], shape[1])  # QAT weights in the float graph, for oneDNN
    with tempfile.TemporaryDirectory() as d:
        qnet.save_parameters(f"{d}/q.params")
        fnet.save_parameters(f"{d}/f.params")
        qweights.load_parameters(f"{d}/q.params", ignore_extra=True)
        qweights.hybridize(static_alloc=True)
        m = export(qnet, (0.0,) * shape[0], (1.0,) * shape[0], shape, [str(i) for i in range(10)])
        sizes = {"float": os.path.getsize(f"{d}/f.params"),
                 "int8 artifact": int8_model.artifact_size(int8_model.save(m, Path(d) / "m.npz"))}
        xs = x.asnumpy()
        fns = {"float (MXNet)": lambda a: fnet(mx.nd.array(a)).asnumpy(),
               "QAT fake-quant (MXNet)": lambda a: qnet(mx.nd.array(a)).asnumpy(),
               "simulated int8 (numpy)": lambda a: engine.simulate(m, a),
               "integer-only int8 (numpy)": lambda a: engine.run_integer(m, a)}
        one = onednn.with_learned_ranges(qweights, qnet, shape, mx.nd.array(xs[:64]))
        fns["oneDNN int8 (MXNet)"] = lambda a: one(mx.nd.array(a)).asnumpy()
        if onnx_export.available():
            fo = onnx_export.runner(onnx_export.session(onnx_export.save_float(fnet, shape, Path(d) / "f.onnx")))
            qo = onnx_export.runner(onnx_export.session(onnx_export.save_qdq(m, Path(d) / "q.onnx", target)))
            fns["float (ONNX Runtime)"], fns["int8 QDQ (ONNX Runtime)"] = fo, qo
            sizes["float ONNX"] = os.path.getsize(Path(d) / "f.onnx")
            sizes["int8 QDQ ONNX"] = os.path.getsize(Path(d) / "q.onnx")
    b64 = np.concatenate([xs] * (64 // len(xs) + 1))[:64]
    b1 = xs[:1]
    for fn in fns.values():  # warm-up
        fn(b64)
        fn(b1)
    ips: dict = {k: [] for k in fns}
    lat: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            slow = "numpy" in k
            t = time.perf_counter()
            for _ in range(1 if slow else 5):
                fn(b64)
            ips[k].append((1 if slow else 5) * 64 / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(2 if slow else 20):
                fn(b1)
            lat[k].append(1000 * (time.perf_counter() - t) / (2 if slow else 20))
    byte_of = {"float (MXNet)": sizes["float"], "simulated int8 (numpy)": sizes["int8 artifact"],
               "integer-only int8 (numpy)": sizes["int8 artifact"], "float (ONNX Runtime)": sizes.get("float ONNX"),
               "int8 QDQ (ONNX Runtime)": sizes.get("int8 QDQ ONNX")}
    return {k: {"images_per_s_b64": round(statistics.median(ips[k]), 1),
                "latency_ms_b1": round(statistics.median(lat[k]), 3), "bytes": byte_of.get(k)} for k in fns}


if __name__ == "__main__":
    main()
