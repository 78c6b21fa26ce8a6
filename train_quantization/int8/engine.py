"""Two numpy engines over an ``Int8Model`` (no MXNet at inference time).

``simulate`` — float-simulated integer inference, as the original experiment did it::

    x_q = clip(round(x / s_a), qmin, qmax)            (half to even, see below)
    acc = conv(x_q, w_q) + b_q                          (exact integers, see below)
    y   = acc * (s_w * s_a)                             dequantized (float64), then ReLU / pool in float

The network's input is quantized in float32, as the training graph does; the dequantized values between
layers in float64, so a code is the exact ``round(acc * s_w * s_a / s_a')`` but for values within 2**-52 (of
their size) of a half-code boundary. The integer engine's multipliers carry 31 bits, so the two engines part
only on a value within about 2**-31 of such a boundary (``precision="float32"``, the fake-quant graph's
division: 2**-24).

    add: y = (clip(round(a / s)) + clip(round(b / s))) * s   both branches on the add's scale
         y = a + clip(round(b / s)) * s                       the onednn scheme: shortcut only

``run_integer`` — integer-only inference (Jacob et al. 2018): the input is quantized once,
then integers flow between layers; int32 accumulators (exact, cast to int64), int32 biases,
requantization of each layer's input by the fixed-point multiplier ``m0 * 2**(shift - 31)``
with half-to-even rounding, ReLU as a clamp at 0, max pooling on integers, a residual add as
the sum of both branches' codes on its grid, global average pooling as a sum (the division
goes into the next multiplier), and logits dequantized at the end only.

The accumulators are exact integers whatever the ``kernel``: ``int8`` multiplies the int8 codes in a
compiled int8 GEMM (``igemm``: int32 sums, exact); ``float32`` runs float32 BLAS on chunks of the reduction
short enough that every partial sum stays below 2**24 (``exact_chunks``, ``exact_gemm``): a partial sum is at
most ``max|code| * sum|w|`` over the chunk's weights of one output channel, so the chunks are set once per
layer from its weight codes and input grid (a 3x3 conv over 512 channels, 4,608 terms, needs five chunks
with all-maximal weights, three with uniform random ones, fewer as the weights concentrate near zero);
``reference`` runs float64 BLAS (exact below 2**53). ``fast`` (the default) is ``int8`` when the library
loads, else ``float32``. The fast kernels lay activations out channels-last for the im2col and keep weights
prepared once per array. Every kernel gives the same codes; the tests compare them code for code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..quant import shuffle_permutation
from . import igemm
from .model import (
    Add,
    Affine,
    AvgPool,
    Concat,
    Conv,
    Dense,
    DenseFloat,
    Flatten,
    InGrid,
    Int8Model,
    MaxPool,
    Shuffle,
    Slice,
    quantize_multiplier,
    requantize,
    rounding_shift,
)

# ----------------------------------------------------------------------------- kernels
KERNELS = ("int8", "float32", "reference")  # "fast": the fastest that runs here (``resolve``)
F32_EXACT = 2**24  # float32 holds every integer up to 2**24
try:  # scipy's OpenBLAS runs the tall, narrow GEMMs of convolutions faster than numpy's; optional
    from scipy.linalg.blas import sgemm as _sgemm
except ImportError:  # pragma: no cover - numpy's matmul gives the same (exact) integers
    _sgemm = None


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32: scipy's sgemm on contiguous operands (as the transposed product
    ``b.T @ a.T`` in Fortran order, no copies), else numpy."""
    if _sgemm is None or not (a.flags.c_contiguous and b.flags.c_contiguous) or min(a.shape + b.shape) == 0:
        return a @ b
    return _sgemm(1.0, b.T, a.T).T


def exact_chunks(b: np.ndarray, amax: float) -> list:
    """Split points of the reduction of ``a @ b`` for integer-valued ``|a| <= amax``, so that every partial
    sum a float32 GEMM can form is an integer float32 holds: within a chunk, each column's
    ``amax * sum |b|`` stays within 2**24, and any partial sum (any order, any FMA) is at most that.
    Weights are far from all-maximal, so the chunks are longer than the bound ``amax * max|b| * k`` allows.

    >>> exact_chunks(np.full((4608, 2), 127.0), 128)  # all-maximal weights: 1,032 terms a chunk
    [0, 1032, 2064, 3096, 4128, 4608]
    >>> exact_chunks(np.full((4608, 2), 20.0), 128)
    [0, 4608]
    """
    cum = np.zeros((b.shape[0] + 1, b.shape[1]), np.float64)
    np.cumsum(np.abs(b), axis=0, dtype=np.float64, out=cum[1:])
    limit = F32_EXACT / max(float(amax), 1.0)
    out = [0]
    while out[-1] < b.shape[0]:
        s = out[-1]
        reach = (cum[s + 1:] - cum[s]).max(axis=1)  # non-decreasing in the chunk's end
        out.append(s + max(1, int(np.searchsorted(reach, limit, side="right"))))
    return out


