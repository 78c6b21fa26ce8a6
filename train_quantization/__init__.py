"""train_quantization: quantization-aware training and int8 inference for MXNet Gluon CNNs.

Layers: ``quant`` (pure math) < ``layers`` (blocks) < ``models`` < ``train`` < ``int8``.
"""
import os

# MXNet sizes its OpenMP pool at import; without this it uses half the cores here.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

__version__ = "0.1.0"
