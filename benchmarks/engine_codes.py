#!/usr/bin/env python
"""The simulated and integer-only engines of a QAT run, layer by layer, and where their top-1 decisions part.

  python benchmarks/engine_codes.py --qat RUN [--images 500] [--sim-precision float32]

Per quantized layer: the share of its input codes where the integer-only engine differs from the simulation
when both run the whole network ("chained") and when the integer-only layer reads the simulation's input
codes ("one step": that layer's requantization only), the largest one-step difference, and the share where
the fake-quant network's input codes (its float32 layer input, quantized as the graph does) differ from
the simulation's ("fake-quant", chained: float32 convolutions against exact integer ones). The two engines
requantize differently by design: the simulation divides a float64 value by the scale (``--sim-precision
float32``: a float32 value, as the fake-quant graph does), the integer engine multiplies the exact
accumulator by a 31-bit fixed-point multiplier; they part only where a value lies within that rounding of a
half-code boundary. Then, on every test image,
top-1 agreement of both engines and of the fake-quant network with the simulation, with the margins of the
disagreeing images (``evaluate.agreement``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mxnet as mx  # noqa: E402

from train_quantization import cli, machine  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.evaluate import agreement, fake_quant_logits, margin  # noqa: E402
from train_quantization.int8 import engine  # noqa: E402
from train_quantization.layers import quantized_layers  # noqa: E402


def fake_quant_codes(run: Path, ds, m, x: np.ndarray) -> dict:  # noqa: ANN001
    """Each conv/dense layer's input codes in the QAT network (float32 MXNet), from the layer's input."""
    net = cli.build_for(load_config(run / "config.yaml", {}), ds, quant=True)
    cli.load_weights(net, cli.resolve_params(str(run), "last.params"), [mx.cpu()], expect_ranges=True)
    grids = {op.name: op.act for op in m.quantized()}
    out: dict = {}
    hooks = [layer.register_forward_pre_hook(
        lambda block, inputs, name=name: out.setdefault(name, engine.input_codes(grids[name], inputs[0].asnumpy())))
        for name, layer in quantized_layers(net) if name in grids]
    net(mx.nd.array(x))
    for h in hooks:
        h.detach()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qat", required=True, help="QAT run folder")
    p.add_argument("--images", type=int, default=500, help="test images for the layer-by-layer codes")
    p.add_argument("--sim-precision", choices=("float64", "float32"), default="float64",
                   help="the simulation's values between layers (engine.simulate)")
    args = p.parse_args()
    m, ds, fq, _ = fake_quant_logits(Path(args.qat), None, "last.params")
    x = engine.normalize(m, ds.test_x[:args.images])
    sim, chained, step = {}, {}, {}
    engine.simulate(m, x, sim, precision=args.sim_precision)
    engine.run_integer(m, x, chained)
    engine.run_integer(m, x, step, force=sim)
    fq_codes = fake_quant_codes(Path(args.qat), ds, m, x)
    print(f"{'layer':28s} {'chained':>9s} {'one step':>9s} {'max':>4s} {'fake-quant':>10s}")
    for name, codes in sim.items():
        fq_share = np.mean(codes != fq_codes[name].reshape(codes.shape))
        print(f"{name:28s} {np.mean(codes != chained[name]):9.6f} {np.mean(codes != step[name]):9.6f} "
              f"{int(np.abs(codes - step[name]).max()):4d} {fq_share:10.6f}")
    total = sum(c.size for c in sim.values())
    print(f"all layers: chained {sum(int((c != chained[n]).sum()) for n, c in sim.items()) / total:.2e}, "
          f"one step {sum(int((c != step[n]).sum()) for n, c in sim.items()) / total:.2e} of {total} codes")
    logits = {k: engine.predict(m, ds.test_x, k, precision=args.sim_precision) for k in ("sim", "integer")}
    rep: dict = {}
    agreement(rep, "integer", "sim", logits["sim"], logits["integer"])
    agreement(rep, "fake_quant", "sim", logits["sim"], fq)
    gap = margin(logits["sim"])
    print(f"{len(fq)} test images; simulation's top-1/top-2 margin: median {np.median(gap):.3f}, "
          f"1st percentile {np.percentile(gap, 1):.4f}")
    for k, v in rep.items():
        print(f"{k:40s} {v:.5f}")
    print(machine.describe(machine.facts()))


if __name__ == "__main__":
    main()
