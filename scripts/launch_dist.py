#!/usr/bin/env python
"""Start an MXNet parameter-server cluster (ps-lite) and run a training command on every worker.

  python scripts/launch_dist.py -n 2 -s 1 -- python scripts/train_qat.py ... --kvstore dist_sync

Local mode (default): every process on this machine, bound to 127.0.0.1, and every one ends when
the launcher ends. ``--hosts FILE`` (one host name per line): prints the environment and command of
the scheduler (on this machine), each server and each worker (hosts round-robin); nothing starts.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_quantization import dist  # noqa: E402


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
    if args.hosts:
        hosts = [h.strip() for h in open(args.hosts) if h.strip() and not h.startswith("#")]
        if not hosts:
            print(f"error: {args.hosts} lists no hosts", file=sys.stderr)
            return 2
        print("\n".join(dist.host_commands(cmd, hosts, args.workers, args.servers, args.port or 9091)))
        return 0
    return dist.run_local(cmd, args.workers, args.servers, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
