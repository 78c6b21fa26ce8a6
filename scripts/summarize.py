#!/usr/bin/env python
"""Markdown tables of finished runs, from their run folders' saved files only.

  python scripts/summarize.py runs/w025-fp32-s0 runs/w025-qat-pt-s0 ...

Runs named ``<name>-s<seed>`` with two or more seeds are also summarized per name: mean,
sample standard deviation and range of the top-1 accuracy (float: best epoch; QAT: fake-quant
after QAT, and its difference to the float model it started from).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization.errors import cli_main  # noqa: E402
from train_quantization.report import summarize  # noqa: E402


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    print(summarize(p.parse_args().runs))


if __name__ == "__main__":
    main()
