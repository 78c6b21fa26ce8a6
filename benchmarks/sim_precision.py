#!/usr/bin/env python
"""Speed of the numpy simulation with float64 (default) and float32 values between layers.

  python benchmarks/sim_precision.py --qat RUN [--images 2000] [--rounds 2]

Alternates the two precisions ``rounds`` times on the first ``images`` test images (the integer-only
engine does not depend on it) and prints images/s with the machine. Float32 converts each layer's float64
output before it divides; float64 divides at half the vector width.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_quantization import evaluate, machine  # noqa: E402
from train_quantization.int8 import engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qat", required=True, help="QAT run folder")
    p.add_argument("--images", type=int, default=2000, help="test images per measurement")
    p.add_argument("--rounds", type=int, default=2, help="measurements per precision, alternating")
    args = p.parse_args()
    model, ds, _, _ = evaluate.load_model(args.qat, None, None, "last.params", None)
    x = ds.test_x[:args.images]
    engine.predict(model, x[:200], "sim")  # warm-up: the compiled kernels, the packed weights
    for r in range(args.rounds):
        for precision in ("float32", "float64"):
            t0 = time.perf_counter()
            engine.predict(model, x, "sim", precision=precision)
            print(f"round {r + 1} {precision}: {len(x) / (time.perf_counter() - t0):.0f} images/s", flush=True)
    print(machine.describe(machine.facts()))


if __name__ == "__main__":
    main()
