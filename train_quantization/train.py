"""One training loop for float training and QAT; run folders, checkpoints, metrics.

A run folder holds ``config.yaml`` (resolved), ``env.json`` (versions, commit, command),
``train.log``, ``metrics.jsonl`` (one JSON object per epoch), ``best.params``,
``last.params`` and ``last.states`` (trainer state), ``average.params`` (with
``optim.average_decay``: the weight average) and ``state.json`` (epoch, step).
Every file is written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from . import data as data_mod
from .config import Config, OptimConfig, dump_config
from .errors import UserError
from .layers import BN_MOMENTUM, QConv2DBN, quantized_layers, set_quant_state, visit_layer_inputs

log = logging.getLogger("train_quantization")


# ----------------------------------------------------------------------------- setup
def parse_ctx(spec: str) -> list:
    """``cpu``, ``cpu:0,cpu:1``, ``gpu:0`` ... -> list of contexts; a missing GPU is a UserError."""
    ctxs = []
    for part in spec.split(","):
        kind, _, idx = part.strip().partition(":")
        if kind not in ("cpu", "gpu") or (idx and not idx.isdigit()):
            raise UserError(f"--ctx {spec!r}: use cpu, cpu:0,cpu:1 or gpu:N")
        i = int(idx or 0)
        if kind == "gpu" and i >= mx.context.num_gpus():
            raise UserError(f"--ctx {part}: no such GPU (this MXNet sees {mx.context.num_gpus()}); use --ctx cpu")
        ctxs.append(mx.gpu(i) if kind == "gpu" else mx.cpu(i))
    return ctxs


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_params(net: gluon.Block, path: Path) -> None:
    """``net.save_parameters`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    net.save_parameters(str(tmp))
    os.replace(tmp, path)


_KV: dict = {}


def kvstore_of(cfg: Config) -> tuple:
    """``(kvstore for the Trainer, rank, workers)``; a dist kvstore is created once per process
    (it joins the ps-lite cluster described by the DMLC_* environment, see launch_dist.py)."""
    if not cfg.kvstore.startswith("dist"):
        return cfg.kvstore, 0, 1
    if cfg.kvstore not in _KV:
        if "DMLC_ROLE" not in os.environ:
            raise UserError(f"kvstore {cfg.kvstore} needs a parameter-server cluster; start the command with "
                            "scripts/launch_dist.py -n WORKERS -s SERVERS -- <command>")
        _KV[cfg.kvstore] = mx.kv.create(cfg.kvstore)
    kv = _KV[cfg.kvstore]
    return kv, kv.rank, kv.num_workers


def make_run_dir(cfg: Config, kind: str, stem: str) -> Path:
    name = cfg.name or f"{stem}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    _, rank, _ = kvstore_of(cfg)
    if rank > 0:  # every worker keeps its own run folder; rank 0's is the run
        name = f"{name}-rank{rank}"
    run = Path(cfg.out) / name
    if (run / "metrics.jsonl").exists():
        raise UserError(f"run folder {run} already holds a run; pass another --name or --out")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    from .machine import facts

    env = {"kind": kind, "command": " ".join(sys.argv), "python": platform.python_version(),
           "mxnet": mx.__version__, "numpy": np.__version__, **facts(), "commit": _git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(run / "env.json", json.dumps(env, indent=2))
    log_to(run)
    return run


def log_to(run: Path) -> None:
    """Append this process's log to ``run/train.log``."""
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- pieces
def schedule_of(cfg: Config, qat: bool) -> OptimConfig:
    """The optimizer settings of a run: ``optim``, with QAT's epochs, peak rate (cosine to 0, no
    warm-up) and weight decay (``qat.wd`` unless null) from the ``qat`` recipe."""
    if not qat:
        return cfg.optim
    wd = cfg.optim.wd if cfg.qat.wd is None else cfg.qat.wd
    return dataclasses.replace(cfg.optim, epochs=cfg.qat.epochs, lr=cfg.qat.lr, wd=wd, warmup_epochs=0.0,
                               schedule="cosine", average_decay=0.0)


def make_trainer(net: gluon.Block, cfg: Config, steps_per_epoch: int, qat: bool = False) -> gluon.Trainer:
    o = schedule_of(cfg, qat)
    total = max(1, o.epochs * steps_per_epoch)
    warm = int(o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        sched = mx.lr_scheduler.CosineScheduler(max_update=total, base_lr=o.lr, final_lr=0.0,
                                                warmup_steps=min(warm, total - 1), warmup_begin_lr=0.0)
    elif o.schedule == "step":
        steps = [int(e * steps_per_epoch) for e in o.step_epochs] or [total + 1]
        sched = mx.lr_scheduler.MultiFactorScheduler(steps, o.step_factor, base_lr=o.lr,
                                                     warmup_steps=warm, warmup_begin_lr=0.0)
    else:
        sched = mx.lr_scheduler.FactorScheduler(total + 1, 1.0, base_lr=o.lr, warmup_steps=warm,
                                                warmup_begin_lr=0.0)
    params = {"learning_rate": o.lr, "wd": o.wd, "lr_scheduler": sched}
    if o.optimizer in ("sgd", "nag"):
        params["momentum"] = o.momentum
    # range states and learned steps never decay; BN affine and biases only with optim.wd_all
    for name, p in net.collect_params().items():
        if name.endswith(("input_max", "weight_step")) or not (o.wd_all or name.endswith("weight")):
            p.wd_mult = 0.0
    kv, _, _ = kvstore_of(cfg)
    # distributed: servers only sum gradients; every worker applies the same update locally
    trainer = gluon.Trainer(net.collect_params(), o.optimizer, params, kvstore=kv,
                            update_on_kvstore=False if cfg.kvstore.startswith("dist") else None)
    if cfg.kvstore.startswith("dist"):
        start_dist_trainer(trainer)
    return trainer


def start_dist_trainer(trainer: gluon.Trainer) -> None:
    """Join the servers and copy rank 0's parameters to every worker, finished before the first step.

    The Trainer does this lazily inside its first ``step``: ``kv.broadcast`` (init, then an
    asynchronous pull of each key) and then, in the same call, the gradient ``pushpull`` on the
    same keys. The pull and the pushpull use different buffers, so the engine may send the
    pushpull first; the pull then returns the summed gradients, which become the worker's weights
    (about one run in four of ``tests/test_dist.py`` on a busy 2-core CPU: both workers diverged).
    Waiting for the pulls here removes that ordering.
    """
    trainer._init_kvstore()  # the public API has no separate start; these are the calls step() makes
    trainer._init_params()
    mx.nd.waitall()


class WorkerRanges:
    """Activation ranges identical on every worker: after each step, each worker's ``input_max``
    values are gathered (each worker fills its own slot of a zero vector; the servers sum) and
    every worker keeps the maximum, as ``sync_ranges`` does across the devices of one process."""

    KEY = 999_983  # an int key (the Trainer uses int keys; mixing types is refused), beyond its indices

    def __init__(self, net: gluon.Block, kv: Any, rank: int, workers: int):
        self.layers = [layer for _, layer in quantized_layers(net)]
        self.kv, self.rank, self.workers = kv, rank, workers
        self.kv.init(self.KEY, mx.nd.zeros((workers * len(self.layers),)))

    def sync(self) -> None:
        n = len(self.layers)
        mine = mx.nd.concat(*[layer.input_max.data().as_in_context(mx.cpu()) for layer in self.layers], dim=0)
        buf = mx.nd.zeros((self.workers * n,))
        buf[self.rank * n:(self.rank + 1) * n] = mine
        self.kv.push(self.KEY, buf)
        self.kv.pull(self.KEY, out=buf)
        best = buf.reshape((self.workers, n)).max(axis=0)
        for i, layer in enumerate(self.layers):
            for arr in layer.input_max.list_data():
                best[i:i + 1].copyto(arr)


class WorkerCheck:
    """Every worker's parameters compared with rank 0's at the end of each epoch (workers > 1).

    Each worker pushes its flattened parameters (rank 0) or zeros (others) under one key; the
    servers sum, so every worker pulls rank 0's values. Workers apply the same summed gradients,
    so the values should agree bit for bit (``tests/test_dist.py`` asserts a zero difference); if
    they do not (see ``start_dist_trainer`` for the one cause found), the difference is logged and
    rank 0's values are adopted, so checkpoints and the next epoch start from one model."""

    KEY = 999_979

    def __init__(self, net: gluon.Block, kv: Any, rank: int):
        self.params = list(net.collect_params().values())
        self.kv, self.rank = kv, rank
        self.size = sum(int(np.prod(p.shape)) for p in self.params)
        self.kv.init(self.KEY, mx.nd.zeros((self.size,)))

    def run(self, epoch: int) -> float:
        """Largest |local - rank 0| over all parameters; afterwards every worker holds rank 0's values."""
        mine = mx.nd.concat(*[p.data().as_in_context(mx.cpu()).reshape((-1,)) for p in self.params], dim=0)
        buf = mine if self.rank == 0 else mx.nd.zeros((self.size,))
        self.kv.push(self.KEY, buf)
        ref = mx.nd.zeros((self.size,))
        self.kv.pull(self.KEY, out=ref)
        diff = float(mx.nd.abs(mine - ref).max().asscalar())
        if diff > 0:
            log.warning("epoch %d: worker %d's parameters differ from worker 0's by up to %.3g; "
                        "continuing from worker 0's", epoch, self.rank, diff)
            offset = 0
            for p in self.params:
                n = int(np.prod(p.shape))
                p.set_data(ref[offset:offset + n].reshape(p.shape))
                offset += n
        return diff


class WeightAverage:
    r"""Exponential moving average of every value of a network (Polyak averaging, as timm's
    ``ModelEmaV2``), BatchNorm's running statistics included:

    .. math:: \bar w_1 = w_1, \qquad \bar w_t = d \, \bar w_{t-1} + (1 - d) \, w_t

    after each optimizer step ``t``. Training never reads the average; ``swapped()`` puts it into
    the network for evaluation and checkpoints and then restores the trained values exactly.
    """

    def __init__(self, net: gluon.Block, decay: float):
        self.net, self.decay = net, decay
        self.params = list(net.collect_params().values())
        self.avg: Optional[list] = None  # set by the first update (or load)

    def update(self) -> None:
        if self.avg is None:
            self.avg = [p.data().copy() for p in self.params]
            return
        for a, p in zip(self.avg, self.params):
            a *= self.decay
            a += (1.0 - self.decay) * p.data()

    @contextmanager
    def _restoring(self) -> Iterator[None]:
        """The network's values after the ``with`` block are those before it, bit for bit."""
        raw = [p.data().copy() for p in self.params]
        try:
            yield
        finally:
            for r, p in zip(raw, self.params):
                p.set_data(r)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the network inside the ``with`` block, the trained values after it."""
        with self._restoring():
            for a, p in zip(self.avg, self.params):
                p.set_data(a)
            yield

    def recompute_bn(self, loader: Any, norm: Any, ctxs: list) -> None:
        r"""Set the average's BatchNorm running statistics to the mean over the batches of ``loader`` (training
        images) of the batch statistics under the averaged weights (SWA's ``update_bn``, Izmailov et al. 2018).

        MXNet updates running statistics in the backward pass, :math:`r \leftarrow m r + (1 - m) s` with
        ``m = BN_MOMENTUM`` (every BatchNorm here, and Gluon's default): from ``r = 0`` one forward and
        backward (no optimizer step) leaves ``(1 - m) s``.
        """
        stats = [i for i, p in enumerate(self.params) if p.name.endswith(("running_mean", "running_var"))]
        sums = {i: mx.nd.zeros(self.params[i].shape) for i in stats}
        n = 0
        with self.swapped():
            for x, _ in loader:
                for i in stats:
                    self.params[i].set_data(mx.nd.zeros(self.params[i].shape))
                with autograd.record():
                    outs = [self.net(norm(a)) for a in split(x, ctxs)]
                autograd.backward(outs)
                for i in stats:
                    sums[i] += self.params[i].data().as_in_context(mx.cpu()) / (1.0 - BN_MOMENTUM)
                n += 1
        for i in stats:
            self.avg[i][:] = (sums[i] / max(n, 1)).as_in_context(self.avg[i].context)

    def save(self, path: Path) -> None:
        with self.swapped():
            save_params(self.net, path)

    def load(self, path: Path) -> None:
        """The average from a file written by ``save`` (the network's values are kept)."""
        with self._restoring():
            self.net.load_parameters(str(path))
            self.avg = [p.data().copy() for p in self.params]


def split(batch: Any, ctxs: list) -> list:
    return gluon.utils.split_and_load(batch, ctxs, even_split=False)


def evaluate(net: gluon.Block, loader: gluon.data.DataLoader, norm: Any, ctxs: list,
             return_outputs: bool = False) -> dict:
    """Top-1 accuracy and mean cross-entropy in evaluation mode (ranges are not touched)."""
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    correct = total = 0
    loss_sum = 0.0
    outputs = []
    for x, y in loader:
        for xs, ys in zip(split(x, ctxs), split(y, ctxs)):
            out = net(norm(xs))
            loss_sum += float(loss_fn(out, ys.astype("float32")).sum().asscalar())
            pred = out.argmax(axis=1).astype("int32")
            correct += int((pred == ys.astype("int32")).sum().asscalar())
            total += ys.shape[0]
            if return_outputs:
                outputs.append(out.asnumpy())
    res = {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}
    if return_outputs:
        res["logits"] = np.concatenate(outputs)
    return res


def sync_ranges(net: gluon.Block) -> None:
    """Make every device's activation ranges equal: the max over devices.

    All devices start a step with the same ``input_max`` and the EMA is monotone in the
    batch maximum, so the max of the per-device results equals the single-device update on
    the whole global batch (``m * r + (1 - m) * max_d(max|x_d|)``).
    """
    for _, layer in quantized_layers(net):
        arrs = layer.input_max.list_data()
        if len(arrs) > 1:
            m = mx.nd.max(mx.nd.stack(*[a.as_in_context(arrs[0].context) for a in arrs]), axis=0)
            for a in arrs:
                m.copyto(a)


def range_summary(net: gluon.Block) -> dict:
    return {name: float(layer.input_max.data().asscalar()) for name, layer in quantized_layers(net)}


def calibrate(net: gluon.Block, loader: gluon.data.DataLoader, norm: Any, ctxs: list, batches: int) -> None:
    """Initialize the EMA ranges with training-mode forwards (no backward, no weight update)."""
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        with autograd.train_mode():
            for xs in split(x, ctxs):
                net(norm(xs)).wait_to_read()
        sync_ranges(net)


# ----------------------------------------------------------------------------- loop
LOG_EVERY = 10  # optimizer steps between rows of steps.jsonl


def _step_of(line: str) -> float:
    """Step of a steps.jsonl line; inf for a line cut short by a crash (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def check_resumable(run: Path) -> None:
    """Before a resumed run loads ``last.params``: a UserError unless an epoch finished."""
    if not (run / "state.json").is_file() or not (run / "last.params").is_file():
        raise UserError(f"{run} has no completed epoch to resume from (no state.json/last.params); "
                        "start the run again with --config (and another --name, or delete the folder)")


def resume_point(run: Path) -> tuple:
    """(completed epochs, global step, best record, last record) of an interrupted run that passed
    ``check_resumable``; drops metrics lines of an epoch whose checkpoint was not completed."""
    state = json.loads((run / "state.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    rows = [json.loads(ln) for ln in lines if ln.strip()]
    rows = [r for r in rows if r["epoch"] <= state["epoch"]]
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    steps_file = run / "steps.jsonl"
    if steps_file.is_file():
        keep = [ln for ln in steps_file.read_text().splitlines() if _step_of(ln) <= state["step"]]
        atomic_write_text(steps_file, "".join(ln + "\n" for ln in keep))
    best = max(rows, key=lambda r: r["test_acc"]) if rows else {"test_acc": -1.0}
    return state["epoch"], state["step"], best, rows[-1] if rows else best


def distilled_loss(base: Any, temperature: float, weight: float) -> Any:
    r"""``loss(student, labels, teacher)``: ``(1 - w) * base + w * T^2 * KL(softmax(t/T) || softmax(s/T))``
    (Hinton et al. 2015; the ``T^2`` keeps the soft term's gradients on the hard term's scale)."""
    def loss(out: Any, y: Any, teacher: Any) -> Any:
        p_t = mx.nd.softmax(teacher / temperature)
        kl = mx.nd.sum(p_t * (mx.nd.log(p_t + 1e-12) - mx.nd.log_softmax(out / temperature)), axis=1)
        return (1.0 - weight) * base(out, y) + weight * temperature**2 * kl

    return loss


def smoothed_loss(eps: float, classes: int) -> Any:
    """``loss(logits, labels)``: cross-entropy against ``(1 - eps) * one_hot(y) + eps / classes``
    (label smoothing; plain cross-entropy for ``eps = 0``)."""
    if eps == 0.0:
        plain = gluon.loss.SoftmaxCrossEntropyLoss()
        return lambda out, y: plain(out, y.astype("float32"))
    dense = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)
    return lambda out, y: dense(out, mx.nd.one_hot(y, classes) * (1.0 - eps) + eps / classes)


@dataclass
class _Loop:
    """One training run's moving parts and its position (``step``, QAT ``phase``)."""

    net: gluon.HybridBlock
    cfg: Config
    run: Path
    ctxs: list
    qat: bool
    trainer: gluon.Trainer
    norm: Any
    loss_fn: Any
    workers: int
    worker_ranges: Optional[WorkerRanges]
    steps_log: Any
    step: int = 0
    phase: Optional[tuple] = None
    teacher: Optional[gluon.HybridBlock] = None  # distillation: the float model's logits are the soft targets
    average: Optional[WeightAverage] = None  # optim.average_decay > 0: evaluated and saved as the model
    bn_loader: Any = None  # training batches that recompute the average's BatchNorm statistics

    def train_step(self, x: Any, y: Any, epoch: int) -> tuple:
        """One optimizer step; returns ``(summed loss, correct predictions)`` of the batch."""
        net, qat = self.net, self.qat
        if qat:
            self.phase = qat_phase(net, self.cfg, self.step, self.phase)
        xs, ys = split(x, self.ctxs), split(y, self.ctxs)
        soft = [self.teacher(self.norm(a)) for a in xs] if self.teacher else None  # no gradient: outside record
        with autograd.record():
            outs = [net(self.norm(a)) for a in xs]
            losses = [self.loss_fn(o, b) for o, b in zip(outs, ys)] if soft is None else \
                [self.loss_fn(o, b, t) for o, b, t in zip(outs, ys, soft)]
        autograd.backward(losses)
        self.trainer.step(x.shape[0] * self.workers)
        if self.average:
            self.average.update()
        if qat:
            sync_ranges(net)
            if self.worker_ranges:
                self.worker_ranges.sync()
        self.step += 1
        batch_loss = sum(float(v.sum().asscalar()) for v in losses)
        if not math.isfinite(batch_loss):
            last = self.run / "last.params"
            raise UserError(f"loss is {batch_loss} at step {self.step} (epoch {epoch + 1}); stopped. "
                            f"Last good checkpoint: {last if last.exists() else 'none'}; lower optim.lr")
        if self.step % LOG_EVERY == 0 or self.step == 1:
            row = {"step": self.step, "loss": batch_loss / x.shape[0], "lr": self.trainer.learning_rate}
            if qat:
                row["ranges"] = range_summary(net)
            self.steps_log.write(json.dumps(row) + "\n")
        correct = sum(int((o.argmax(axis=1).astype("int32") == b.astype("int32")).sum().asscalar())
                      for o, b in zip(outs, ys))
        return batch_loss, correct

    def train_epoch(self, epoch: int, epochs: int, loader: Any) -> dict:
        """One pass over ``loader`` (reseeded from ``(seed, epoch)``); the epoch's training metrics."""
        seed_all(self.cfg.seed * 100003 + epoch)
        if isinstance(loader._batchify_fn, data_mod.CropFlip):
            loader._batchify_fn.reseed(self.cfg.seed * 100003 + epoch)
        t0 = time.time()
        loss_sum = correct = seen = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, mininterval=1.0,
                   file=sys.stderr)
        for x, y in bar:
            batch_loss, ok = self.train_step(x, y, epoch)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + ok, seen + x.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.time() - t0):.0f}",
                            lr=f"{self.trainer.learning_rate:.4f}", refresh=False)
        train_time = time.time() - t0
        return {"epoch": epoch + 1, "step": self.step, "lr": self.trainer.learning_rate,
                "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "epoch_time_s": round(train_time, 2), "images_per_s": round(seen / train_time, 1)}

    def test(self, loader: Any) -> dict:
        """The epoch's test metrics: of the weight average when there is one (``raw_*``: the trained weights)."""
        ev = evaluate(self.net, loader, self.norm, self.ctxs)
        if not self.average:
            return {"test_loss": ev["loss"], "test_acc": ev["acc"]}
        if self.bn_loader is not None:
            self.average.recompute_bn(self.bn_loader, self.norm, self.ctxs)
        with self.average.swapped():
            avg = evaluate(self.net, loader, self.norm, self.ctxs)
        return {"test_loss": avg["loss"], "test_acc": avg["acc"], "raw_test_loss": ev["loss"],
                "raw_test_acc": ev["acc"]}

    def checkpoint(self, rec: dict, best: dict) -> dict:
        """Write the epoch's checkpoint, trainer state, metrics row and position; returns the best record."""
        run = self.run
        save_params(self.net, run / "last.params")
        tmp = run / "last.states.tmp"
        self.trainer.save_states(str(tmp))
        os.replace(tmp, run / "last.states")
        if self.average:
            self.average.save(run / "average.params")
        if rec["test_acc"] > best["test_acc"]:
            if self.average:  # the model is the average just written
                shutil.copyfile(run / "average.params", run / "best.params.tmp")
                os.replace(run / "best.params.tmp", run / "best.params")
            else:
                save_params(self.net, run / "best.params")
            best = dict(rec)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        atomic_write_text(run / "state.json", json.dumps({"epoch": rec["epoch"], "step": self.step}))
        self.steps_log.flush()
        return best


def fit(net: gluon.HybridBlock, cfg: Config, ds: data_mod.Dataset, run: Path, ctxs: list,
        qat: bool = False, resume: bool = False, teacher: Optional[gluon.HybridBlock] = None) -> tuple:
    """Train ``net`` for ``cfg.optim.epochs`` epochs (QAT: ``cfg.qat``'s schedule, see ``schedule_of``);
    returns the best and the last epoch's metrics.

    Each epoch reseeds Python, NumPy and MXNet from ``(seed, epoch)``, so a run resumed after
    its last completed epoch (``resume=True``: trainer state, schedule position and metrics
    come from the run folder; the caller loads ``last.params``) continues as it would have.
    ``teacher`` (QAT with ``qat.distill``): the float network whose softened logits the loss follows.
    """
    kv, rank, workers = kvstore_of(cfg)
    if cfg.data.batch_size % workers:
        raise UserError(f"data.batch_size {cfg.data.batch_size} is not a multiple of the {workers} workers")
    # every worker trains on its own shard with batch_size / workers images a step (same global batch)
    shard = ds if workers == 1 else dataclasses.replace(ds, train_x=ds.train_x[rank::workers],
                                                         train_y=ds.train_y[rank::workers])
    train_loader, test_loader = data_mod.make_loaders(shard, cfg.data.batch_size // workers,
                                                      cfg.data.eval_batch_size, cfg.data.augment, cfg.seed)
    worker_ranges = WorkerRanges(net, kv, rank, workers) if qat and workers > 1 else None
    if worker_ranges:
        worker_ranges.sync()  # calibration ran on each worker's own shard
    worker_check = WorkerCheck(net, kv, rank) if workers > 1 else None
    norm = data_mod.normalizer(*ds.mean_std())
    trainer = make_trainer(net, cfg, len(train_loader), qat)
    epochs = schedule_of(cfg, qat).epochs
    loss_fn = smoothed_loss(cfg.optim.label_smoothing, ds.num_classes)
    if teacher is not None:
        loss_fn = distilled_loss(loss_fn, cfg.qat.distill, cfg.qat.distill_weight)
    best: dict = {"test_acc": -1.0}
    start, step, rec = 0, 0, best
    decay = schedule_of(cfg, qat).average_decay
    average = WeightAverage(net, decay) if decay > 0 else None
    if resume:  # before steps.jsonl is opened: resume_point rewrites it
        start, step, best, rec = resume_point(run)
        trainer.load_states(str(run / "last.states"))
        log.info("resuming %s after epoch %d (step %d)", run, start, step)
        if average and (run / "average.params").is_file():
            average.load(run / "average.params")
        elif average:
            log.info("no average.params: the weight average starts from the weights after epoch %d", start)
    loop = _Loop(net, cfg, run, ctxs, qat, trainer, norm, loss_fn, workers, worker_ranges,
                 open(run / "steps.jsonl", "a"), step, teacher=teacher, average=average)  # steps: loss, lr, ranges
    loop.phase = qat_phase(net, cfg, loop.step, None) if qat else None
    if average and cfg.optim.average_bn_batches:  # a fixed subset: the same images every epoch
        loop.bn_loader = data_mod.calib_loader(shard, cfg.data.batch_size // workers, cfg.optim.average_bn_batches,
                                               cfg.seed)
    for epoch in range(start, epochs):
        rec = loop.train_epoch(epoch, epochs, train_loader)
        worker_diff = worker_check.run(epoch + 1) if worker_check else None
        rec = {**{k: rec[k] for k in ("epoch", "step", "lr", "train_loss", "train_acc")}, **loop.test(test_loader),
               "epoch_time_s": rec["epoch_time_s"], "images_per_s": rec["images_per_s"]}
        if qat:
            rec["ranges"] = range_summary(net)
        if worker_diff is not None:
            rec["worker_max_diff"] = worker_diff
        best = loop.checkpoint(rec, best)
        log.info("epoch %d/%d  train_loss %.4f  train_acc %.4f  test_acc %.4f  %.0f img/s  %.1f s%s", epoch + 1,
                 epochs, rec["train_loss"], rec["train_acc"], rec["test_acc"], rec["images_per_s"],
                 rec["epoch_time_s"], f"  (trained weights {rec['raw_test_acc']:.4f})" if average else "")
    loop.steps_log.close()
    return best, rec


def qat_phase(net: gluon.HybridBlock, cfg: Config, step: int, current: Optional[tuple]) -> tuple:
    """Bring the QAT schedule to ``step`` and return its phase ``(quantizing, ranges_frozen, bn_frozen)``.

    ``qat.delay_steps``: fake quantization off (float with the BN fold) before that step;
    ``qat.freeze_ranges_step``: the range EMA stops from that step on; ``qat.bn_freeze_step``
    (paper BN mode): running statistics from that step on. The graph is rebuilt when the phase
    changes, so a resumed run lands in the same phase.
    """
    r = cfg.qat
    phase = (step >= r.delay_steps,
             0 <= r.freeze_ranges_step <= step or cfg.quant.range == "mse",
             cfg.quant.bn_mode == "frozen" or step >= r.bn_freeze_step)
    if phase == current:
        return phase
    set_quant_state(net, enabled=phase[0], freeze_ranges=phase[1])
    if phase[2] and cfg.quant.bn_mode == "paper":
        for _, layer in quantized_layers(net):
            if isinstance(layer, QConv2DBN):
                layer.freeze_bn()
    net.hybridize(static_alloc=True)
    if current is not None:
        log.info("step %d: fake quantization %s, ranges %s, BN statistics %s", step,
                 "on" if phase[0] else "off (delay)", "frozen" if phase[1] else "updating",
                 "frozen" if phase[2] else "from the batch")
    return phase


def clip_shares(net: gluon.HybridBlock, loader: gluon.data.DataLoader, norm: Any, ctx: mx.Context,
                batches: int = 2) -> dict:
    """Share of each quantized layer's input values that saturate (evaluation mode)."""
    from .layers import input_grid

    counts = {name: [0, 0] for name, _ in quantized_layers(net)}

    def count(name: str, block: Any, x: Any) -> None:
        lo, hi, divisor = input_grid(block)
        s = max(float(block.input_max.data(x.context).asscalar()), 1e-12) / divisor
        u = (x / s).asnumpy()
        counts[name][0] += int(((u > hi + 0.5) | (u < lo - 0.5)).sum())
        counts[name][1] += u.size

    visit_layer_inputs(net, loader, norm, ctx, batches, count)
    return {name: c[0] / max(c[1], 1) for name, c in counts.items()}


def train_float(cfg: Config, resume: Optional[Path] = None, ds: Optional[data_mod.Dataset] = None,
                stem: str = "fp32") -> dict:
    """Train the float network of ``cfg`` (or continue the run folder ``resume``); returns
    ``result.json``'s content plus ``run`` and ``net``."""
    from . import cli

    setup_logging()
    ctxs = parse_ctx(cfg.ctx)
    ds = ds or data_mod.dataset_from_config(cfg.data)
    seed_all(cfg.seed)
    net = cli.build_for(cfg, ds, quant=False)
    if resume:
        run = Path(resume)
        check_resumable(run)
        cli.load_weights(net, run / "last.params", ctxs, expect_ranges=False)
        log_to(run)
    else:
        cli.init_net(net, ctxs)
        run = make_run_dir(cfg, "fp32", stem)
    net.hybridize(static_alloc=True)
    log.info("run folder %s; %d train / %d test images %s, %d classes", run, len(ds.train_x), len(ds.test_x),
             ds.image_shape, ds.num_classes)
    best, _ = fit(net, cfg, ds, run, ctxs, resume=resume is not None)
    result = {"kind": "fp32", "best_test_acc": best["test_acc"], "best_epoch": best["epoch"], "classes": ds.classes}
    cli.write_json(run / "result.json", result)
    return dict(result, run=run, net=net)
