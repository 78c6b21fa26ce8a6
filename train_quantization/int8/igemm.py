"""Exact int8 GEMMs for the numpy engines: ``csrc/tq_gemm.cc``, plain C loaded with ctypes (no MXNet).

``C = A @ B`` for int8 codes ``A`` (M x K, in ``[-128, 127]``, or ``[0, 255]`` with VNNI) and int8 weight
codes ``B`` (K x N, in ``[-127, 127]``), int32 ``C``. Every product and partial sum is an integer within
int32 (``K * 128 * 127 < 2**31`` for ``K < 132,000``), so the result is exact whatever the order: the
engines get the same accumulators as from float64 GEMMs, at int8 throughput (u8 x s8 dot products:
VPDPBUSD with AVX-512 VNNI, VPMADDUBSW with AVX2; see the source for why neither saturates).

The kernel follows the CPU and ``DNNL_MAX_CPU_ISA`` (``machine.int8_gemm_isa``), so a capped run measures
and tests an AVX2 CPU's kernel. The library is compiled with g++ on first use (cached as the fused
quantizers are); ``TQ_IGEMM=0`` or a failed build leaves ``available()`` False and the engines on float32
BLAS.

>>> import numpy as np
>>> if available():
...     a = np.array([[1, -2, 3], [-128, 127, 0]], np.int8)
...     b = np.array([[127, -127], [1, 2], [-3, 4]], np.int8)
...     assert gemm(pad_k(a, 4), pack(b), signed=True).tolist() == [[116, -119], [-16129, 16510]]
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import fused, machine

log = logging.getLogger(__name__)
SRC = Path(__file__).resolve().parents[1] / "csrc" / "tq_gemm.cc"
NR = 32  # columns of a packed panel (csrc/tq_gemm.cc)
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512_vnni": 2}
_STATE: dict = {}


def _lib() -> Optional[ctypes.CDLL]:
    if "lib" not in _STATE:
        lib = None
        if os.environ.get("TQ_IGEMM", "1") != "0":
            try:
                lib = ctypes.CDLL(str(fused.compile_library(SRC, fused.library_path(SRC))))
                lib.tq_requantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_int]
                lib.tq_quantize.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_int]
                lib.tq_epilogue.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_int]
                lib.tq_im2col.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int] * 3 + \
                    [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
                lib.tq_depthwise.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int] * 3 + \
                    [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
                lib.tq_gemm_s8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            except Exception as exc:  # noqa: BLE001 - any build/load failure means: float32 BLAS
                log.warning("int8 GEMM unavailable (%s); the numpy engines use float32 BLAS", str(exc)[:200])
                lib = None
        _STATE["lib"] = lib
    return _STATE["lib"]


def available() -> bool:
    """True when the compiled int8 GEMM is loaded (built on first use)."""
    return _lib() is not None


def isa() -> str:
    """The kernel ``gemm`` runs: ``machine.int8_gemm_isa()``, or ``none`` without the library."""
    return machine.int8_gemm_isa() if available() else "none"


@dataclass
class Packed:
    """Weight codes (K x N) in the kernel's layout: panels of ``NR`` columns, four consecutive k per column;
    ``corr = 128 * colsum`` undoes the +128 offset of signed inputs in the VNNI kernel."""

    panels: np.ndarray  # int8 (ldc / NR, k4 / 4, NR, 4)
    corr: np.ndarray  # int32 (ldc,)
    k4: int  # K rounded up to 4
    n: int
    ldc: int  # N rounded up to NR
    full_range: bool  # some code is -128: the AVX2 kernel's sign trick needs |b| <= 127


def supports(p: Packed, kernel: Optional[str] = None) -> bool:
    """Whether ``kernel`` (default ``isa()``) computes ``p`` exactly: the AVX2 kernel moves a's sign onto b,
    and -(-128) does not fit int8 (nor does a pair 2 * 128 * 128 fit int16), so it needs ``[-127, 127]``."""
    return not (p.full_range and (kernel or machine.int8_gemm_isa()) == "avx2")


def pack(b: np.ndarray) -> Packed:
    """Pack integer weight codes ``b`` (K x N, within ``[-128, 127]``; see ``supports`` for -128)."""
    k, n = b.shape
    lo, hi = int(b.min(initial=0)), int(b.max(initial=0))
    if lo < -128 or hi > 127:
        raise ValueError(f"int8 GEMM: weight codes must lie in [-128, 127], got [{lo}, {hi}]")
    k4, ldc = -(-k // 4) * 4, -(-n // NR) * NR
    full = np.zeros((k4, ldc), np.int8)
    full[:k, :n] = b
    panels = np.ascontiguousarray(full.reshape(k4 // 4, 4, ldc // NR, NR).transpose(2, 0, 3, 1))
    return Packed(panels, (128 * full.sum(axis=0, dtype=np.int32)).astype(np.int32), k4, n, ldc, lo < -127)


def pad_k(a: np.ndarray, k4: int) -> np.ndarray:
    """``a`` (M x K) with zero columns up to ``k4``, as a contiguous int8 array."""
    out = np.zeros((a.shape[0], k4), a.dtype if a.dtype in (np.int8, np.uint8) else np.int8)
    out[:, :a.shape[1]] = a
    return out


def gemm(a: np.ndarray, p: Packed, signed: bool, threads: int = 0, kernel: Optional[str] = None) -> np.ndarray:
    """``a @ b`` (int32, M x N; a view of an M x ``ldc`` array) for ``a`` (M x ``k4``, rows contiguous): int8
    codes (``signed``: some may be negative), or uint8 codes up to 255 (AVX-512 VNNI only). ``threads``: 0
    for OpenMP's default; ``kernel``: one of ``ISA_CODES`` the CPU has (default ``isa()``)."""
    lib, code = _lib(), ISA_CODES[kernel or machine.int8_gemm_isa()]
    if lib is None:
        raise RuntimeError("int8 GEMM unavailable; check available() first")
    if a.dtype == np.uint8 and (signed or code < 2):
        raise ValueError("int8 GEMM: uint8 codes need unsigned input and an AVX-512 VNNI kernel")
    if not supports(p, kernel):
        raise ValueError("int8 GEMM: weight code -128 needs the avx512_vnni or scalar kernel (AVX2 reads [-127, 127])")
    if a.dtype not in (np.int8, np.uint8) or a.ndim != 2 or a.shape[1] < p.k4 or a.strides[1] != 1:
        raise ValueError(f"int8 GEMM: need (M, >= {p.k4}) int8 rows, got {a.dtype} {a.shape}")
    c = np.empty((a.shape[0], p.ldc), np.int32)
    rc = lib.tq_gemm_s8(a.ctypes.data, a.shape[0], a.strides[0], p.k4, p.panels.ctypes.data, p.ldc, c.ctypes.data,
                        int(signed), p.corr.ctypes.data, code, threads)
    if rc != 0:
        raise RuntimeError(f"int8 GEMM rejected its arguments (kernel {kernel or isa()} on this CPU?)")
    return c[:, :p.n]


