#!/usr/bin/env python
"""Train the float network (VGG-BN or a gluoncv model) and print the run folder and best checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli, train  # noqa: E402
from train_quantization.errors import cli_main  # noqa: E402


@cli_main
def main() -> None:
    args = cli.common_parser(__doc__).parse_args()
    cfg = cli.config_from_args(args)
    stem = Path(args.config).stem if args.config else "fp32"
    res = train.train_float(cfg, Path(args.resume) if args.resume else None, stem=stem)
    print(f"run folder: {res['run']}")
    print(f"best checkpoint: {res['run'] / 'best.params'} (test accuracy {res['best_test_acc']:.4f}, "
          f"epoch {res['best_epoch']})")


if __name__ == "__main__":
    main()
