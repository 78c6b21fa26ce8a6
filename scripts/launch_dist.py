#!/usr/bin/env python
"""Start an MXNet parameter-server cluster (ps-lite) and run a training command on every worker.

  python scripts/launch_dist.py -n 2 -s 1 -- python scripts/train_qat.py ... --kvstore dist_sync

Local mode (default): the scheduler, the servers and the workers are processes on this machine,
bound to 127.0.0.1 (DMLC_INTERFACE=lo); every one of them ends when the launcher ends (the
workers' exit, an error, a timeout or Ctrl-C). MXNet's own launcher (``python -m
mxnet.tools.launch``) fails on Python 3.11 (its dmlc_tracker calls ``Thread.isAlive``).

``--hosts FILE`` (one host name per line): prints the environment and command for the
scheduler (on this machine), each server and each worker (hosts round-robin), to start by
hand or with your cluster tool; nothing is started.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


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


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print("error: put the worker command after '--' (e.g. -- python scripts/train_qat.py ... "
              "--kvstore dist_sync)", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--workers", type=int, default=2)
    p.add_argument("-s", "--servers", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="scheduler port (0: a free one)")
    p.add_argument("--hosts", help="hosts file: print the commands for a real cluster instead of starting them")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before everything is stopped")
    args = p.parse_args(argv[:argv.index("--")])
    if not cmd or args.workers < 1 or args.servers < 1:
        print("error: need a worker command, --workers >= 1 and --servers >= 1", file=sys.stderr)
        return 2
    server_cmd = [sys.executable, "-c", "import mxnet"]  # importing mxnet runs the server/scheduler loop
    if args.hosts:
        hosts = [h.strip() for h in open(args.hosts) if h.strip() and not h.startswith("#")]
        if not hosts:
            print(f"error: {args.hosts} lists no hosts", file=sys.stderr)
            return 2
        root, port = socket.gethostname(), args.port or 9091
        lines = [("scheduler", root, server_cmd)] + \
                [(f"server {i}", hosts[i % len(hosts)], server_cmd) for i in range(args.servers)] + \
                [(f"worker {i}", hosts[i % len(hosts)], cmd) for i in range(args.workers)]
        for what, host, c in lines:
            role = what.split()[0]
            env = cluster_env(role, root, port, args.workers, args.servers, host)
            print(f"# {what} on {host}\n" + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(c))
        return 0
    port = args.port or free_port()
    procs = []

    def start(role: str, c: list) -> subprocess.Popen:
        env = dict(os.environ, **cluster_env(role, "127.0.0.1", port, args.workers, args.servers, "127.0.0.1"))
        procs.append(subprocess.Popen(c, env=env, start_new_session=True))
        return procs[-1]

    def stop_all() -> None:
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

    try:
        start("scheduler", server_cmd)
        for _ in range(args.servers):
            start("server", server_cmd)
        workers = [start("worker", cmd) for _ in range(args.workers)]
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            codes = [w.poll() for w in workers]
            if any(c not in (None, 0) for c in codes):
                print(f"error: a worker failed (exit codes {codes}); stopping the cluster", file=sys.stderr)
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        print(f"error: timeout after {args.timeout:.0f} s; stopping the cluster", file=sys.stderr)
        return 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