def exact_gemm(a: np.ndarray, b: np.ndarray, chunks: Optional[list] = None,
               bias: Optional[np.ndarray] = None) -> np.ndarray:
    """``a @ b (+ bias)`` of integer-valued float32 matrices, exactly, in float32 BLAS: the reduction runs in
    ``chunks`` (``exact_chunks``; by default from ``max|a|``), whose results are added in float64 (exact
    below 2**53).

    >>> a = np.full((1, 4608), 127, np.float32); b = np.full((4608, 1), 127, np.float32); b[0] = 126
    >>> int(exact_gemm(a, b)[0, 0]) == 127 * 127 * 4607 + 127 * 126
    True
    """
    if chunks is None:
        chunks = exact_chunks(b, float(np.abs(a).max(initial=0)))
    out = None
    for i, j in zip(chunks[:-1], chunks[1:]):
        part = _matmul(a[:, i:j], b[i:j])
        if out is None:  # the first chunk becomes the float64 result (with the bias) in one pass
            out = part.astype(np.float64) if bias is None else np.add(part, bias, dtype=np.float64)
        else:
            out += part
    return out


def resolve(kernel: str) -> str:
    """``fast`` -> ``int8`` when the compiled int8 kernels load with SIMD (AVX2 or AVX-512 VNNI; their scalar
    build is a portable fallback, slower than BLAS), else ``float32``; other names are checked."""
    if kernel == "fast":
        return "int8" if igemm.isa() in ("avx2", "avx512_vnni") else "float32"
    if kernel not in KERNELS:
        raise ValueError(f"unknown GEMM kernel {kernel!r}; use fast or one of {', '.join(KERNELS)}")
    return kernel


@dataclass
class _Gemm:
    """A quantized layer's weight codes prepared for ``exact_gemm``: the float32 (K, O) operand and its
    chunks for inputs within ``amax``."""

    w: np.ndarray
    chunks: list
    amax: float


_PREPARED: dict = {}  # (id(weight codes), kind) -> (codes, prepared); weights are prepared once per array
PREPARED_MAX_BYTES = 2**28  # the cache starts over beyond this (a full-width VGG16 takes 60 MB)


