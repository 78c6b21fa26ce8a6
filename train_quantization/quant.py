"""Pure quantization math, with the quantizer's parameters as arguments.

Every function here is stateless. The ``F`` functions take MXNet's ``F`` (``mx.nd`` or
``mx.sym``) so they run imperatively and inside hybridized graphs; the ``*_np`` twins are
float64/float32 numpy references used by the int8 engines and the tests.

Rounding convention (one for the whole project): **round half to even**, as ``np.rint``,
oneDNN and ONNX Runtime do. In graphs it is computed as ``(u + 1.5 * 2**23) - 1.5 * 2**23``
in float32, which is exact for ``|u| <= 2**22`` (we clip first, so ``|u| <= 128``) and
already has an identity gradient. ``rounding="half_away"`` (MXNet's ``round``, what the
original experiment used) is kept as an option for comparison.

Symbols: ``s`` scale, ``qmin``/``qmax`` integer range, ``u = x / s``.

* fake quantization: ``fq(x) = clip(round(x / s), qmin, qmax) * s``
* bias: ``fq_b(b) = round(b / (s_w * s_a)) * (s_w * s_a)`` (the int32 bias of the engines)
* weight scale: ``s_w = max|w_f| / qmax`` (per tensor or per output channel); an all-zero
  tensor or channel gets ``s_w = 1`` (every code is 0 anyway, and nothing divides by 0)
* activation scale: ``s_a = moving_max / 2**(bits-1)``
* scheme ``onednn`` (``act_grid``, ``weight_grid``): MXNet/oneDNN's int8 arithmetic instead
* EMA: ``moving_max <- m * moving_max + (1 - m) * max|x|``; the first batch sets it
* BN fold: ``w_f = w * gamma / sqrt(var + eps)``, ``b_f = beta + (b - mean) * gamma / sqrt(var + eps)``
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds float32 half to even
ROUNDINGS = ("half_even", "half_away")


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> Tuple[int, int]:
    """Integer range of a ``bits``-bit code.

    >>> qrange(8, signed=True, narrow=True)
    (-127, 127)
    >>> qrange(8, signed=True)
    (-128, 127)
    >>> qrange(4, signed=True, narrow=True)
    (-7, 7)
    >>> qrange(8, signed=False)
    (0, 255)
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return int(narrow), 2**bits - 1


SCHEMES = ("original", "onednn")


def act_grid(bits: int, scheme: str = "original", signed: bool = True,
             unsigned_grid: bool = False) -> Tuple[int, int, float]:
    """``(qmin, qmax, divisor)`` of an activation: ``s_a = moving_max / divisor``.

    ``original`` (Jacob et al.): signed codes, divisor ``2**(bits-1)`` whatever the sign of the data.
    ``onednn`` (MXNet 1.9.1's int8 kernels, 8 bits only): a signed tensor is int8 at
    ``127.5 / T``, a ReLU output (``signed=False``) uint8 at ``255.5 / T``, saturating.
    ``unsigned_grid`` (learned ranges): a ReLU output uses all ``2**bits`` codes, ``[0, 2**bits - 1]``
    with ``s_a = range / (2**bits - 1)``: one more bit of resolution, which matters at 2-4 bits.

    >>> act_grid(8)
    (-128, 127, 128.0)
    >>> act_grid(4)
    (-8, 7, 8.0)
    >>> act_grid(8, "onednn", signed=True), act_grid(8, "onednn", signed=False)
    ((-128, 127, 127.5), (0, 255, 255.5))
    >>> act_grid(4, signed=False, unsigned_grid=True), act_grid(4, signed=True, unsigned_grid=True)
    ((0, 15, 15.0), (-8, 7, 8.0))
    """
    if scheme == "onednn":
        return (-128, 127, 127.5) if signed else (0, 255, 255.5)
    if unsigned_grid and not signed:
        return 0, 2**bits - 1, float(2**bits - 1)
    qmin, qmax = qrange(bits, signed=True)
    return qmin, qmax, act_divisor(bits)


