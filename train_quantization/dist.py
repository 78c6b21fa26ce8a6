"""An MXNet parameter-server cluster (ps-lite) on this machine, or its commands for real hosts.

Local mode: the scheduler, the servers and the workers are processes on this machine, bound to
127.0.0.1 (DMLC_INTERFACE=lo); every one of them ends when ``run_local`` returns (the workers'
exit, an error, a timeout or Ctrl-C). MXNet's own launcher (``python -m mxnet.tools.launch``)
fails on Python 3.11 (its dmlc_tracker calls ``Thread.isAlive``). ``host_commands``: the
environment and command for the scheduler (on this machine), each server and each worker
(hosts round-robin), to start by hand or with a cluster tool.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

SERVER_CMD = [sys.executable, "-c", "import mxnet"]  # importing mxnet runs the server/scheduler loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(role: str, root: str, port: int, workers: int, servers: int, node_host: str) -> dict:
    env = {"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": str(port),
           "DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers), "DMLC_NODE_HOST": node_host}
    if root == "127.0.0.1":
        env["DMLC_INTERFACE"] = "lo"
    return env


def host_commands(cmd: list, hosts: list, workers: int, servers: int, port: int = 9091) -> list:
    """One ``# role on host`` line and one ``ENV... command`` line per process of a real cluster."""
    root = socket.gethostname()
    procs = [("scheduler", root, SERVER_CMD)] + \
        [(f"server {i}", hosts[i % len(hosts)], SERVER_CMD) for i in range(servers)] + \
        [(f"worker {i}", hosts[i % len(hosts)], cmd) for i in range(workers)]
    lines = []
    for what, host, c in procs:
        env = cluster_env(what.split()[0], root, port, workers, servers, host)
        lines += [f"# {what} on {host}", " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(c)]
    return lines


def _stop_all(procs: list) -> None:
    for pr in procs:
        if pr.poll() is None:
            os.killpg(pr.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for pr in procs:
        try:
            pr.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(pr.pid, signal.SIGKILL)
            pr.wait()


def run_local(cmd: list, workers: int, servers: int, port: int = 0, timeout: float = 3600) -> int:
    """Run ``cmd`` on ``workers`` local workers with ``servers`` servers; 0 when every worker succeeded."""
    port = port or free_port()
    procs: list = []

    def start(role: str, c: list) -> subprocess.Popen:
        env = dict(os.environ, **cluster_env(role, "127.0.0.1", port, workers, servers, "127.0.0.1"))
        procs.append(subprocess.Popen(c, env=env, start_new_session=True))
        return procs[-1]

    try:
        start("scheduler", SERVER_CMD)
        for _ in range(servers):
            start("server", SERVER_CMD)
        started = [start("worker", cmd) for _ in range(workers)]
        deadline = time.time() + timeout
        while time.time() < deadline:
            codes = [w.poll() for w in started]
            if any(c not in (None, 0) for c in codes):
                print(f"error: a worker failed (exit codes {codes}); stopping the cluster", file=sys.stderr)
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        print(f"error: timeout after {timeout:.0f} s; stopping the cluster", file=sys.stderr)
        return 1
    finally:
        _stop_all(procs)