def _as_kn(w: np.ndarray, channels: int, dtype: type) -> np.ndarray:
    """Weight codes (O, C, kh, kw) or (O, K) as the (K, O) operand of the im2col GEMM, K laid out (kh, kw, C)
    with C zero-padded to ``channels``."""
    if w.ndim == 2:
        return np.ascontiguousarray(np.asarray(w, dtype).T)
    full = np.zeros((w.shape[0], channels) + w.shape[2:], dtype)
    full[:, :w.shape[1]] = w
    return np.ascontiguousarray(full.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


def _cached(w: np.ndarray, kind: str, make, valid=lambda p: True):  # noqa: ANN001, ANN202
    """``make()``, cached by the identity of ``w`` (replace an op's ``w`` rather than writing into it)."""
    hit = _PREPARED.get((id(w), kind))
    if hit is not None and hit[0] is w and valid(hit[1]):
        return hit[1]
    prepared = make()
    size = {_Gemm: lambda p: p.w.nbytes, igemm.Packed: lambda p: p.panels.nbytes, np.ndarray: lambda p: p.nbytes}.get(
        type(prepared), lambda p: 0)(prepared)
    if sum(e[2] for e in _PREPARED.values()) + size > PREPARED_MAX_BYTES:
        _PREPARED.clear()
    _PREPARED[(id(w), kind)] = (w, prepared, size)
    return prepared


def _prepared(w: np.ndarray, amax: float) -> _Gemm:
    """The ``_Gemm`` of int weight codes ``w`` (O, ...) for inputs within ``amax``."""
    def make() -> _Gemm:
        wm = _as_kn(w, w.shape[1], np.float32)
        return _Gemm(wm, exact_chunks(wm, amax), float(amax))

    return _cached(w, "float32", make, lambda g: g.amax >= amax)


def _packed_for_isa(w: np.ndarray, channels: int) -> Optional[igemm.Packed]:
    """Weight codes packed for the int8 GEMM (``_as_kn`` layout, cached), or None beyond int8 (oneDNN's AVX2
    kernel model can round a halved weight up to 128) or where this CPU's kernel is not exact (``igemm.supports``)."""
    g = _cached(w, "int8", lambda: igemm.pack(_as_kn(w, channels, np.int8))
                if -128 <= w.min(initial=0) and w.max(initial=0) <= 127 else None)
    return g if g is not None and igemm.supports(g) else None


def _int8_input(bounds: tuple, any_isa: bool = False) -> Optional[type]:
    """The dtype the compiled kernels read codes within ``bounds`` in: int8, or uint8 up to 255 (the GEMM with
    VNNI only; ``any_isa``: the depthwise kernel), else None."""
    lo, hi = bounds
    if lo >= -128 and hi <= 127:
        return np.int8
    return np.uint8 if lo >= 0 and hi <= 255 and (any_isa or igemm.isa() == "avx512_vnni") else None


def _bounds(x: np.ndarray, bounds: Optional[tuple]) -> tuple:
    return bounds if bounds is not None else (float(x.min(initial=0)), float(x.max(initial=0)))


def conv2d_int(x: np.ndarray, w: np.ndarray, pad: int, stride: int = 1, groups: int = 1,
               kernel: str = "reference", bias: Optional[np.ndarray] = None, bounds: Optional[tuple] = None
               ) -> np.ndarray:
    """Exact integer convolution (plus ``bias``) of integer-valued arrays via im2col + GEMM (per group), for
    codes within ``bounds`` (lo, hi; default measured) and any ``kernel``: the same integers every way.

    ``x``: (N, C, H, W), ``w``: (O, C / groups, kh, kw) -> (N, O, H', W') float64 with integral values.
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    kernel = resolve(kernel)
    if kernel != "reference" and groups == 1:
        bounds = _bounds(x, bounds)
        dtype = _int8_input(bounds) if kernel == "int8" else None
        if dtype is not None:  # else (codes or weights beyond int8) float32 BLAS
            c4 = -(-c // 4) * 4  # K = kh * kw * c4, a multiple of four as the kernel reads it
            g = _packed_for_isa(w, c4)
            if g is not None:
                return _conv2d_fast(x, g, (kh, kw), pad, stride, bias, dtype, c4, bounds[0] < 0)
        return _conv2d_fast(x, _prepared(w, max(-bounds[0], bounds[1])), (kh, kw), pad, stride, bias)
    dtype = np.float32 if kernel != "reference" else np.float64
    xp = np.pad(np.asarray(x, dtype), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(
        xp, (n, ho, wo, groups, cg, kh, kw), (s[0], s[2] * stride, s[3] * stride, s[1] * cg, s[1], s[2], s[3]),
        writeable=False).reshape(n * ho * wo, groups, cg * kh * kw)
    wg = np.asarray(w, dtype).reshape(groups, o // groups, cg * kh * kw)
    if groups > 1:  # depthwise/grouped: per-group products (float64: exact for these short reductions)
        out = np.einsum("pgk,gok->pgo", cols.astype(np.float64), wg.astype(np.float64))
    else:
        out = exact_gemm(cols[:, 0], wg[0].T) if kernel == "float32" else cols[:, 0] @ wg[0].T
    out = out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)
    return out if bias is None else out + np.reshape(bias, (1, -1, 1, 1))


def _conv2d_fast(x: np.ndarray, g: _Gemm | igemm.Packed, k: tuple, pad: int, stride: int,
                 bias: Optional[np.ndarray], dtype: type = np.float32, channels: int = 0,
                 signed: bool = True) -> np.ndarray:
    """``conv2d_int``'s fast paths: im2col on channels-last data (``channels`` wide, zero-padded), so each
    gathered run is contiguous (on NCHW the gather reads one value per stride and costs as much as the
    GEMM), then ``exact_gemm`` (float32 ``g``) or the int8 GEMM (``igemm.Packed`` ``g``, codes cast to
    ``dtype``). The result is a channels-first view, as ``conv2d_int`` returns."""
    n, c, h, wd = x.shape
    (kh, kw), o, c4 = k, g.w.shape[1] if isinstance(g, _Gemm) else g.n, max(channels, c)
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    if kh == kw == 1 and pad == 0 and c4 == c:
        cols = np.ascontiguousarray(x[:, :, ::stride, ::stride].transpose(0, 2, 3, 1), dtype)
    else:
        xp = np.zeros((n, h + 2 * pad, wd + 2 * pad, c4), dtype)
        xp[:, pad:pad + h, pad:pad + wd, :c] = x.transpose(0, 2, 3, 1)
        s = xp.strides
        cols = np.lib.stride_tricks.as_strided(
            xp, (n, ho, wo, kh, kw, c4), (s[0], s[1] * stride, s[2] * stride, s[1], s[2], s[3]), writeable=False)
    cols = cols.reshape(n * ho * wo, kh * kw * c4)
    return _gemm(cols, g, bias, signed).reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def _gemm(a: np.ndarray, g: _Gemm | igemm.Packed, bias: Optional[np.ndarray], signed: bool) -> np.ndarray:
    """The exact float64 ``a @ w (+ bias)`` of a prepared weight: float32 chunks or the int8 GEMM."""
    if isinstance(g, _Gemm):
        return exact_gemm(a, g.w, g.chunks, bias)
    acc = igemm.gemm(a, g, signed)
    return acc.astype(np.float64) if bias is None else np.add(acc, bias, dtype=np.float64)


def dense_int(x: np.ndarray, w: np.ndarray, kernel: str = "reference", bias: Optional[np.ndarray] = None,
              bounds: Optional[tuple] = None) -> np.ndarray:
    """Exact integer matrix product ``x @ w.T (+ bias)`` for codes within ``bounds`` (default measured), with
    any ``kernel``."""
    kernel = resolve(kernel)
    if kernel == "reference":
        out = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        return out if bias is None else out + bias
    bounds = _bounds(x, bounds)
    p = _packed_for_isa(w, w.shape[1]) if kernel == "int8" and _int8_input(bounds) else None
    if p is None:
        g = _prepared(w, max(-bounds[0], bounds[1]))
        return exact_gemm(np.asarray(x, np.float32), g.w, g.chunks, bias)
    return _gemm(igemm.pad_k(np.asarray(x, _int8_input(bounds)), p.k4), p, bias, bounds[0] < 0)


def maxpool(x: np.ndarray, size: int, stride: int, ceil: bool) -> np.ndarray:
    n, c, h, w = x.shape
    ho = -(-(h - size) // stride) + 1 if ceil else (h - size) // stride + 1
    wo = -(-(w - size) // stride) + 1 if ceil else (w - size) // stride + 1
    ph, pw = max(0, (ho - 1) * stride + size - h), max(0, (wo - 1) * stride + size - w)
    if ph or pw:
        fill = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), constant_values=fill)
    # the maximum over the window's size * size strided slices: elementwise passes over the output's size (a
    # reduction over a 6-d strided window view runs several times slower); max is exact in any order
    out = None
    for i in range(size):
        for j in range(size):
            tap = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out = tap.copy(order="K") if out is None else np.maximum(out, tap, out=out)  # K: keep the layout
    return out


def _accumulate(op: Conv | Dense, codes: np.ndarray, kernel: str, bounds: Optional[tuple]) -> np.ndarray:
    """The layer's exact accumulators plus its int32 bias, float64; ``bounds`` (lo, hi) bound the codes (None:
    measured)."""
    if isinstance(op, Conv):
        acc = conv2d_int(codes, op.w, op.pad, op.stride, op.groups, kernel, op.b, bounds)
    else:
        acc = dense_int(codes, op.w, kernel, op.b, bounds)
    if op.s16_pairs:
        _saturate_pairs(op, codes, acc)
    return acc


S16_MAX = 32767


def _saturate_pairs(op: Conv | Dense, codes: np.ndarray, acc: np.ndarray) -> None:
    """Add to ``acc`` (in place) what int16 saturation takes from each pair sum
    ``p = x[2k] w[2k] + x[2k+1] w[2k+1]`` (input channels 2k and 2k+1 at one kernel tap):
    ``clip(p, -32768, 32767) - p``. Only the pairs whose weights can reach the bound are computed."""
    if isinstance(op, Conv) and op.groups != 1:
        return  # depthwise and grouped kernels widen to int16 before multiplying: no pair sums
    w = op.w.astype(np.int64)
    pad, stride = (op.pad, op.stride) if isinstance(op, Conv) else (0, 1)
    if w.ndim == 2:  # a fully connected layer: a 1x1 convolution of a 1x1 input
        w, codes, acc = w[:, :, None, None], codes[:, :, None, None], acc[:, :, None, None]
    c = w.shape[1]
    xmax = float(np.abs(codes).max(initial=0))
    risky = (np.abs(w[:, 0:c - 1:2]) + np.abs(w[:, 1:c:2])) * xmax > S16_MAX  # (O, C // 2, kh, kw)
    if not risky.any():
        return
    xp = np.pad(codes.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = acc.shape[2:]
    for k, i, j in zip(*np.nonzero(risky.any(axis=0))):
        outs = np.nonzero(risky[:, k, i, j])[0]
        xa, xb = (xp[:, 2 * k + d, None, i:i + stride * ho:stride, j:j + stride * wo:stride] for d in (0, 1))
        p = xa * w[outs, 2 * k, i, j, None, None] + xb * w[outs, 2 * k + 1, i, j, None, None]
        acc[:, outs] += np.clip(p, -S16_MAX - 1, S16_MAX) - p


def input_codes(grid: InGrid, x: np.ndarray) -> np.ndarray:
    """``clip(round(x / s_a), qmin, qmax)`` in the input's precision: float64 for float64 ``x`` (the
    simulation's dequantized values), else float32 (the network's input: bit-identical to the training
    graph).

    >>> g = InGrid(scale=float(np.float32(0.1)), qmin=-8, qmax=7)  # an exported scale: a float32 number
    >>> x = 6.5 * g.scale  # exactly half-way between codes 6 and 7
    >>> input_codes(g, np.array([x, -x, 0.04, 9.0])).tolist()  # half to even; clipped at qmax
    [6.0, -6.0, 0.0, 7.0]
    >>> input_codes(g, np.array([x, -x], np.float32)).tolist()  # float32(x) lies above the tie
    [7.0, -7.0]
    """
    dtype = np.float64 if np.asarray(x).dtype == np.float64 else np.float32
    q = np.divide(x, dtype(grid.scale), dtype=dtype)  # the scale is a float32 number: exact in both
    np.rint(q, out=q)
    return np.clip(q, grid.qmin, grid.qmax, out=q)


def normalize(model: Int8Model, images_nhwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 NCHW, ``(x / 255 - mean) / std`` (as the training pipeline)."""
    x = images_nhwc_uint8.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(model.input_mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(model.input_std, np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- engines
# A value is ``(array, scale)``: ``scale`` None for float data, else the float64 scale (broadcastable,
# per channel after a conv) of an integer array (int64 accumulators or summed codes; integer engine only).
def _flatten(v: tuple) -> tuple:
    """Flatten a value; a per-channel scale is repeated over each channel's positions."""
    arr, scale = v
    flat = arr.reshape(arr.shape[0], -1)
    if scale is None:
        return flat, None
    return flat, np.broadcast_to(scale, (1,) + arr.shape[1:]).reshape(1, -1)


def _dequantize(v: tuple) -> np.ndarray:
    arr, scale = v
    return np.asarray(arr, np.float64) if scale is None else arr * scale


def _float_input(r: "_Run", arr: np.ndarray) -> np.ndarray:
    """Float data as the simulation quantizes it: as is, or in float32 (``_Run.precision``)."""
    return arr if r.precision == "float64" else arr.astype(np.float32, copy=False)


def _quantize_float_into(r: "_Run", grid: InGrid, arr: np.ndarray, out: np.ndarray) -> None:
    """``input_codes`` of float data (at ``_Run.precision``) written by the compiled pass into the byte view
    ``out``."""
    igemm.quantize_into(_float_input(r, arr), grid.scale, grid.qmin, grid.qmax, out)


def _codes(grid: InGrid, v: tuple, r: "_Run") -> np.ndarray:
    """The input codes of a quantized op: float data is quantized (``input_codes``); integer data at
    scale ``s`` is requantized by the fixed-point multiplier of ``s / s_a`` (``model.requantize``). With the
    ``int8`` kernel both run compiled: the same codes (float data's as int16, which a sum of two holds)."""
    arr, scale = v
    if scale is None:
        dtype = _int8_input((grid.qmin, grid.qmax), any_isa=True)
        if resolve(r.kernel) == "int8" and arr.ndim == 4 and dtype is not None:
            out = np.empty(arr.shape, dtype)
            _quantize_float_into(r, grid, arr, out)
            return out.astype(np.int16)
        return input_codes(grid, _float_input(r, arr))
    m0, shift = quantize_multiplier(np.ravel(scale / np.float64(grid.scale)))
    if resolve(r.kernel) == "int8" and arr.ndim in (2, 4):
        last = np.moveaxis(arr, 1, -1)  # channels last: a view when the array came from a channels-last GEMM
        out = igemm.requantize(last.reshape(-1, arr.shape[1]), m0, shift, grid.qmin, grid.qmax)
        if out is not None:
            return np.moveaxis(out.reshape(last.shape), -1, 1)
    return requantize(arr, m0, shift, grid.qmin, grid.qmax)


@dataclass
class _Run:
    """One pass of an engine: ``integer`` (integer-only) or float-simulated; ``record`` receives each
    quantized layer's input codes, ``force`` (name -> codes) replaces them after recording, so two
    engines can be compared layer by layer on identical inputs."""

    integer: bool
    record: Optional[dict] = None
    force: Optional[dict] = None
    kernel: str = "fast"  # GEMMs: fast, int8, float32 or reference (``resolve``): the same integers
    precision: str = "float64"  # the simulation's values between layers: float64, or float32 (``simulate``)


def _quantized(r: _Run, op: Conv | Dense, ins: list) -> tuple:
    """A conv or dense layer (with its ReLU): input codes, exact accumulators plus bias, then the output at
    scale ``s_w * s_a`` (integers for the integer engine, dequantized for the simulation)."""
    v = _flatten(ins[0]) if isinstance(op, Dense) and ins[0][0].ndim > 2 else ins[0]
    fast = _quantized_int8(r, op, v) if resolve(r.kernel) == "int8" else None
    if fast is not None:
        return fast
    codes = _codes(op.act, v, r)
    bounds: Optional[tuple] = (op.act.qmin, op.act.qmax)  # the grid bounds the codes
    if r.record is not None:
        r.record[op.name] = codes.astype(np.int32)
    if r.force is not None and op.name in r.force:
        codes, bounds = r.force[op.name], None
    acc = _accumulate(op, codes, r.kernel, bounds)
    if r.integer:  # the accumulators are exact integers: the cast does not round
        acc, scale = acc.astype(np.int64), _out_scale(op)
    else:
        acc, scale = np.multiply(acc, _out_scale(op), out=acc), None
    return (np.maximum(acc, 0, out=acc) if op.relu else acc), scale


def _out_scale(op: Conv | Dense) -> np.ndarray:
    return (op.w_scale.astype(np.float64) * np.float64(op.act.scale)).reshape(
        (1, -1, 1, 1) if isinstance(op, Conv) else (1, -1))


def _quantized_int8(r: _Run, op: Conv | Dense, v: tuple) -> Optional[tuple]:
    """``_quantized`` on the compiled path, or None where it does not apply (grouped convolutions other than
    depthwise, oneDNN's int16 pairs, forced codes, codes or weights beyond int8): the input is quantized (or
    requantized) once into a zero-padded channels-last byte buffer, gathered (im2col) and multiplied in the
    int8 GEMM, or convolved per channel (depthwise), and the output formed in one pass (bias, scale, ReLU).
    The same numbers as the other kernels (the tests)."""
    arr, scale = v
    conv, c = isinstance(op, Conv), arr.shape[1]
    depthwise = conv and op.groups == c == op.w.shape[0] and op.w.shape[1] == 1
    dtype = _int8_input((op.act.qmin, op.act.qmax), any_isa=depthwise)
    if (conv and op.groups != 1 and not depthwise) or op.s16_pairs or dtype is None or \
            (r.force is not None and op.name in r.force):
        return None
    if depthwise:
        g = _cached(op.w, "depthwise", lambda: _depthwise_weights(op.w))
        width = c
    else:
        width = -(-c // 4) * 4 if conv else c  # K = kh * kw * width, a multiple of four as the GEMM reads it
        g = _packed_for_isa(op.w, width)
        width = width if conv or g is None else g.k4
    if g is None:
        return None
    n, (h, w) = arr.shape[0], (arr.shape[2:] if conv else (1, 1))
    pad, (kh, kw), stride = (op.pad, op.w.shape[2:], op.stride) if conv else (0, (1, 1), 1)
    buf = np.zeros((n, h + 2 * pad, w + 2 * pad, width), dtype)
    inner = buf[:, pad:pad + h, pad:pad + w, :c].transpose(0, 3, 1, 2)  # (N, C, H, W) view of the codes
    if scale is None:
        _quantize_float_into(r, op.act, arr if conv else arr.reshape(n, c, 1, 1), inner)
    else:
        inner[...] = _codes(op.act, v, r).reshape(inner.shape)
    if r.record is not None:
        r.record[op.name] = inner.astype(np.int32).reshape(arr.shape)
    if depthwise:
        acc = igemm.depthwise(buf, g, stride)
    else:
        acc = igemm.gemm(igemm.im2col(buf, kh, kw, stride), g, signed=op.act.qmin < 0)
    out = igemm.epilogue(acc, op.b, None if r.integer else _out_scale(op), op.relu)
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = out.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2) if conv else out
    return out, (_out_scale(op) if r.integer else None)


def _depthwise_weights(w: np.ndarray) -> Optional[np.ndarray]:
    """Depthwise weight codes (C, 1, kh, kw) as int8 (kh, kw, C), or None beyond int8."""
    if w.min(initial=0) < -128 or w.max(initial=0) > 127:
        return None
    return np.ascontiguousarray(np.asarray(w[:, 0], np.int8).transpose(1, 2, 0))


ADD_FRAC_BITS = 20  # sums stay below 2**28, so the next requantization (times m0 < 2**31) fits int64


def _add(r: _Run, op: Add, ins: list) -> tuple:
    """Both branches on the add's grid, codes summed (``layers.QAdd``); ``shortcut_only`` (the onednn
    scheme): ``a + codes * s``. There the integer engine requantizes the body's accumulators onto the
    shortcut's grid refined by ``2**ADD_FRAC_BITS`` (one rounding there, and a second at the next layer,
    which differs from the simulation's single rounding only for values within ``2**-21`` codes of a
    rounding boundary), then adds the codes."""
    s = np.float64(op.act.scale)
    if not op.shortcut_only:
        codes = [_codes(op.act, v, r) for v in ins]
        total = codes[0] + codes[1]
        return (total.astype(np.int64), np.reshape(s, (1, 1, 1, 1))) if r.integer else (total * s, None)
    codes = _codes(op.act, ins[1], r)
    if not r.integer:
        return _dequantize(ins[0]) + codes * s, None
    acc, scale = ins[0]
    fine = s / 2.0**ADD_FRAC_BITS
    m0, shift = quantize_multiplier(np.ravel(scale / fine))
    wide = requantize(acc, m0, shift, -2**62, 2**62)
    return wide + codes.astype(np.int64) * 2**ADD_FRAC_BITS, np.reshape(fine, (1, 1, 1, 1))


def _avgpool(r: _Run, op: AvgPool, ins: list) -> tuple:
    """Global average pooling; integer: the sum of the codes at scale ``s / (H * W)``. With ``act`` (the
    onednn scheme, ``layers.QAvgPool``) it pools its input's codes."""
    arr, scale = ins[0]
    if op.act is not None:
        arr = _codes(op.act, ins[0], r)
        scale = np.reshape(np.float64(op.act.scale), (1, 1, 1, 1))
        arr, scale = (arr.astype(np.int64), scale) if r.integer else (arr * scale, None)
    hw = arr.shape[2] * arr.shape[3]
    if scale is None:
        return arr.mean(axis=(2, 3), keepdims=True), None
    total = arr.sum(axis=(2, 3), keepdims=True)
    e = max(0, int(np.abs(total).max(initial=0)).bit_length() - 30)  # keep sums of wide values below 2**30
    return (rounding_shift(total, np.int64(e)), scale * 2.0**e / hw) if e else (total, scale / hw)


def _maxpool(r: _Run, op: MaxPool, ins: list) -> tuple:
    arr, scale = ins[0]  # on codes too: requantization is monotone per channel
    return maxpool(arr, op.size, op.stride, op.ceil), scale


def _dense_float(r: _Run, op: DenseFloat, ins: list) -> tuple:
    v = ins[0] if ins[0][0].ndim == 2 else _flatten(ins[0])
    return _dequantize(v) @ op.w.astype(np.float64).T + op.b, None


def _affine(r: _Run, op: Affine, ins: list) -> tuple:
    """``x * scale + shift`` per channel. Integer engine, on integers ``q`` at scale ``s``: the output lives on
    the grid ``t = |scale| * s / 2**f`` per channel, ``y = round(sign(scale) * q * 2**f + shift / t)``, one
    rounding of half a step of ``t`` (``2**-(f+1)`` of the input's step), with ``f <= 20`` chosen so that
    ``|y| < 2**30`` (the next requantization fits int64)."""
    arr, s = ins[0]
    shape = (1, -1, 1, 1) if arr.ndim == 4 else (1, -1)
    a, b = op.scale.reshape(shape), op.shift.reshape(shape)
    if s is None:
        return np.asarray(arr, np.float64) * a + b, None
    unit = np.where(a != 0, np.abs(a), 1.0) * s  # the input's step, in output units
    top = float(np.abs(arr).max(initial=0)) + float(np.max(np.abs(b) / unit))
    f = min(20, 30 - int(np.ceil(np.log2(top + 1))))
    t = unit / 2.0**f
    return np.rint(np.sign(a) * arr * 2.0**f + b / t).astype(np.int64), t


def _concat(r: _Run, op: Concat, ins: list) -> tuple:
    """Both inputs' codes on the concatenation's grid (``layers.QConcat``), side by side."""
    codes = np.concatenate([_codes(op.act, v, r) for v in ins], axis=1)
    s = np.float64(op.act.scale)
    return (codes.astype(np.int64), np.reshape(s, (1, 1, 1, 1))) if r.integer else (codes * s, None)


def _channels(v: tuple, index: Any) -> tuple:
    """The channels ``index`` of a value (a per-channel scale follows its channels)."""
    arr, scale = v
    if scale is not None and np.size(scale) > 1:
        scale = np.broadcast_to(scale, (1, arr.shape[1]) + (1,) * (arr.ndim - 2))[:, index]
    return arr[:, index], scale


RUN = {Conv: _quantized, Dense: _quantized, Add: _add, AvgPool: _avgpool, MaxPool: _maxpool, Affine: _affine,
       Concat: _concat, Slice: lambda r, op, ins: _channels(ins[0], slice(op.begin, op.end)),
       Shuffle: lambda r, op, ins: _channels(ins[0], shuffle_permutation(op.channels, op.groups)),
       Flatten: lambda r, op, ins: _flatten(ins[0]), DenseFloat: _dense_float}


def _run(model: Int8Model, x: np.ndarray, r: _Run) -> np.ndarray:
    """An engine over the op graph; values are freed after their last reader."""
    last = {j: readers[-1] for j, readers in model.readers().items()}
    vals = {-1: (np.asarray(x, np.float32), None)}
    for i, op in enumerate(model.layers):
        handler = RUN.get(type(op))
        if handler is None:
            raise ValueError(f"the numpy engines cannot run op type {op.type!r}")
        out = handler(r, op, [vals[j] for j in op.inputs])
        if getattr(op, "relu", False) and not isinstance(op, (Conv, Dense)):  # convs and dense apply their own
            out = (np.maximum(out[0], 0, out=out[0]), out[1])
        vals[i] = out
        for j in op.inputs:
            if last[j] == i and j != -1:
                del vals[j]
    return _dequantize(vals[len(model.layers) - 1])


def simulate(model: Int8Model, x: np.ndarray, record: Optional[dict] = None,
             force: Optional[dict] = None, kernel: str = "fast", precision: str = "float64") -> np.ndarray:
    """Float-simulated integer inference on normalized float NCHW input; returns logits. ``kernel``:
    ``fast`` (float32 GEMMs, exact by chunking) or ``reference`` (float64): the same numbers. ``precision``:
    the values between layers, ``float64`` (the exact codes but within 2**-52 of a rounding boundary) or
    ``float32`` (each requantization a float32 division, as in the fake-quant graph and ONNX Runtime's
    dequantized tensors)."""
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be float64 or float32, got {precision!r}")
    return _run(model, x, _Run(False, record, force, kernel, precision))


def run_integer(model: Int8Model, x: np.ndarray, record: Optional[dict] = None,
                force: Optional[dict] = None, kernel: str = "fast") -> np.ndarray:
    """Integer-only inference on normalized float NCHW input; returns float64 logits (``kernel`` as
    ``simulate``)."""
    return _run(model, x, _Run(True, record, force, kernel))


def predict(model: Int8Model, images: np.ndarray, engine: str = "sim", batch: int = 200,
            progress: bool = False, onnx_target: str = "auto", precision: str = "float64") -> np.ndarray:
    """Logits for uint8 NHWC images with the ``sim`` (at ``precision``, ``simulate``), ``integer`` or ``onnx``
    (ONNX Runtime, exported for ``onnx_target``) engine."""
    if engine == "onnx":
        from .onnx_export import build_qdq, runner, session

        ort_fn = runner(session(build_qdq(model, onnx_target)))

        def fn(_: Int8Model, x: np.ndarray) -> np.ndarray:
            return ort_fn(x)
    else:
        fn = {"sim": lambda m, x: simulate(m, x, precision=precision), "integer": run_integer}[engine]
    out = []
    rng = range(0, len(images), batch)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc=f"{engine} engine", leave=False)
    for i in rng:
        out.append(fn(model, normalize(model, images[i:i + batch])))
    return np.concatenate(out)
