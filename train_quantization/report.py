"""Tables and PNG plots from run folders' saved files (no training, no model evaluation here)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _pct(v: object) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "-"


# ----------------------------------------------------------------------------- bit-width sweep
SWEEP_SERIES = (("ptq_max", "PTQ max"), ("ptq_mse", "PTQ MSE"), ("ptq_mse_w", "PTQ MSE+w"), ("qat", "QAT"))


def sweep_row_text(r: dict) -> str:
    return (f"W{r['weight_bits']}A{r['act_bits']}: float {_pct(r['float'])}  " +
            "  ".join(f"{label} {_pct(r.get(key))}" for key, label in SWEEP_SERIES))


def sweep_markdown(rows: list) -> str:
    head = "| W/A bits | float % | " + " | ".join(f"{label} %" for _, label in SWEEP_SERIES) + \
           " | QAT - float (points) |\n|---|---|" + "---|" * (len(SWEEP_SERIES) + 1) + "\n"
    body = ""
    for r in rows:
        gap = f"{100 * (r['qat'] - r['float']):+.2f}" if "qat" in r else "-"
        body += (f"| W{r['weight_bits']}A{r['act_bits']} | {_pct(r['float'])} | " +
                 " | ".join(_pct(r.get(key)) for key, _ in SWEEP_SERIES) + f" | {gap} |\n")
    return head + body


def write_sweep(run: Path, rows: list) -> None:
    """sweep.md and sweep.png (top-1 against the W/A pair, one line per method, float dashed)."""
    (run / "sweep.md").write_text(sweep_markdown(rows))
    labels = [f"W{r['weight_bits']}A{r['act_bits']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.6))
    x = range(len(rows))
    for key, label in SWEEP_SERIES:
        ys = [100 * r[key] if key in r else float("nan") for r in rows]
        ax.plot(x, ys, marker="o", label=label)
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