def weight_grid(bits: int, scheme: str = "original") -> Tuple[int, int, float]:
    """``(qmin, qmax, divisor)`` of a weight tensor or channel: ``s_w = max|w_f| / divisor``.

    ``original``: narrow symmetric, divisor ``qmax``. ``onednn``: divisor 127.5 and int8
    saturation, so ``+max`` lands on 127 (127.5 rounds to 128, saturates) and ``-max`` on -128
    or -127, as the float32 product ``-max * (127.5 / max)`` falls (``weight_scales``).

    >>> weight_grid(8), weight_grid(4), weight_grid(8, "onednn")
    ((-127, 127, 127.0), (-7, 7, 7.0), (-128, 127, 127.5))
    """
    if scheme == "onednn":
        return -128, 127, 127.5
    qmin, qmax = qrange(bits, signed=True, narrow=True)
    return qmin, qmax, float(qmax)


def act_divisor(bits: int) -> float:
    """Activation scale divisor: ``s_a = moving_max / act_divisor(bits)``.

    >>> act_divisor(8)
    128.0
    """
    return float(2 ** (bits - 1))


# ----------------------------------------------------------------------------- numpy
def round_np(x: np.ndarray, rounding: str = "half_even") -> np.ndarray:
    """Round with the project convention (``half_even``) or MXNet's ``half_away``.

    >>> round_np(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])).tolist()
    [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]
    >>> round_np(np.array([-2.5, -0.5, 0.5, 2.5]), "half_away").tolist()
    [-3.0, -1.0, 1.0, 3.0]
    """
    if rounding == "half_even":
        return np.rint(x)
    if rounding == "half_away":
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def quantize_np(x: np.ndarray, scale: Any, qmin: int, qmax: int, rounding: str = "half_even") -> np.ndarray:
    """Integer codes ``clip(round(x / s), qmin, qmax)`` (float dtype of ``x``, integral values)."""
    return np.clip(round_np(x / scale, rounding), qmin, qmax)


def fake_quant_np(x: np.ndarray, scale: Any, qmin: int, qmax: int, rounding: str = "half_even") -> np.ndarray:
    """``clip(round(x / s), qmin, qmax) * s`` in the dtype of ``x``.

    >>> fake_quant_np(np.array([0.26, -1.0, 9.0], np.float32), np.float32(0.5), -4, 3).tolist()
    [0.5, -1.0, 1.5]
    """
    return (quantize_np(x, scale, qmin, qmax, rounding) * scale).astype(x.dtype)


def safe_scale_np(max_abs: np.ndarray, divisor: float) -> np.ndarray:
    """``max_abs / divisor``, with 1 where ``max_abs`` is 0 (all-zero tensor or channel)."""
    max_abs = np.asarray(max_abs)
    return np.where(max_abs > 0, max_abs / max_abs.dtype.type(divisor), max_abs.dtype.type(1))


def weight_scale_np(w: np.ndarray, qmax: int, per_channel: bool = False) -> np.ndarray:
    """Symmetric weight scale ``max|w| / qmax``; shape (C, 1, ...) per channel, () per tensor."""
    if per_channel:
        m = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        m = np.abs(w).max()
    return safe_scale_np(m, qmax)


def lsq_init_step(x: np.ndarray, qmax: int, axis: Optional[int] = None) -> np.ndarray:
    """LSQ's initial step size (Esser et al. 2019): ``2 mean|x| / sqrt(Q_P)``, over all of ``x`` or per index
    of ``axis`` (a weight's output channels); 1 where ``x`` is all zeros.

    >>> float(lsq_init_step(np.array([1.0, -3.0, 0.0, 4.0]), 15).round(4))  # 2 * 2 / sqrt(15)
    1.0328
    >>> lsq_init_step(np.array([[1.0, -1.0], [0.0, 0.0]]), 7, axis=0).round(4)
    array([0.7559, 1.    ])
    """
    a = np.abs(np.asarray(x, np.float64))
    m = a.mean() if axis is None else a.reshape(a.shape[axis], -1).mean(axis=1)
    return np.where(m > 0, 2.0 * m / np.sqrt(qmax), 1.0)


