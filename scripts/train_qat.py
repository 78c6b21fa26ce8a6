#!/usr/bin/env python
"""Fine-tune a trained float network with fake quantization (QAT).

Loads the float checkpoint, converts the network into its QAT form (the only new parameters are
the range states), reports the float accuracy and the fake-quant accuracy before fine-tuning,
fine-tunes with the config's ``qat`` recipe, and saves the QAT checkpoint plus layers.json.
``--pretrained RUN`` takes the model and data of the float run unless --model/--width/--data are given.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import cli  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.qat import train_qat  # noqa: E402


@cli_main
def main() -> None:
    p = cli.common_parser(__doc__, cli.QAT_FLAGS)
    p.add_argument("--pretrained", help="float run folder (uses best.params) or .params file")
    args = p.parse_args()
    if not args.resume and not args.pretrained:
        raise UserError("pass --pretrained FLOAT_RUN_DIR (or --resume QAT_RUN_DIR)")
    pre = Path(args.pretrained) if args.pretrained else None
    base = cli.run_spec(pre) if pre and (pre / "config.yaml").is_file() else {}
    if not args.config and base and not args.resume:
        args.config = str(pre / "config.yaml")  # the float run's own config is the base
    cfg = cli.config_from_args(args, cli.QAT_FLAGS, base)
    res = train_qat(cfg, args.pretrained, Path(args.resume) if args.resume else None,
                    stem=Path(args.config).stem if args.config else "qat")
    print(f"new parameters: {', '.join(res['new_parameters'])}")
    print(f"float accuracy {res['float_acc']:.4f}; fake-quant before QAT {res['fq_acc_before']:.4f}; "
          f"after QAT {res['fq_acc']:.4f}")
    print(f"run folder: {res['run']}")
    print(f"QAT checkpoint: {res['run'] / 'last.params'}")


if __name__ == "__main__":
    main()
