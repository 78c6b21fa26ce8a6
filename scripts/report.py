#!/usr/bin/env python
"""PNG plots and a markdown report (report.md) in each run folder, from its saved files only.

  python scripts/report.py runs/w025-qat-pt-s0 [runs/... ...]

A QAT run's report includes its float run's curves (found through qat_start.json), the range
of every layer over the QAT steps, weight scales and SQNR before/after QAT, and, when
compare.py has run on it, the comparison chart and the float/int8 disagreement matrix.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import report  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train_fp32.py, train_qat.py, sweep_bits.py)")
    args = p.parse_args()
    for r in args.runs:
        run = Path(r)
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run} is not a run folder (no config.yaml); pass a folder made by a training script")
    for r in args.runs:
        print(f"report: {report.write_report(Path(r))}")


if __name__ == "__main__":
    main()
