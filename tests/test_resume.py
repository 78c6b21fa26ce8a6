"""Determinism and crash safety: same seed, same metrics; SIGKILL mid-epoch, then --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mxnet as mx

from conftest import ROOT

TIMING = ("epoch_time_s", "images_per_s")


def _metrics(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _train(out, name, *extra):
    cmd = [sys.executable, "scripts/train_fp32.py", "--config", "configs/synthetic_tiny.yaml", "--out", str(out),
           "--name", name, "--epochs", "3", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_same_seed_same_metrics_and_kill_resume(tmp_path):
    # with weight averaging on, so that the average too continues where it stopped
    ref = _train(tmp_path, "ref", "--average-decay", "0.9")
    plain = _train(tmp_path, "plain")
    assert ref.wait(timeout=300) == 0 and plain.wait(timeout=300) == 0

    victim = _train(tmp_path, "killed", "--average-decay", "0.9")
    state = tmp_path / "killed" / "state.json"
    try:
        deadline = time.time() + 240
        while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 1) and time.time() < deadline:
            time.sleep(0.05)
        first = json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[0])
        time.sleep(0.5 * first["epoch_time_s"])  # half-way into the second epoch, on a fast or a slow CPU
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    done_before = json.loads(state.read_text())["epoch"]
    assert 1 <= done_before < 3
    assert not list((tmp_path / "killed").glob("*.tmp"))  # nothing half-written under the real names
    r = subprocess.run([sys.executable, "scripts/train_fp32.py", "--resume", str(tmp_path / "killed")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = _metrics(tmp_path / "killed")
    assert [m["epoch"] for m in got] == [1, 2, 3]
    # another process with the same seed computed the same epochs before the kill (determinism),
    # and the resumed process continued exactly as the uninterrupted run did
    assert got == _metrics(tmp_path / "ref")
    net_params = mx.nd.load(str(tmp_path / "killed" / "last.params"))
    ref_params = mx.nd.load(str(tmp_path / "ref" / "last.params"))
    assert sorted(net_params) == sorted(ref_params)
    assert all((net_params[k] == ref_params[k]).min().asscalar() == 1 for k in ref_params)
    # the per-step log continues without gaps or repeats (lines of the killed epoch were dropped)
    steps = [json.loads(ln) for ln in (tmp_path / "killed" / "steps.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(ln) for ln in (tmp_path / "ref" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps]
    assert steps == ref_steps
    # the average never feeds back into training: the trained weights test as a run without it
    plain = _metrics(tmp_path / "plain")
    assert [m["raw_test_acc"] for m in got] == [m["test_acc"] for m in plain]
    assert [m["raw_test_loss"] for m in got] == [m["test_loss"] for m in plain]
    assert got[-1]["test_loss"] != got[-1]["raw_test_loss"]  # and the average is another model
