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


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(v: object) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "-"


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    args = p.parse_args()
    floats, qats = [], []
    for r in map(Path, args.runs):
        res, env = _load(r / "result.json"), _load(r / "env.json")
        if not res:
            raise UserError(f"{r} has no result.json (not a finished run)")
        rows = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        minutes = sum(x["epoch_time_s"] for x in rows) / 60
        date = env.get("date", "?")[:10]
        if res["kind"] == "fp32":
            floats.append(f"| {r.name} | {len(rows)} | {_pct(res['best_test_acc'])} | {minutes:.1f} | {date} |")
        else:
            i8 = _load(r / "int8_eval.json")
            qats.append(f"| {r.name} | {len(rows)} | {_pct(res['float_acc'])} | {_pct(res['fq_acc_before'])} | "
                        f"{_pct(res['fq_acc'])} | {_pct(i8.get('sim_acc'))} | {_pct(i8.get('integer_acc'))} | "
                        f"{_pct(i8.get('integer_agree_sim'))} | {i8.get('size_ratio', float('nan')):.3f} | "
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
