#!/usr/bin/env python
"""Per-layer sensitivity to 4 and 2 bits, and per-layer widths for a weight-size budget.

  python scripts/sensitivity.py --pretrained runs/w025-fp32-s0 --budget-bytes 400000 --name w025-sens
  python scripts/train_qat.py --pretrained runs/w025-fp32-s0 --layer-bits runs/w025-sens/layer_bits.yaml

Writes sensitivity.json, sensitivity.md, sensitivity.png and (with --budget-bytes) layer_bits.yaml
into a run folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import yaml  # noqa: E402

from train_quantization import cli, report, sensitivity, train  # noqa: E402
from train_quantization.errors import UserError, cli_main  # noqa: E402


@cli_main
def main() -> None:
    p = cli.common_parser(__doc__, cli.RUN_FLAGS)
    p.add_argument("--pretrained", required=True, help="float run folder (best.params) or .params file")
    p.add_argument("--widths", default="4,2", help="comma-separated widths to try per layer")
    p.add_argument("--images", type=int, default=2000, help="training images (drawn at random) to measure on")
    p.add_argument("--act-bits", default="8",
                   help="input width of the lowered layer: 2-8, or 'same' for the weights' width (default 8: "
                        "the budget counts weight bytes)")
    p.add_argument("--budget-bytes", type=float, help="propose per-layer widths whose packed weights fit this")
    args = p.parse_args()
    pre = Path(args.pretrained)
    base = cli.run_spec(pre) if (pre / "config.yaml").is_file() else {}
    args.config = args.config or (str(pre / "config.yaml") if base else None)
    cfg = cli.config_from_args(args, cli.RUN_FLAGS, base)
    if not all(w.strip().isdigit() and 2 <= int(w) <= 8 for w in args.widths.split(",")):
        raise UserError(f"--widths {args.widths!r}: use comma-separated widths 2-8, e.g. 4,2")
    if not (args.act_bits == "same" or args.act_bits.isdigit() and 2 <= int(args.act_bits) <= 8):
        raise UserError(f"--act-bits {args.act_bits!r}: use a width 2-8 or 'same'")
    train.setup_logging()
    result = sensitivity.measure(cfg, args.pretrained, tuple(int(w) for w in args.widths.split(",")), args.images,
                                 None if args.act_bits == "same" else int(args.act_bits))
    proposal = None
    if args.budget_bytes:
        try:
            proposal = sensitivity.propose(result, args.budget_bytes)
        except ValueError as exc:
            raise UserError(f"--budget-bytes: {exc}") from None
    run = train.make_run_dir(cfg, "sensitivity", Path(args.config).stem)  # only once the proposal exists
    if proposal is not None:
        (run / "layer_bits.yaml").write_text(yaml.safe_dump(proposal))
    result["proposal"] = proposal
    cli.write_json(run / "sensitivity.json", result)
    report.write_sensitivity(run, result, proposal)
    print((run / "sensitivity.md").read_text())
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