def mse_threshold_np(x: np.ndarray, qmin: int, qmax: int, divisor: float, grid: int = 100) -> float:
    """Clipping threshold ``t`` in ``(0, max|x|]`` that minimizes the fake-quant error
    ``mean((fake_quant(x, t / divisor) - x)**2)``, searched on ``t = max|x| * k / grid``,
    k = 1..grid (post-training calibration; ``t = max|x|`` is plain max calibration).

    A long tail is clipped, a tight range is not:

    >>> x = np.concatenate([np.linspace(-1, 1, 100001), [40.0]]).astype(np.float32)
    >>> float(mse_threshold_np(x, -8, 7, 8)) < 5.0
    True
    >>> float(mse_threshold_np(np.array([-1.0, 1.0], np.float32), -127, 127, 127))
    1.0
    """
    x = np.asarray(x, np.float32).ravel()
    top = float(np.abs(x).max()) if x.size else 0.0
    if top == 0.0:
        return 0.0
    best_t, best_err = top, np.inf
    for k in range(grid, 0, -1):  # from the max down, so ties keep the larger threshold
        t = top * k / grid
        err = float(np.mean((fake_quant_np(x, np.float32(t / divisor), qmin, qmax) - x) ** 2))
        if err < best_err:
            best_t, best_err = t, err
    return best_t


def ema_update_np(state: Optional[float], batch_max: float, momentum: float) -> np.float32:
    """One EMA step in float32, exactly as the graph computes it; ``state=None`` means unset."""
    b = np.float32(batch_max)
    if state is None or state <= 0:
        return b
    return np.float32(np.float32(momentum) * np.float32(state)) + np.float32(np.float32(1.0 - momentum) * b)


def fold_bn_np(w: np.ndarray, b: Optional[np.ndarray], gamma: np.ndarray, beta: np.ndarray,
               mean: np.ndarray, var: np.ndarray, eps: float) -> tuple:
    """BN fold in numpy: returns ``(w_f, b_f)``; ``w`` has the output channel first."""
    inv = gamma / np.sqrt(var + eps)
    b = np.zeros_like(mean) if b is None else b
    return w * inv.reshape((-1,) + (1,) * (w.ndim - 1)), beta + (b - mean) * inv


# ----------------------------------------------------------------------------- graph (F)
def round_half_even(F: Any, u: Any) -> Any:
    """Half-to-even rounding of float32 ``|u| <= 2**22`` with an identity gradient."""
    return (u + MAGIC) - MAGIC


def fake_quant(F: Any, x: Any, scale: Any, qmin: int, qmax: int, ste: str = "plain",
               rounding: str = "half_even", multiplier: Optional[Any] = None) -> Any:
    """``clip(round(x / s), qmin, qmax) * s`` with a straight-through gradient; with ``multiplier``
    (``weight_scales``, shaped as ``scale``), ``x * multiplier`` replaces ``x / s``.

    ``scale`` must have ``x``'s number of dimensions (size-1 axes broadcast) and carries no
    gradient. ``ste="plain"`` passes the gradient unchanged everywhere (the original), as
    ``BlockGrad(fq(x)) + (x - BlockGrad(x))``: the forward value is exactly ``fq(x)``
    (``x - x`` is +0) and the backward pass skips the quantizer entirely. ``ste="clipped"``
    zeroes the gradient where ``x / s`` is outside ``[qmin, qmax]`` (PyTorch's choice).
    Bit-identical to ``fake_quant_np`` in float32.
    """
    s = F.broadcast_like(F.BlockGrad(scale), x)  # then elementwise ops: broadcasting ones are slow here
    mult = None if multiplier is None else F.broadcast_like(F.BlockGrad(multiplier), x)

    def ratio(v: Any) -> Any:
        return F.elemwise_div(v, s) if mult is None else F.elemwise_mul(v, mult)

    if ste == "clipped":
        u = F.clip(ratio(x), qmin, qmax)
        r = round_half_even(F, u) if rounding == "half_even" else u + F.BlockGrad(F.round(u) - u)
        return F.elemwise_mul(r, s)
    u = F.clip(ratio(F.BlockGrad(x)), qmin, qmax)
    r = round_half_even(F, u) if rounding == "half_even" else F.round(u)
    return F.BlockGrad(F.elemwise_mul(r, s)) + (x - F.BlockGrad(x))


