"""Tables and PNG plots from run folders' saved files (no training, no model evaluation here)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pct(v: object) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "-"


# ----------------------------------------------------------------------------- bit-width sweep
SWEEP_SERIES = (("ptq_max", "PTQ max"), ("ptq_mse", "PTQ MSE"), ("ptq_mse_w", "PTQ MSE+w"), ("qat", "QAT"),
                ("qat_lsq", "QAT, LSQ"), ("qat_lsq_kd", "QAT, LSQ + distillation"), ("qat_recipe", "QAT, recipe"))
QAT_KEYS = ("qat", "qat_lsq", "qat_lsq_kd", "qat_recipe")


def sweep_row_text(r: dict) -> str:
    return (f"W{r['weight_bits']}A{r['act_bits']}: float {pct(r['float'])}  " +
            "  ".join(f"{label} {pct(r.get(key))}" for key, label in SWEEP_SERIES))


def sweep_markdown(rows: list) -> str:
    series = [(k, label) for k, label in SWEEP_SERIES if any(k in r for r in rows)]
    head = "| W/A bits | float % | " + " | ".join(f"{label} %" for _, label in series) + \
           " | best QAT - float (points) |\n|---|---|" + "---|" * (len(series) + 1) + "\n"
    body = ""
    for r in rows:
        best = max((r[k] for k in QAT_KEYS if k in r), default=None)
        gap = f"{100 * (best - r['float']):+.2f}" if best is not None else "-"
        body += (f"| W{r['weight_bits']}A{r['act_bits']} | {pct(r['float'])} | " +
                 " | ".join(pct(r.get(key)) for key, _ in series) + f" | {gap} |\n")
    return head + body


def write_sweep(run: Path, rows: list) -> None:
    """sweep.md and sweep.png (top-1 against the W/A pair, one line per method, float dashed)."""
    (run / "sweep.md").write_text(sweep_markdown(rows))
    labels = [f"W{r['weight_bits']}A{r['act_bits']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.6))
    x = range(len(rows))
    for key, label in SWEEP_SERIES:
        if not any(key in r for r in rows):
            continue
        ys = [100 * r[key] if key in r else float("nan") for r in rows]
        ax.plot(x, ys, marker="*" if key == "qat_recipe" else "o", ms=10 if key == "qat_recipe" else 6,
                ls="none" if key == "qat_recipe" else "-", label=label)
    ax.axhline(100 * rows[0]["float"], color="gray", linestyle="--", label="float")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("test top-1 %")
    ax.set_title("PTQ and QAT from the same float checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "sweep.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- run report
def load_json(path: Path) -> dict | list:
    """A run folder's JSON file, or ``{}`` when it is missing."""
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _jsonl(path: Path) -> list:
    import json

    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            pass
    return rows


def float_run_of(run: Path) -> Path | None:
    """The float run a QAT run started from (``qat_start.json``), if its folder still exists."""
    src = load_json(run / "qat_start.json").get("pretrained")
    if not src:
        return None
    p = Path(src)
    folder = p.parent if p.suffix == ".params" else p
    return folder if (folder / "metrics.jsonl").is_file() else None


