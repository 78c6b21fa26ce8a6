"""Post-training quantization (PTQ) with our own quantizer, at any bit width.

A float checkpoint is loaded into the quantized network; then, without any training:

- activation ranges (``input_max`` of every quantized layer) come from calibration batches
  run through the network in float (evaluation mode, fake quantization off), either
  ``max``: ``input_max = max|x|`` over the batches, or
  ``mse``: ``input_max = argmin_t mean((fq(x; t / 2**(b-1)) - x)**2)`` (``quant.mse_threshold_np``);
- weights, with ``clip_weights_mse``: each folded weight tensor (or output channel) is clipped
  at its MSE-optimal threshold, so that the in-graph scale ``max|w_f| / qmax`` is that threshold.

The network then runs exactly as after QAT (same graph, same engines, same artifact).
"""
from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from . import quant
from .layers import BN_EPS, QConv2DBN, input_grid, quantized_layers, set_quant_state, visit_layer_inputs

METHODS = ("max", "mse", "lsq")


def collect_inputs(net: gluon.HybridBlock, loader: gluon.data.DataLoader, norm: Any, ctx: mx.Context,
                   batches: int, sample: int = 200_000, seed: int = 0) -> dict:
    """Per quantized layer: ``(max|x|, sample of x)`` over ``batches`` evaluation batches of the float
    network (fake quantization off). The sample (``sample`` values a batch, fixed seed) feeds the MSE search."""
    rng = np.random.default_rng(seed)
    layers = quantized_layers(net)
    seen: dict = {name: [0.0, []] for name, _ in layers}
    enabled = {name: block.quant_enabled for name, block in layers}

    def record(name: str, block: Any, x: Any) -> None:
        x = x.asnumpy().ravel()
        seen[name][0] = max(seen[name][0], float(np.abs(x).max()))
        seen[name][1].append(x if x.size <= sample else x[rng.integers(0, x.size, sample)])

    set_quant_state(net, enabled=False)
    try:
        visit_layer_inputs(net, loader, norm, ctx, batches, record)
    finally:
        for name, block in layers:
            block.quant_enabled = enabled[name]
        net.hybridize(static_alloc=True)
    return {name: (m, np.concatenate(xs)) for name, (m, xs) in seen.items()}


def calibrate_ranges(net: gluon.HybridBlock, loader: gluon.data.DataLoader, norm: Any, ctx: mx.Context,
                     batches: int, method: str) -> dict:
    """Set every quantized layer's ``input_max`` by ``method`` (``max``, ``mse``, or ``lsq``: LSQ's own
    initial step ``2 mean|x| / sqrt(Q_P)`` times the grid's divisor); returns them."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    stats = collect_inputs(net, loader, norm, ctx, batches)
    ranges = {}
    for name, block in quantized_layers(net):
        if block.range_fixed:  # a ReLU6 output's range (conversion._read) stays
            ranges[name] = float(block.input_max.data().asscalar())
            continue
        top, x = stats[name]
        qmin, qmax, divisor = input_grid(block)
        if method == "max":
            t = top
        elif method == "lsq":  # LSQ's own step, as the range it is the step of
            t = float(quant.lsq_init_step(x, qmax)) * divisor
        else:
            t = quant.mse_threshold_np(x, qmin, qmax, divisor)
        block.input_max.set_data(mx.nd.array([t]))
        ranges[name] = t
    return ranges


def clip_weights_mse(net: gluon.HybridBlock) -> dict:
    """Clip each layer's weights where the folded weights' MSE-optimal threshold lies (per tensor, or
    per output channel with ``quant.per_channel``); returns the share of the max kept per layer.

    For ``QConv2DBN`` the fold multiplies channel c by ``k_c = gamma_c / sqrt(var_c + eps)``, so
    clipping ``w_f`` at ``t_c`` is clipping ``w`` at ``t_c / |k_c|``.
    """
    kept = {}
    for name, block in quantized_layers(net, weights_only=True):
        w = block.weight.data().asnumpy()
        if isinstance(block, QConv2DBN):
            k = block.gamma.data().asnumpy() / np.sqrt(block.running_var.data().asnumpy() + BN_EPS)
        else:
            k = np.ones(w.shape[0], np.float32)
        w_f = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
        qmin, qmax, divisor = quant.weight_grid(block.spec.weight_bits, block.spec.scheme)
        rows = w_f.reshape(w.shape[0], -1) if block.spec.per_channel else w_f.reshape(1, -1)
        t = np.array([quant.mse_threshold_np(r, qmin, qmax, divisor) for r in rows], np.float32)
        t_c = np.broadcast_to(t, (w.shape[0],)) if t.size == 1 else t
        with np.errstate(divide="ignore"):
            bound = np.where(np.abs(k) > 0, t_c / np.abs(k), np.inf).astype(np.float32)
        bound = bound.reshape((-1,) + (1,) * (w.ndim - 1))
        block.weight.set_data(mx.nd.array(np.clip(w, -bound, bound)))
        kept[name] = float(np.mean(t / np.maximum(np.abs(rows).max(axis=1), 1e-30)))
    return kept