def _abs_max(F: Any, w: Any, per_channel: bool, ndim: int) -> Any:
    a = F.abs(F.BlockGrad(w))
    if per_channel:
        return F.max(a, axis=tuple(range(1, ndim)), keepdims=True)
    return F.reshape(F.max(a), (1,) * ndim)


def weight_scale(F: Any, w: Any, divisor: float, per_channel: bool, ndim: int) -> Any:
    """Symmetric weight scale with ``ndim`` dimensions (for broadcasting), no gradient.

    Per tensor: shape (1,)*ndim; per channel: (C, 1, ...). Zero maxima give scale 1.
    """
    return weight_scales(F, w, divisor, per_channel, ndim)[0]


def weight_scales(F: Any, w: Any, divisor: float, per_channel: bool, ndim: int,
                  mxnet_arithmetic: bool = False) -> tuple:
    """``(s_w, multiplier)`` from one ``max|w|``: ``weight_scale``, and ``None`` (codes are
    ``round(w / s_w)``) or, with ``mxnet_arithmetic``, ``divisor / max|w|`` (1 for a zero maximum):
    the float32 number MXNet 1.9.1's oneDNN layers multiply their weights by before rounding.
    ``w * (127.5 / max)`` and ``w / (max / 127.5)`` differ in the last bit for some channels, and
    for ``w = -max`` that bit decides between -127.5 (code -128) and -127.49999 (code -127)."""
    m = _abs_max(F, w, per_channel, ndim)
    s = F.where(m > 0, m / float(divisor), F.ones_like(m))
    return s, (F.where(m > 0, float(divisor) / m, F.ones_like(m)) if mxnet_arithmetic else None)


def weight_ratio(F: Any, w: Any, s_w: Any, multiplier: Optional[Any]) -> Any:
    """What ``fake_quant`` rounds: ``w / s_w``, or ``w * multiplier`` (MXNet's arithmetic)."""
    return F.broadcast_div(w, s_w) if multiplier is None else F.broadcast_mul(w, multiplier)


def weight_codes(F: Any, w: Any, s_w: Any, multiplier: Optional[Any], qmin: int, qmax: int) -> Any:
    """The integer codes ``fake_quant`` rounds to (``weight_ratio``), for the export."""
    return F.clip(round_half_even(F, weight_ratio(F, w, s_w, multiplier)), qmin, qmax)


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """Output channel ``j`` of a channel shuffle reads input channel ``perm[j]`` (reshape to (groups,
    channels / groups), transpose, flatten).

    >>> shuffle_permutation(6, 2).tolist()
    [0, 3, 1, 4, 2, 5]
    """
    k = channels // groups
    j = np.arange(channels)
    return (j % groups) * k + j // groups


def scale_grad(F: Any, x: Any, g: float) -> Any:
    """``x`` in the forward pass, ``g * grad`` in the backward pass: ``BlockGrad(x) + (g x - BlockGrad(g x))``.

    The forward value is ``x`` bit for bit (the bracket is exactly 0), so a learned step is the
    same float32 number in training and in the exported model. The textbook form
    ``BlockGrad(x - g x) + g x`` is off by rounding (tens of ulps for the activation steps, where
    ``g`` is about 10-100), enough to move input codes that sit near a rounding boundary.

    >>> import mxnet as mx
    >>> x = mx.nd.array([0.0168055, 3.3e-3, 7.0])
    >>> bool((scale_grad(mx.nd, x, 26.2) == x).asnumpy().all())
    True
    """
    gx = x * g
    return F.BlockGrad(x) + (gx - F.BlockGrad(gx))


