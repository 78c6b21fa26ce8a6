#!/usr/bin/env python
"""oneDNN int8 (learned ranges) against the simulation of a QAT run, layer by layer.

  python benchmarks/onednn_codes.py --float RUN_F --qat RUN_Q                        # this CPU's ISA
  DNNL_MAX_CPU_ISA=AVX2 python benchmarks/onednn_codes.py --float RUN_F --qat RUN_Q  # AVX2 kernels

Per quantized layer: the share of its input codes where oneDNN differs from the simulation when both
run the whole network ("chained"), and when the simulated layer reads oneDNN's own input codes ("one
step": only that layer's arithmetic), with the largest one-step difference. Then top-1 agreement and
the mean logit difference (relative to the mean logit magnitude) on the test images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_quantization import data as data_mod  # noqa: E402
from train_quantization import machine, variants  # noqa: E402
from train_quantization.config import load_config  # noqa: E402
from train_quantization.int8 import engine, onednn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float", dest="float_run", required=True, help="float run folder")
    p.add_argument("--qat", required=True, help="QAT run folder fine-tuned from it")
    p.add_argument("--images", type=int, default=200, help="test images for the layer-by-layer codes")
    args = p.parse_args()
    cfg = load_config(Path(args.qat) / "config.yaml", {})
    ds = data_mod.dataset_from_config(cfg.data)
    m = variants.from_runs(args.float_run, args.qat, cfg, ds, 256)
    block = onednn.with_learned_ranges(m.qat_float_graph, m.qat_net, m.shape, m.calib)
    x = engine.normalize(m.int8, ds.test_x[:args.images])
    got = onednn.layer_codes(block, m.qat_float_graph, m.int8, x)
    kernels = onednn.kernel_model(m.qat_net, m.int8)
    chained, step, artifact = {}, {}, {}
    engine.simulate(kernels, x, chained)
    engine.simulate(kernels, x, step, force=got)
    engine.simulate(m.int8, x, artifact, force=got)
    print(f"{'layer':24s} {'chained':>9s} {'one step':>9s} {'max':>4s} {'artifact':>9s}")
    for name, codes in got.items():
        print(f"{name:24s} {np.mean(codes != chained[name]):9.5f} {np.mean(codes != step[name]):9.6f} "
              f"{int(np.abs(codes - step[name]).max()):4d} {np.mean(codes != artifact[name]):9.6f}")
    xt = engine.normalize(m.int8, ds.test_x)
    one = onednn.logits(block, xt)
    for what, model in (("this CPU's kernels", kernels), ("the artifact", m.int8)):
        sim = model.simulate(xt)
        print(f"simulation of {what}: top-1 agreement {np.mean(sim.argmax(1) == one.argmax(1)):.4f} on {len(xt)} "
              f"images; mean logit difference {np.abs(one - sim).mean() / np.abs(sim).mean():.4f} of the mean "
              "logit magnitude")
    print(machine.describe(machine.facts()))


if __name__ == "__main__":
    main()
