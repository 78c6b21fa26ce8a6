"""train_quantization: quantization-aware training and int8 inference for MXNet Gluon CNNs.

Layers: ``quant`` (pure math) < ``layers`` (blocks) < ``models``/``convert`` < ``train``/``qat`` <
``int8`` (export, engines) < ``variants``/``report``. The public API (``api.py``) is importable from
here: ``tq.convert``, ``tq.calibrate``, ``tq.fit``, ``tq.train_float``, ``tq.train_qat``, ``tq.export``,
``tq.Int8Model`` (``save``/``load``/``simulate``/``run_integer``/``to_onnx``), ``tq.load_config``,
``tq.dataset``. Names load on first use, so the int8 engines stay usable with numpy alone.
"""
import os

from .machine import enable_amx, openblas_coretype

# MXNet sizes its OpenMP pool at import; without this it uses half the cores here.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
# OpenBLAS reads this when it loads (numpy's, scipy's and MXNet's copies): its releases that these wheels
# bundle do not recognize newer CPUs (Sapphire Rapids, Zen 4/5) and fall back to SSE3 kernels, which run the
# numpy engines' GEMMs 3-4x slower. Set before numpy loads; a value already set wins.
if openblas_coretype():
    os.environ.setdefault("OPENBLAS_CORETYPE", openblas_coretype())
# oneDNN's AMX int8 convolutions where the CPU has them (machine.enable_amx); after the two
# settings above, which must precede MXNet's import, and before any MXNet operator runs.
enable_amx()

__version__ = "0.1.0"

_API = {
    "convert": ("conversion", "convert"), "copy_to_float": ("conversion", "copy_to_float"),
    "calibrate": ("api", "calibrate"), "fit": ("api", "fit"), "export": ("api", "export"),
    "dataset": ("api", "dataset"), "train_float": ("train", "train_float"), "train_qat": ("qat", "train_qat"),
    "build_model": ("models", "build_model"), "load_config": ("config", "load_config"),
    "Config": ("config", "Config"), "QuantConfig": ("config", "QuantConfig"), "QuantSpec": ("config", "QuantSpec"),
    "Int8Model": ("int8.model", "Int8Model"), "load_int8": ("int8.model", "load"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'train_quantization' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
