#!/usr/bin/env python
"""Markdown tables of finished runs, from their run folders' saved files only.

  python scripts/summarize.py runs/w025-fp32-s0 runs/w025-qat-pt-s0 ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization.errors import UserError, cli_main  # noqa: E402
from train_quantization.report import load_json, pct  # noqa: E402


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    args = p.parse_args()
    floats, qats = [], []
    for r in map(Path, args.runs):
        res, env = load_json(r / "result.json"), load_json(r / "env.json")
        if not res:
            raise UserError(f"{r} has no result.json (not a finished run)")
        rows = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        minutes = sum(x["epoch_time_s"] for x in rows) / 60
        date = env.get("date", "?")[:10]
        if res["kind"] == "fp32":
            floats.append(f"| {r.name} | {len(rows)} | {pct(res['best_test_acc'])} | {minutes:.1f} | {date} |")
        else:
            i8 = load_json(r / "int8_eval.json")
            qats.append(f"| {r.name} | {len(rows)} | {pct(res['float_acc'])} | {pct(res['fq_acc_before'])} | "
                        f"{pct(res['fq_acc'])} | {pct(i8.get('sim_acc'))} | {pct(i8.get('integer_acc'))} | "
                        f"{pct(i8.get('integer_agree_sim'))} | {i8.get('size_ratio', float('nan')):.3f} | "
                        f"{minutes:.1f} | {date} |")
    if floats:
        print("| float run | epochs | test top-1 % | train min | date |\n|---|---|---|---|---|")
        print("\n".join(floats) + "\n")
    if qats:
        print("| QAT run | epochs | float % | fake-quant before QAT % | fake-quant after QAT % | "
              "simulated int8 % | integer-only % | integer = sim top-1 % | artifact / float size | "
              "train min | date |\n|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(qats))


if __name__ == "__main__":
    main()
