"""Per-layer sensitivity to low bit widths, and per-layer widths for a model-size budget.

From a float checkpoint, the network is converted at W8A8 and its ranges calibrated (EMA, as QAT
starts); then each quantized layer alone goes to ``b``-bit weights (``b`` in ``widths``) with its input at
``act_bits`` (8 by default: the budget counts weight bytes, and a narrower input saves none of them; ``None``
lowers the input to ``b`` as well), and the accuracy and the logits' SQNR against the W8A8 network are measured on
training images drawn at random (choosing widths on the test set would leak it into the result). ``propose`` turns
the table into ``quant.layer_bits`` for a budget of weight bytes: starting from 8 bits everywhere,
it lowers, one layer at a time, the width that costs the least accuracy per byte saved, until the
weights fit (bytes counted packed: ``weights * bits / 8``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import mxnet as mx
import numpy as np

from . import cli, train
from . import data as data_mod
from .config import Config
from .layers import quantized_layers, set_layer_widths


def weight_count(net: mx.gluon.Block) -> dict:
    """Weights of each weighted quantized layer."""
    return {name: int(np.prod(b.weight.shape)) for name, b in quantized_layers(net, weights_only=True)}


def _evaluate(net: mx.gluon.HybridBlock, x: mx.nd.NDArray, batch: int = 250) -> np.ndarray:
    return np.concatenate([net(x[i:i + batch]).asnumpy() for i in range(0, x.shape[0], batch)])


def measure(cfg: Config, weights: str, widths: tuple = (4, 2), images: int = 2000,
            act_bits: int | None = 8) -> dict:
    """``{"base": acc at W8A8, "act_bits", "layers": [{"layer", "weights", "acc_<b>", "sqnr_db_<b>"}...]}`` on
    ``images`` training images drawn at random (``act_bits``: the lowered layer's input width, ``None``: its
    weights')."""
    from .qat import calibrate

    train.seed_all(cfg.seed)  # the calibration batches (shuffle, dropout): the same table on every run
    ctxs = train.parse_ctx(cfg.ctx)
    ds = data_mod.dataset_from_config(cfg.data)
    q8 = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, weight_bits=8, act_bits=8, layer_bits={},
                                                            first_last_bits=0))
    net, _ = cli.qat_from_float(q8, ds, cli.resolve_params(weights), ctxs)
    net.hybridize(static_alloc=True)
    calibrate(net, q8, ds, ctxs)
    idx = data_mod.sample(len(ds.train_x), images)  # training images: the test set stays for the result
    x = data_mod.normalizer(*ds.mean_std())(mx.nd.array(ds.train_x[idx], dtype="uint8"))
    labels = ds.train_y[idx]
    ref = _evaluate(net, x)
    rows = []
    for name, count in weight_count(net).items():
        row: dict[str, Any] = {"layer": name, "weights": count}
        for b in widths:
            set_layer_widths(net, dataclasses.replace(q8.quant, layer_bits={name: [b, act_bits or b]}))
            net.hybridize(static_alloc=True)
            out = _evaluate(net, x)
            row[f"acc_{b}"] = float((out.argmax(1) == labels).mean())
            row[f"sqnr_db_{b}"] = float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((out - ref) ** 2), 1e-30)))
        rows.append(row)
    set_layer_widths(net, q8.quant)
    return {"base": float((ref.argmax(1) == labels).mean()), "images": len(idx), "widths": list(widths),
            "act_bits": act_bits, "layers": rows}


def packed_bytes(rows: list, bits: dict) -> float:
    """Weight bytes with each layer at its width (``bits``: layer -> width; 8 if absent), packed."""
    return sum(r["weights"] * bits.get(r["layer"], 8) / 8 for r in rows)


def propose(result: dict, budget_bytes: float) -> dict:
    """Per-layer weight/activation widths (``quant.layer_bits``) whose packed weights fit ``budget_bytes``:
    greedy, the cheapest accuracy loss per byte saved first; layers stay at 8 bits where nothing is needed."""
    rows, base = result["layers"], result["base"]
    bits: dict = {}
    while packed_bytes(rows, bits) > budget_bytes:
        best = None
        for r in rows:
            now = bits.get(r["layer"], 8)
            for b in (w for w in result["widths"] if w < now):
                saved = r["weights"] * (now - b) / 8
                cost = max(base - r[f"acc_{b}"], 0.0) + 1e-9 * (8 - b)  # ties: prefer the milder step
                if best is None or cost / saved < best[0]:
                    best = (cost / saved, r["layer"], b)
        if best is None:
            raise ValueError(f"no widths fit {budget_bytes:.0f} bytes (smallest: "
                             f"{packed_bytes(rows, {r['layer']: min(result['widths']) for r in rows}):.0f})")
        bits[best[1]] = best[2]
    return {name: [b, result.get("act_bits") or b] for name, b in bits.items()}
