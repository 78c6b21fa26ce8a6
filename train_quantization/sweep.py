"""Accuracy against bit width from one float checkpoint: PTQ (max, MSE, MSE with clipped weights)
and QAT (``qat.train_qat``) for each weight/activation width pair, into one run folder
(``sweep.json``, ``sweep.md``, ``sweep.png``; each QAT run in its own folder under it)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import cli, ptq, report, train
from . import data as data_mod
from .config import Config
from .errors import UserError
from .qat import train_qat


def parse_pairs(text: str) -> list:
    pairs = []
    for item in text.split(","):
        try:
            w, a = (int(v) for v in item.strip().split("/"))
        except ValueError:
            raise UserError(f"--pairs item {item!r} is not W/A (e.g. 4/8)") from None
        if not (2 <= w <= 8 and 2 <= a <= 8):
            raise UserError(f"--pairs item {item!r}: widths must be 2-8")
        pairs.append((w, a))
    return pairs


def attach(run: Path, recipes: list) -> None:
    """Add finished QAT runs to a sweep's rows (key ``qat_recipe``) and redraw its table and plot."""
    if not (run / "sweep.json").is_file():
        raise UserError(f"--attach {run}: not a sweep run folder (no sweep.json)")
    out = json.loads((run / "sweep.json").read_text())
    for item in recipes:
        pair, _, qat = item.partition("=")
        (w, a), res = parse_pairs(pair)[0], Path(qat) / "result.json"
        if not res.is_file():
            raise UserError(f"--recipe {item}: {res} not found (pass a finished train_qat.py run folder)")
        row = next((r for r in out["rows"] if (r["weight_bits"], r["act_bits"]) == (w, a)), None)
        if row is None:
            raise UserError(f"--recipe {item}: the sweep has no W{w}A{a} row")
        row["qat_recipe"], row["qat_recipe_run"] = json.loads(res.read_text())["fq_acc"], str(qat)
    cli.write_json(run / "sweep.json", out)
    report.write_sweep(run, out["rows"])
    print(f"table: {run / 'sweep.md'}\nplot: {run / 'sweep.png'}")


QAT_ROWS = (("qat", {}, {}),  # the config's QAT (EMA ranges unless quant.range says otherwise)
            ("qat_lsq", {"range": "lsq"}, {}),  # learned step sizes
            ("qat_lsq_kd", {"range": "lsq"}, {"distill": 4.0}))  # ... and distillation from the float model


def run_sweep(cfg: Config, weights: Path, pairs: list, calib_batches: int, skip_qat: bool = False,
              qat_extra: tuple = (), stem: str = "sweep", lsq: bool = False) -> Path:
    """PTQ max / MSE / MSE+w and (unless ``skip_qat``) QAT rows for each ``(w, a)`` of ``pairs`` (``lsq``:
    also QAT with learned ranges, without and with distillation); returns the sweep's run folder."""
    train.setup_logging()
    ctxs = train.parse_ctx(cfg.ctx)
    ds = data_mod.dataset_from_config(cfg.data)
    _, test_loader = data_mod.make_loaders(ds, cfg.data.batch_size, cfg.data.eval_batch_size, False, cfg.seed)
    calib = data_mod.calib_loader(ds, cfg.data.batch_size, calib_batches, cfg.seed)
    norm = data_mod.normalizer(*ds.mean_std())
    run = train.make_run_dir(cfg, "sweep", stem)
    fnet = cli.build_for(cfg, ds, quant=False)
    cli.load_weights(fnet, weights, ctxs, expect_ranges=False)
    fnet.hybridize(static_alloc=True)
    float_acc = train.evaluate(fnet, test_loader, norm, ctxs)["acc"]
    rows = []
    for w, a in pairs:
        qcfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, weight_bits=w, act_bits=a))
        row = {"weight_bits": w, "act_bits": a, "float": float_acc}
        for key, act_method, clip_weights in (("ptq_max", "max", False), ("ptq_mse", "mse", False),
                                              ("ptq_mse_w", "mse", True)):
            net, _ = cli.qat_from_float(qcfg, ds, weights, ctxs)
            net.hybridize(static_alloc=True)
            if clip_weights:
                ptq.clip_weights_mse(net)
            ptq.calibrate_ranges(net, calib, norm, ctxs[0], calib_batches, act_method)
            row[key] = train.evaluate(net, test_loader, norm, ctxs)["acc"]
        for key, quant, recipe in QAT_ROWS[:0 if skip_qat else 3 if lsq else 1]:
            name = f"{key.replace('_', '-')}-w{w}a{a}"
            rcfg = dataclasses.replace(qcfg, out=str(run), name=name, quant=dataclasses.replace(qcfg.quant, **quant),
                                       qat=dataclasses.replace(qcfg.qat, **recipe))
            row[key], row[f"{key}_run"] = train_qat(rcfg, str(weights), ds=ds)["fq_acc"], name
        rows.append(row)
        cli.write_json(run / "sweep.json", {"pretrained": str(weights), "per_channel": cfg.quant.per_channel,
                                            "first_last_bits": cfg.quant.first_last_bits,
                                            "add_bits": cfg.quant.add_bits,
                                            "calib_batches": calib_batches, "qat_epochs": cfg.qat.epochs,
                                            "qat_extra": list(qat_extra), "rows": rows})
        print(report.sweep_row_text(rows[-1]), flush=True)
    report.write_sweep(run, rows)
    return run