def requantize(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, qmin: int, qmax: int,
               threads: int = 0) -> Optional[np.ndarray]:
    """``model.requantize`` of integer accumulators ``acc`` (rows x channels; ``m0``, ``shift`` per channel or
    one) in one compiled pass: int64 codes, or None where the compiled pass does not apply (no library, a
    multiplier outside ``[2**-32, 1)``, an accumulator beyond int32) and the reference must run.

    >>> from .model import quantize_multiplier, requantize as reference
    >>> acc = np.array([[5, -6, 7], [-7, 2**31 - 1, -(2**31 - 1)]])
    >>> m0, sh = quantize_multiplier(np.array([0.25, 0.5, 0.75]))
    >>> out = requantize(acc, m0, sh, -128, 127)
    >>> out is None or (out.tolist() == reference(acc, m0, sh, -128, 127).tolist() == [[1, -3, 5], [-2, 127, -128]])
    True
    """
    lib = _lib()
    if lib is None or acc.ndim != 2:
        return None
    c = acc.shape[1]
    k = np.ascontiguousarray(np.broadcast_to(31 - np.asarray(shift, np.int64), (c,)))
    m = np.ascontiguousarray(np.broadcast_to(np.asarray(m0, np.int64), (c,)))
    a = np.ascontiguousarray(acc, np.int64)
    out = np.empty_like(a)
    rc = lib.tq_requantize(a.ctypes.data, a.shape[0], c, m.ctypes.data, k.ctypes.data, int(qmin), int(qmax),
                           out.ctypes.data, threads)
    return out if rc == 0 else None


