"""dist_sync on MXNet's parameter server: 2 workers and 1 server on 127.0.0.1 via launch_dist.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np

from conftest import ROOT


def _cluster_processes(port: int) -> list:
    tag = f"DMLC_PS_ROOT_PORT={port}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_two_workers_identical_weights_and_ranges(float_run, tmp_path):
    """Two workers, one server: identical weights and ranges at the end, and nothing for the
    per-epoch comparison against worker 0 (``train.WorkerCheck``, ``worker_max_diff`` in
    metrics.jsonl) to repair: the workers never drifted apart."""
    from train_quantization.dist import free_port

    port = free_port()
    cmd = [sys.executable, "scripts/launch_dist.py", "-n", "2", "-s", "1", "--port", str(port), "--timeout", "400",
           "--", sys.executable, "scripts/train_qat.py", "--config", "configs/synthetic_tiny.yaml", "--pretrained",
           str(float_run["run"]), "--out", str(tmp_path), "--name", "q", "--epochs", "1", "--kvstore", "dist_sync"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=450)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _cluster_processes(port) == []  # scheduler, server and workers all ended
    a = mx.nd.load(str(tmp_path / "q" / "last.params"))
    b = mx.nd.load(str(tmp_path / "q-rank1" / "last.params"))
    assert sorted(a) == sorted(b) and len([k for k in a if k.endswith("input_max")]) == 15
    for k in a:  # same weights and the same ranges, bit for bit
        assert np.array_equal(a[k].asnumpy(), b[k].asnumpy()), k
    ranges = [float(a[k].asscalar()) for k in a if k.endswith("input_max")]
    assert all(v > 0 for v in ranges)
    m0 = [json.loads(ln) for ln in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(ln) for ln in (tmp_path / "q-rank1" / "metrics.jsonl").read_text().splitlines()]
    assert m0[-1]["test_acc"] == m1[-1]["test_acc"] and m0[-1]["ranges"] == m1[-1]["ranges"]
    assert m0[-1]["step"] == 2000 // 64  # each worker: half of every global batch of 64 images
    assert m0[-1]["worker_max_diff"] == 0.0  # worker 0 compares with itself
    assert m1[-1]["worker_max_diff"] == 0.0, r.stderr[-3000:]  # the workers never drifted apart


def test_dist_without_cluster_is_a_one_line_error(float_run, tmp_path):
    r = subprocess.run([sys.executable, "scripts/train_qat.py", "--config", "configs/synthetic_tiny.yaml",
                        "--pretrained", str(float_run["run"]), "--out", str(tmp_path), "--kvstore", "dist_sync"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if not k.startswith("DMLC_")})
    assert r.returncode == 2 and "launch_dist.py" in r.stderr.strip().splitlines()[-1]