def plot_curves(runs: list, out: Path) -> None:
    """Training loss per step and test accuracy per epoch; later runs continue the step/epoch axis."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    step0 = epoch0 = 0
    for label, run in runs:
        steps, epochs = _jsonl(run / "steps.jsonl"), _jsonl(run / "metrics.jsonl")
        if steps:
            a1.plot([step0 + r["step"] for r in steps], [r["loss"] for r in steps], label=label, lw=0.8)
        if epochs:
            a2.plot([epoch0 + r["epoch"] for r in epochs], [100 * r["test_acc"] for r in epochs], marker="o",
                    label=f"{label} test")
            a2.plot([epoch0 + r["epoch"] for r in epochs], [100 * r["train_acc"] for r in epochs], ls=":",
                    label=f"{label} train")
            raw = [r for r in epochs if "raw_test_acc" in r]  # weight averaging: the trained weights' test accuracy
            if raw:
                a2.plot([epoch0 + r["epoch"] for r in raw], [100 * r["raw_test_acc"] for r in raw], ls="--",
                        label=f"{label} test, trained weights (not averaged)")
            step0, epoch0 = step0 + epochs[-1]["step"], epoch0 + epochs[-1]["epoch"]
    a1.set(xlabel="optimizer step", ylabel="training loss (batch mean)", yscale="log", title="loss")
    a2.set(xlabel="epoch", ylabel="top-1 %", title="accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_ranges(run: Path, out: Path) -> bool:
    steps = [r for r in _jsonl(run / "steps.jsonl") if "ranges" in r]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(steps[0]["ranges"])
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))  # one distinct colour per layer
    for name, color in zip(names, colors):
        ax.plot([r["step"] for r in steps], [r["ranges"][name] for r in steps], label=name, lw=1, color=color)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    kind = {"lsq": "learned (LSQ)", "mse": "MSE-calibrated, frozen"}.get((cfg.get("quant") or {}).get("range"),
                                                                         "EMA of max|x|")
    ax.set(xlabel="QAT step", ylabel=f"input_max ({kind})", yscale="log",
           title="activation range of each quantized layer's input (s_a = input_max / divisor)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _mean_scale(row: dict) -> float:
    s = row.get("weight_scale", float("nan"))  # a QAdd has none
    return sum(s) / len(s) if isinstance(s, list) else s


def plot_weights(before: list, after: list, out: Path) -> None:
    names = [r["layer"] for r in after]
    x = range(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for rows, label, dx in ((before, "before QAT", -0.2), (after, "after QAT", 0.2)):
        a1.bar([i + dx for i in x], [_mean_scale(r) for r in rows], width=0.4, label=label)
        a2.bar([i + dx for i in x], [r.get("weight_sqnr_db", float("nan")) for r in rows], width=0.4, label=label)
    a1.set(ylabel="weight scale (mean over channels)", yscale="log", title="folded weight scale")
    a2.set(ylabel="SQNR dB", title="folded weight quantization SQNR")
    for a in (a1, a2):
        a.set_xticks(list(x), names, rotation=60, fontsize=7)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_compare(cmp: dict, out: Path) -> None:
    rows = cmp["rows"]
    names = [r["variant"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8))
    a1.barh(names, [100 * r["acc"] for r in rows])
    lo = min(100 * r["acc"] for r in rows)
    a1.set(xlabel="test top-1 %", xlim=(max(0.0, lo - 3), min(100.0, max(100 * r["acc"] for r in rows) + 1)),
           title="accuracy")
    a2.barh(names, [r["images_per_s_b64"] for r in rows])
    a2.set(xlabel="images/s at batch 64", xscale="log", title="speed")
    a2.set_yticklabels([])
    for a in (a1, a2):
        a.invert_yaxis()
        a.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def disagreement_matrix(a: np.ndarray, b: np.ndarray, classes: int) -> np.ndarray:
    """``m[i, j]``: images predicted ``i`` by ``a`` and ``j`` by ``b``, counted where they differ.

    >>> disagreement_matrix(np.array([0, 1, 1, 2]), np.array([0, 2, 1, 1]), 3).tolist()
    [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    """
    m = np.zeros((classes, classes), np.int64)
    d = a != b
    np.add.at(m, (a[d], b[d]), 1)
    return m


def plot_disagreements(pred_file: Path, classes: list, out: Path, other: str) -> dict | None:
    data = np.load(pred_file)
    variants = [str(v) for v in data["variants"]]
    if "float" not in variants or other not in variants:
        return None
    fl, q = data["preds"][variants.index("float")], data["preds"][variants.index(other)]
    labels = data["labels"]
    m = disagreement_matrix(fl, q, len(classes))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=60, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    name = str(data["names"][variants.index(other)]) if "names" in data.files else other
    ax.set(xlabel=f"{name} prediction", ylabel="float prediction",
           title=f"{int((fl != q).sum())} of {len(fl)} images predicted differently")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    d = fl != q
    return {"differ": int(d.sum()), "images": len(fl), "float_right": int((fl[d] == labels[d]).sum()),
            "int8_right": int((q[d] == labels[d]).sum())}


def write_report(run: Path) -> Path:
    """Plots (PNG) and report.md in ``run`` from its saved files (and its float run's, for a QAT run)."""
    run = Path(run)
    result = load_json(run / "result.json")
    md = [f"# Report: {run.name}", ""]
    env = load_json(run / "env.json")
    if env:
        md += [f"Command: `{env.get('command', '')}`  ", f"Machine: {env.get('processor') or env.get('machine')}, "
               f"{env.get('cpus')} CPUs; MXNet {env.get('mxnet')}; commit {str(env.get('commit'))[:10]}; "
               f"date {env.get('date')}", ""]
    parent = float_run_of(run) if (run / "qat_start.json").is_file() else None
    series = ([("float", parent)] if parent else []) + ([("QAT" if parent or result.get("kind") == "qat"
                                                          else "float", run)] if (run / "metrics.jsonl").is_file()
                                                        else [])
    if series:
        plot_curves(series, run / "curves.png")
        md += ["## Training", "", "![loss and accuracy](curves.png)", ""]
        if result.get("kind") == "qat":
            md += [f"- float accuracy {pct(result.get('float_acc'))} %; fake-quant before QAT "
                   f"{pct(result.get('fq_acc_before'))} %; after QAT {pct(result.get('fq_acc'))} %", ""]
        elif result:
            md += [f"- best test accuracy {pct(result.get('best_test_acc'))} % (epoch {result.get('best_epoch')})",
                   ""]
    if plot_ranges(run, run / "ranges.png"):
        md += ["## Activation ranges over QAT", "", "![ranges](ranges.png)", ""]
    before, after = load_json(run / "layers_before.json"), load_json(run / "layers.json")
    if before and after:
        plot_weights(before, after, run / "weights.png")
        md += ["## Layers before and after QAT", "", "![weights](weights.png)", "",
               "| layer | W/A bits | input_max before | after | weight SQNR dB before | after | clipped inputs % |",
               "|---|---|---|---|---|---|---|"]
        for b, a in zip(before, after):
            md.append(f"| {a['layer']} | {a.get('weight_bits', '-')}/{a.get('act_bits', '-')} | "
                      f"{b['input_max']:.3f} | {a['input_max']:.3f} | {b.get('weight_sqnr_db', float('nan')):.1f} | "
                      f"{a.get('weight_sqnr_db', float('nan')):.1f} | {100 * a.get('clipped_share', 0.0):.3f} |")
        md.append("")
    cmp = load_json(run / "compare.json")
    if cmp:
        plot_compare(cmp, run / "compare.png")
        md += ["## Every variant (compare.py)", "", "![compare](compare.png)", "",
               (run / "compare.md").read_text() if (run / "compare.md").is_file() else "", ""]
    if (run / "predictions.npz").is_file():
        classes = result.get("classes") or [str(i) for i in range(10)]
        d = plot_disagreements(run / "predictions.npz", classes, run / "disagreements.png", "sim")
        if d:
            md += ["## Where float and int8 disagree", "", "![disagreements](disagreements.png)", "",
                   f"{d['differ']} of {d['images']} test images get another class from the simulated int8 model "
                   f"than from the float model; on those the float model is right {d['float_right']} times, "
                   f"int8 {d['int8_right']} times.", ""]
    sweep = load_json(run / "sweep.json")
    if sweep:
        md += ["## Bit-width sweep", "", "![sweep](sweep.png)", "", sweep_markdown(sweep["rows"]), ""]
    (run / "report.md").write_text("\n".join(md))
    return run / "report.md"


def _summary_row(r: Path) -> tuple:
    """``(kind, table row, (name, seed, top-1, QAT - float) or None)`` of a finished run folder."""
    import json
    import re

    from .errors import UserError

    res, env = load_json(r / "result.json"), load_json(r / "env.json")
    if not res:
        raise UserError(f"{r} has no result.json (not a finished run)")
    rows = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    minutes = sum(x["epoch_time_s"] for x in rows) / 60
    date = env.get("date", "?")[:10]
    group = re.fullmatch(r"(.+)-s(\d+)", r.name)
    fp32 = res["kind"] == "fp32"
    seed = None
    if group:
        seed = (group.group(1), int(group.group(2)), res["best_test_acc"] if fp32 else res["fq_acc"],
                None if fp32 else res["fq_acc"] - res["float_acc"])
    if fp32:
        return "fp32", f"| {r.name} | {len(rows)} | {pct(res['best_test_acc'])} | {minutes:.1f} | {date} |", seed
    i8 = load_json(r / "int8_eval.json")
    return "qat", (f"| {r.name} | {len(rows)} | {pct(res['float_acc'])} | {pct(res['fq_acc_before'])} | "
                   f"{pct(res['fq_acc'])} | {pct(i8.get('sim_acc'))} | {pct(i8.get('integer_acc'))} | "
                   f"{pct(i8.get('integer_agree_sim'))} | {i8.get('size_ratio', float('nan')):.3f} | "
                   f"{minutes:.1f} | {date} |"), seed


def summarize(runs: list) -> str:
    """Markdown tables of finished runs (float, QAT) and, for runs named ``<name>-s<seed>`` with two or
    more seeds, per name: mean, sample std and range of top-1 (float: best epoch; QAT: after QAT, and
    its difference to the float model it started from)."""
    import statistics

    got = [_summary_row(Path(r)) for r in runs]
    out = []
    floats, qats = [row for kind, row, _ in got if kind == "fp32"], [row for kind, row, _ in got if kind == "qat"]
    if floats:
        out += ["| float run | epochs | test top-1 % | train min | date |\n|---|---|---|---|---|",
                "\n".join(floats) + "\n"]
    if qats:
        out += ["| QAT run | epochs | float % | fake-quant before QAT % | fake-quant after QAT % | "
                "simulated int8 % | integer-only % | integer = sim top-1 % | artifact / float size | "
                "train min | date |\n|---|---|---|---|---|---|---|---|---|---|---|", "\n".join(qats) + "\n"]
    seeds: dict = {}
    for _, _, entry in got:
        if entry:
            seeds.setdefault(entry[0], []).append(entry[1:])
    groups = {k: v for k, v in seeds.items() if len(v) > 1}
    if groups:
        out.append("| runs | seeds | top-1 % mean | std | min - max | QAT - float points, mean (each) |\n"
                   "|---|---|---|---|---|---|")
    for name, rows in groups.items():
        accs = [100 * a for _, a, _ in rows]
        gains = [g for _, _, g in rows if g is not None]
        gain = f"{100 * statistics.mean(gains):+.2f} ({', '.join(f'{100 * g:+.2f}' for g in gains)})" if gains else "-"
        out.append(f"| {name}-s* | {', '.join(str(s) for s, _, _ in rows)} | {statistics.mean(accs):.2f} | "
                   f"{statistics.stdev(accs):.2f} | {min(accs):.2f} - {max(accs):.2f} | {gain} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- sensitivity
def write_sensitivity(run: Path, result: dict, proposal: dict | None) -> None:
    """sensitivity.md (per layer: weights, top-1 and logit SQNR at each width) and sensitivity.png."""
    widths, rows = result["widths"], result["layers"]
    tag = {b: f"W{b}A{result.get('act_bits') or b}" for b in widths}
    head = "| layer | weights | " + " | ".join(f"top-1 % at {tag[b]} | SQNR dB" for b in widths)
    lines = [f"W8A8 top-1: {pct(result['base'])} % on {result['images']} training images (drawn at random)", "",
             head + " |",
             "|---|---|" + "---|---|" * len(widths)]
    for r in rows:
        cells = " | ".join(f"{pct(r[f'acc_{b}'])} | {r[f'sqnr_db_{b}']:.1f}" for b in widths)
        lines.append(f"| {r['layer']} | {r['weights']:,} | {cells} |")
    if proposal is not None:
        from .sensitivity import packed_bytes  # imports mxnet: not at the top of a plotting module

        packed = packed_bytes(rows, {name: wa[0] for name, wa in proposal.items()})
        total = sum(r["weights"] for r in rows)
        lines += ["", "Proposed `quant.layer_bits` (others at 8 bits): " +
                  (", ".join(f"{k}: {v}" for k, v in proposal.items()) or "none needed"),
                  "", f"Packed weights: {packed:,.0f} bytes (all at 8 bits: "
                      f"{total:,}; all at 4 bits: {total / 2:,.0f})"]
    (run / "sensitivity.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    for i, b in enumerate(widths):
        drop = [100 * (result["base"] - r[f"acc_{b}"]) for r in rows]
        ax.bar(x + (i - (len(widths) - 1) / 2) * 0.8 / len(widths), drop, 0.8 / len(widths), label=tag[b])
    ax.set_xticks(list(x), [r["layer"] for r in rows], rotation=60, fontsize=7)
    ax.set(ylabel="top-1 drop, points", title="each layer alone at a lower width (others W8A8)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "sensitivity.png", dpi=110)
    plt.close(fig)