def lsq_fake_quant(F: Any, x: Any, step: Any, qmin: int, qmax: int, g: float) -> Any:
    r"""LSQ (Esser et al. 2019): ``s * clip(round(x / s), qmin, qmax)`` with the step ``s`` learned.

    ``step`` broadcasts against ``x``. Gradients (autograd of the expression, no custom op)::

        d/dx = 1 inside [qmin, qmax] * s, 0 outside          (the clipped straight-through estimator)
        d/ds = (round(x/s) - x/s) inside, qmin or qmax at the bounds, times g

    ``g = 1 / sqrt(N * qmax)`` (N: weights of the layer or of one channel, or elements of one
    sample's activation) keeps the step's updates on the scale of the weights' (the paper's gradient
    scale). Rounding half to even, as everywhere.
    """
    s = F.broadcast_like(scale_grad(F, step, g), x)
    u = F.clip(F.elemwise_div(x, s), qmin, qmax)
    return F.elemwise_mul(u + F.BlockGrad(round_half_even(F, u) - u), s)


def lsq_grad_np(x: np.ndarray, s: float, qmin: int, qmax: int) -> np.ndarray:
    """float64 reference of LSQ's step-size gradient per element (before the scale ``g``).

    >>> lsq_grad_np(np.array([0.26, 1.0, -9.0, 9.0]), 0.5, -4, 3).tolist()
    [0.48, 0.0, -4.0, 3.0]
    """
    u = np.asarray(x, np.float64) / s
    return np.where(u < qmin, qmin, np.where(u > qmax, qmax, np.rint(u) - u))


BIAS_QMAX = 2**22  # bias codes are int32; the float32 rounding trick is exact up to 2**22


def fake_quant_bias(F: Any, b: Any, w_scale: Any, a_scale: Any, ste: str = "plain") -> Any:
    """Bias as the integer engines use it: ``round(b / (s_w * s_a)) * (s_w * s_a)``.

    ``w_scale`` has any shape with C or 1 elements, ``a_scale`` shape (1,).
    """
    s_b = F.broadcast_mul(F.reshape(w_scale, (-1,)), a_scale)
    return fake_quant(F, b, s_b, -BIAS_QMAX, BIAS_QMAX, ste)


def fold_bn(F: Any, w: Any, b: Optional[Any], gamma: Any, beta: Any, mean: Any, var: Any,
            eps: float, ndim: int = 4, inv_in_float64: bool = False) -> tuple:
    """Graph BN fold, differentiable in ``w``, ``gamma``, ``beta`` (and ``b``): ``(w_f, b_f)``.

    ``inv_in_float64``: ``gamma / sqrt(var + eps)`` in float64, then rounded to float32, as MXNet's
    oneDNN convolution folds its BatchNorm (scheme ``onednn``): the folded weights are then the ones
    oneDNN quantizes, bit for bit (a last-bit difference moves the code of ``-max|w|`` by one)."""
    if inv_in_float64:
        inv = F.cast(F.cast(gamma, "float64") / F.sqrt(F.cast(var, "float64") + eps), "float32")
    else:
        inv = gamma / F.sqrt(var + eps)
    # elementwise after broadcast_like: the same products, and a backward pass twice as fast as broadcast_mul's
    w_f = F.elemwise_mul(w, F.broadcast_like(F.reshape(inv, (-1,) + (1,) * (ndim - 1)), w))
    b_f = beta - mean * inv if b is None else beta + (b - mean) * inv
    return w_f, b_f