def quantize_into(x: np.ndarray, scale: float, qmin: int, qmax: int, out: np.ndarray, threads: int = 0) -> None:
    """``engine.input_codes`` of float32/float64 ``x`` (N, C, H, W; any strides) written into the int8/uint8
    view ``out`` of the same shape (e.g. the interior of a channels-last, zero-padded GEMM input), in one pass:
    ``clip(rint(float32(x) / float32(scale)), qmin, qmax)``, the same codes as numpy's float32 arithmetic."""
    if x.dtype not in (np.float32, np.float64) or out.dtype not in (np.int8, np.uint8) or x.shape != out.shape:
        raise ValueError(f"quantize_into: need float input and a byte view of one shape, got {x.dtype} {out.dtype}")
    x4, o4 = (x, out) if x.ndim == 4 else (x[:, :, None, None], out[:, :, None, None])
    shape = np.array(x4.shape, np.int64)
    xs = np.array(x4.strides, np.int64) // x4.itemsize
    os_ = np.array(o4.strides, np.int64)
    _lib().tq_quantize(x4.ctypes.data, int(x.dtype == np.float64), shape.ctypes.data, xs.ctypes.data,
                       float(np.float32(scale)), int(qmin), int(qmax), o4.ctypes.data, os_.ctypes.data, threads)


def epilogue(acc: np.ndarray, bias: Optional[np.ndarray], scale: Optional[np.ndarray], relu: bool,
             threads: int = 0) -> np.ndarray:
    """A layer's output from ``gemm``'s accumulators ``acc`` (M x N, rows of ``ldc``): ``acc + bias`` as int64
    (``scale`` None: the integer engine), else ``float64(acc + bias) * scale`` per column (the simulation);
    ``relu``: then ``max(., 0)`` as numpy's ``maximum``."""
    m, n = acc.shape
    if acc.dtype != np.int32 or acc.strides[1] != 4:
        raise ValueError("epilogue: need gemm's int32 accumulators")
    b = np.zeros(n, np.int32) if bias is None else np.ascontiguousarray(np.broadcast_to(bias, (n,)), np.int32)
    s = None if scale is None else np.ascontiguousarray(np.broadcast_to(np.ravel(scale), (n,)), np.float64)
    out = np.empty((m, n), np.int64 if s is None else np.float64)
    _lib().tq_epilogue(acc.ctypes.data, m, n, acc.strides[0] // 4, b.ctypes.data,
                       None if s is None else s.ctypes.data, int(relu), out.ctypes.data if s is not None else None,
                       out.ctypes.data if s is None else None, threads)
    return out


def im2col(buf: np.ndarray, kh: int, kw: int, stride: int, threads: int = 0) -> np.ndarray:
    """The GEMM rows of a convolution over the padded channels-last byte buffer ``buf`` (N, Hp, Wp, C):
    (N * Ho * Wo, kh * kw * C), each row the window laid out (kh, kw, C)."""
    n, hp, wp, c = buf.shape
    if not buf.flags.c_contiguous or buf.dtype not in (np.int8, np.uint8):
        raise ValueError("im2col: need a contiguous byte buffer")
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    if kh == kw == stride == 1:
        return buf.reshape(n * hp * wp, c)
    cols = np.empty((n * ho * wo, kh * kw * c), buf.dtype)
    _lib().tq_im2col(buf.ctypes.data, n, hp, wp, c, kh, kw, stride, ho, wo, cols.ctypes.data, threads)
    return cols


def depthwise(buf: np.ndarray, w: np.ndarray, stride: int, threads: int = 0) -> np.ndarray:
    """A depthwise convolution (one filter per channel) over the padded channels-last byte buffer ``buf``
    (N, Hp, Wp, C) with int8 weight codes ``w`` (kh, kw, C): int32 (N * Ho * Wo, C), exact.

    >>> x = np.arange(2 * 4 * 4 * 3, dtype=np.int8).reshape(2, 4, 4, 3) - 40
    >>> w = np.arange(2 * 2 * 3, dtype=np.int8).reshape(2, 2, 3) - 6
    >>> ref = sum(x[:, a:a + 3:1, b:b + 3:1].astype(np.int32) * w[a, b] for a in range(2) for b in range(2))
    >>> not available() or np.array_equal(depthwise(x, w, 1), ref.reshape(-1, 3))
    True
    """
    n, hp, wp, c = buf.shape
    kh, kw, cw = w.shape
    if not buf.flags.c_contiguous or buf.dtype not in (np.int8, np.uint8) or cw != c or w.dtype != np.int8:
        raise ValueError("depthwise: need a contiguous byte buffer and int8 weights of its channels")
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    wc = np.ascontiguousarray(w)
    out = np.empty((n * ho * wo, c), np.int32)
    _lib().tq_depthwise(buf.ctypes.data, n, hp, wp, c, kh, kw, stride, ho, wo, wc.ctypes.data,
                        int(buf.dtype == np.uint8), out.ctypes.data, threads)
    return out
