"""The compiled operators (``csrc/tq_ops.cc``: the activation quantizer, the BN fold with the weight and bias
quantization, ReLU6 and the LSQ quantizer): build, load, or fall back.

``available()`` compiles the operator with g++ against the ``lib_api.h`` that ships with
MXNet (once per source/MXNet version, cached), loads it with ``mx.library.load`` and
returns True; on any failure it logs one warning and returns False, and the layers use the
stock-MXNet path, which computes bit-identical outputs. ``TQ_FUSED=0`` forces the fallback.
``python -m train_quantization.fused`` builds it ahead of time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
SRC = Path(__file__).resolve().parent / "csrc" / "tq_ops.cc"
OPS = ("tq_act_quant", "tq_weight_quant", "tq_relu6", "tq_lsq_quant")
_STATE: dict = {}


def _mx_dir() -> Path:
    import mxnet

    return Path(mxnet.__file__).resolve().parent


def library_path(src: Path = SRC, salt: str = "") -> Path:
    """Where the library of ``src`` lives: keyed by its source and ``salt`` (MXNet's version for an operator
    library), in ``csrc/build`` when writable, else the user's cache."""
    key = hashlib.sha1(src.read_bytes() + salt.encode()).hexdigest()[:12]
    name = f"lib{src.stem}-{key}.so"
    for base in (src.parent / "build", Path.home() / ".cache" / "train_quantization"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base / name
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def compile_library(src: Path, path: Path, extra: tuple = ()) -> Path:
    """``g++`` ``src`` (plus ``extra`` arguments) into the shared library ``path`` unless it is there; portable
    flags (no -march: the kernels pick their ISA at run time). Written to a temporary name, then renamed, so
    concurrent builds never load half a file."""
    if path.is_file():
        return path
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    cmd = ["g++", "-shared", "-fPIC", "-std=c++17", "-O3", "-ffp-contract=off", "-fopenmp", str(src), *extra,
           "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, path)
    return path


def build(path: Optional[Path] = None) -> Path:
    """Compile the operator library against MXNet's ``lib_api`` and return its path."""
    import mxnet

    mx_dir = _mx_dir()
    path = path or library_path(SRC, mxnet.__version__)
    return compile_library(SRC, path, (f"-I{mx_dir / 'include'}", str(mx_dir / "src" / "lib_api.cc")))


def available() -> bool:
    """True when the fused operator is loaded (built on first use); False means fall back."""
    if "ok" in _STATE:
        return _STATE["ok"]
    ok = False
    if os.environ.get("TQ_FUSED", "1") != "0":
        try:
            import mxnet as mx

            def loaded() -> bool:
                return all(hasattr(mx.nd, op) for op in OPS)

            if not loaded():
                mx.library.load(str(build()), verbose=False)
            ok = loaded()
        except Exception as exc:  # noqa: BLE001 - any build/load failure means: use the fallback
            log.warning("fused quantizer unavailable (%s); using the stock-MXNet path", str(exc)[:200])
    _STATE["ok"] = ok
    return ok


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"built {build()}" if available() else "fused operator unavailable", file=sys.stderr)
    sys.exit(0)
