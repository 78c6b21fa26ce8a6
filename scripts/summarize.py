#!/usr/bin/env python
"""Markdown tables of finished runs, from their run folders' saved files only.

  python scripts/summarize.py runs/w025-fp32-s0 runs/w025-qat-pt-s0 ...

Runs named ``<name>-s<seed>`` with two or more seeds are also summarized per name: mean,
sample standard deviation and range of the top-1 accuracy (float: best epoch; QAT: fake-quant
after QAT, and its difference to the float model it started from).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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
    seeds: dict = {}
    for r in map(Path, args.runs):
        res, env = load_json(r / "result.json"), load_json(r / "env.json")
        if not res:
            raise UserError(f"{r} has no result.json (not a finished run)")
        rows = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        minutes = sum(x["epoch_time_s"] for x in rows) / 60
        date = env.get("date", "?")[:10]
        group = re.fullmatch(r"(.+)-s(\d+)", r.name)
        if group:
            acc = res["best_test_acc"] if res["kind"] == "fp32" else res["fq_acc"]
            gain = None if res["kind"] == "fp32" else res["fq_acc"] - res["float_acc"]
            seeds.setdefault(group.group(1), []).append((int(group.group(2)), acc, gain))
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
        print("\n".join(qats) + "\n")
    groups = {k: v for k, v in seeds.items() if len(v) > 1}
    if groups:
        print("| runs | seeds | top-1 % mean | std | min - max | QAT - float points, mean (each) |\n"
              "|---|---|---|---|---|---|")
        for name, rows in groups.items():
            accs = [100 * a for _, a, _ in rows]
            gains = [g for _, _, g in rows if g is not None]
            each = ", ".join(f"{100 * g:+.2f}" for g in gains)
            gain = f"{100 * statistics.mean(gains):+.2f} ({each})" if gains else "-"
            print(f"| {name}-s* | {', '.join(str(s) for s, _, _ in rows)} | {statistics.mean(accs):.2f} | "
                  f"{statistics.stdev(accs):.2f} | {min(accs):.2f} - {max(accs):.2f} | {gain} |")


if __name__ == "__main__":
    main()
