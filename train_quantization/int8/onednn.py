"""Real int8 execution on MXNet's oneDNN (MKLDNN) kernels: our learned ranges, or PTQ.

``with_learned_ranges`` deploys a QAT model: the hybridized network (QAT weights, BatchNorm
unfolded as in the float graph) is exported, fused by the ``MKLDNN_QUANTIZE`` backend,
quantized by ``quantize_graph`` with channel-wise weights, and its calibration table
(``min_max_dict``) is filled with the ranges QAT learned instead of MXNet's own statistics:

* ``data``: ``(-r_0, r_0)``, the first layer's input range,
* each fused layer's output: the next quantized layer's input range, ``(0, r)`` after a
  ReLU (max pooling does not change it),
* the logits: the largest logit magnitude on the calibration images (so they come out in
  float),
* a block output whose fused ``conv + sum + ReLU`` had an int8 shortcut (a conv output without
  ReLU): twice the range, because oneDNN writes the sum into the shortcut's int8 buffer, so the
  uint8-typed output holds codes 0..127 only (at the full range, half of it would be clipped);
  an add without ReLU (a linear bottleneck's) is int8 at its own range;
* global average pooling stays in float (``_global_avg_pools``); a 1x1 convolution classifier
  on it runs as the equal fully connected layer, whose logits come out in float
  (``_classifier_as_dense``).

oneDNN's arithmetic is not the original scheme's: int8 inputs at ``127.5/T``, post-ReLU
tensors uint8 at ``255.5/T``, weights per output channel at ``127.5/max|w_c|``, round half to
even. So a model trained with the original scheme agrees with the simulation on most but
not all images. The ``onednn`` scheme trains with that arithmetic, including how MXNet folds
BatchNorm (``quant.fold_bn``) and scales weights (``quant.weight_scales``), so that each
oneDNN layer computes the simulation's codes but for float rounding ties.

``ptq`` is MXNet's own post-training quantization of the float network (``naive``: max of
the calibration outputs; ``entropy``: KL-divergence thresholds, the TensorRT method).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import replace
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.contrib import quantization as mxq

from .. import machine, quant
from ..errors import UserError
from ..layers import quantized_layers, stock_relu6
from .export import folded
from .model import Add, Affine, AvgPool, Concat, Conv, Dense, Flatten, Int8Model, MaxPool, Shuffle, Slice

log = logging.getLogger(__name__)
INT8_DIV, UINT8_DIV = 127.5, 255.5  # oneDNN's quantization divisors (quant.act_grid, scheme onednn)
S8_WEIGHT_ADJUST = 0.5  # oneDNN's weight scale for int8-input convolutions on CPUs without VNNI


def _export(net: gluon.HybridBlock, input_shape: tuple) -> tuple:
    net.hybridize(static_alloc=True, static_shape=True)  # a float inference variant keeps static shapes
    with stock_relu6(net), tempfile.TemporaryDirectory() as d:
        net(mx.nd.zeros((1,) + tuple(input_shape)))
        net.export(os.path.join(d, "m"), 0)
        sym, args, auxs = mx.model.load_checkpoint(os.path.join(d, "m"), 0)
    sym, args = _classifier_as_dense(sym, args)
    return sym.get_backend_symbol("MKLDNN_QUANTIZE"), args, auxs


def _classifier_as_dense(sym: mx.sym.Symbol, args: dict) -> tuple:
    """A 1x1 convolution on a global pooling's output, flattened into the logits (gluoncv's MobileNet and
    ShuffleNet classifiers), becomes the equal fully connected layer: oneDNN's int8 convolution can only
    requantize its output, so the logits would come out as int8 codes (a step of ``max|logit| / 127.5``,
    measured to swap 1.5 % of the top-1s of a MobileNetV2), while its int8 fully connected layer
    dequantizes into float logits, as the engines compute them."""
    import json

    g = json.loads(sym.tojson())
    nodes, (head,) = g["nodes"], g["heads"]
    flat = nodes[head[0]]
    conv = nodes[flat["inputs"][0][0]] if flat["op"] == "Flatten" else None
    if conv is None or conv["op"] != "Convolution":
        return sym, args
    a = conv.get("attrs", {})
    pool = nodes[conv["inputs"][0][0]]
    if (a.get("kernel") not in ("(1, 1)", "[1, 1]") or a.get("num_group", "1") != "1" or pool["op"] != "Pooling"
            or pool.get("attrs", {}).get("global_pool") != "True"):
        return sym, args
    conv["op"] = "FullyConnected"
    conv["attrs"] = {"num_hidden": a["num_filter"], "no_bias": a.get("no_bias", "False"), "flatten": "True"}
    g["heads"] = [flat["inputs"][0]]
    weight = nodes[conv["inputs"][1][0]]
    weight.get("attrs", {}).pop("__shape__", None)  # the 4-d shape Gluon recorded
    w = weight["name"]
    args = {**args, w: args[w].reshape((args[w].shape[0], -1))}
    return mx.sym.load_json(json.dumps(g)), args


def _block(qsym: mx.sym.Symbol, args: dict, auxs: dict) -> gluon.SymbolBlock:
    qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")
    block = gluon.SymbolBlock(qsym, [mx.sym.var("data")])
    params = {**{f"arg:{k}": v for k, v in args.items()}, **{f"aux:{k}": v for k, v in auxs.items()}}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.params")
        mx.nd.save(path, params)
        block.collect_params().load(path, cast_dtype=True, dtype_source="saved", ignore_extra=True)
    block.collect_params().reset_ctx(mx.cpu())
    # static memory and shapes: at batch 1 the quantize/requantize graph otherwise spends most of its
    # time re-planning (measured 0.40 vs 2.7 ms a w0.25 VGG16 image; outputs identical at every shape)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def _quiet(fn, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call an MXNet quantization function without its per-layer log lines (Python INFO and
    the C++ pass's stderr lines); errors still raise as exceptions."""
    logger = logging.getLogger("quantize")
    logger.setLevel(logging.WARNING)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            return fn(*a, logger=logger, **kw)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def with_learned_ranges(float_net: gluon.HybridBlock, qat_net: gluon.HybridBlock, input_shape: tuple,
                        calib_x: mx.nd.NDArray) -> gluon.SymbolBlock:
    """oneDNN int8 network that uses the QAT network's activation ranges.

    ``float_net`` must hold the QAT weights (same parameter names, ranges ignored).
    """
    logits = float(mx.nd.abs(float_net(calib_x)).max().asscalar())
    sym, args, auxs = _export(float_net, input_shape)
    qsym, qargs, qauxs, collector = _quiet(
        mxq.quantize_graph, sym=sym, arg_params=args, aux_params=auxs, ctx=mx.cpu(), calib_mode="naive",
        quantized_dtype="auto", quantize_granularity="channel-wise", excluded_sym_names=_global_avg_pools(sym))
    table = range_table(float_net, qat_net, input_shape, qsym, list(collector.include_layer), logits)
    collector.min_max_dict = table
    qsym, qargs, qauxs = _quiet(mxq.calib_graph, qsym=qsym, arg_params=qargs, aux_params=qauxs,
                                collector=collector, calib_mode="naive", quantized_dtype="auto")
    return _block(qsym, qargs, qauxs)


def _global_avg_pools(sym: mx.sym.Symbol) -> list:
    """Global average pooling stays in float on the dequantized codes (then the next layer quantizes
    the mean at its own range, as the engines do); oneDNN's int8 pooling would round the mean to
    its input's coarser grid."""
    import json

    return [n["name"] for n in json.loads(sym.tojson())["nodes"] if n["op"] == "Pooling"
            and n.get("attrs", {}).get("pool_type") == "avg" and n["attrs"].get("global_pool") == "True"]


def _to_output(v: int, graph: list, readers: dict) -> bool:
    """Whether op ``v``'s output is the network's (a classifier conv's output is flattened into the logits)."""
    while len(readers.get(v, [])) == 1 and isinstance(graph[readers[v][0]], Flatten):
        v = readers[v][0]
    return v == len(graph) - 1


def _learned_range(v: int, graph: list, readers: dict, ranges: dict) -> float:
    """The learned range of op ``v``'s output: that of the quantized layer that reads it (through
    max pooling and flatten), else of the add that reads it, else the add's own."""
    cons = readers.get(v, [])
    for kinds in ((Conv, Dense, AvgPool), (Add,)):
        for i in cons:
            if isinstance(graph[i], kinds) and graph[i].name in ranges:
                return ranges[graph[i].name]
    for i in cons:
        if isinstance(graph[i], (MaxPool, Flatten)):
            return _learned_range(i, graph, readers, ranges)
    if v >= 0 and isinstance(graph[v], Add):
        return ranges[graph[v].name]
    raise ValueError(f"no learned range for the output of {graph[v].name}")


def fused_ops(qsym: mx.sym.Symbol, float_net: gluon.HybridBlock, model: Int8Model) -> dict:
    """``{fused node name: index of the op of model's graph whose output it computes}`` for each quantized
    fused layer of ``qsym``: found by its weight's parameter name in ``float_net``; a ``conv + sum`` node
    computes its add's output."""
    import json

    graph, readers = model.layers, model.readers()
    index = {op.name: i for i, op in enumerate(graph)}
    path_of = {p.name: path.rsplit(".", 1)[0] for path, p in float_net._collect_params_with_prefix().items()}
    nodes = json.loads(qsym.tojson())["nodes"]
    out = {}
    for n in nodes:
        if not n["name"].startswith("quantized_sg_mkldnn_"):
            continue
        layer = path_of.get(nodes[n["inputs"][1][0]]["name"], "")
        if layer not in index:
            raise ValueError(f"cannot map oneDNN's {n['name']} (weight of {layer!r}) onto the learned ranges")
        v = index[layer]
        if n.get("attrs", {}).get("with_sum") == "true":  # conv + residual add (+ ReLU) fused: the add's output
            v = next(i for i in readers[v] if isinstance(graph[i], Add))
        out[n["name"]] = v
    return out


def layer_codes(block: gluon.SymbolBlock, float_net: gluon.HybridBlock, model: Int8Model, x: np.ndarray) -> dict:
    """What the int8 graph ``block`` (``with_learned_ranges``) feeds each quantized layer of ``model`` that
    reads a fused layer's output directly: ``{reader name: codes}``, comparable with the codes
    ``engine.simulate(model, x, record)`` records (and usable as its ``force``)."""
    sym = block._cached_graph[1]
    graph, readers = model.layers, model.readers()
    wanted = {}
    for node, v in fused_ops(sym, float_net, model).items():
        first = [i for i in readers.get(v, []) if isinstance(graph[i], (Conv, Dense))]
        if first:
            wanted[graph[first[0]].name] = node
    inter = sym.get_internals()
    outs = gluon.SymbolBlock(mx.sym.Group([inter[f"{n}_output"] for n in wanted.values()]),
                             [mx.sym.var("data")], params=block.collect_params())(mx.nd.array(x))
    return {name: o.asnumpy().astype(np.int32) for name, o in zip(wanted, outs)}


def range_table(float_net: gluon.HybridBlock, qat_net: gluon.HybridBlock, input_shape: tuple,
                qsym: mx.sym.Symbol, names: list, logits: float) -> dict:
    """oneDNN's calibration table from the learned ranges: each fused layer's output is found in
    our layer graph (``export``) by its weight's parameter name; it gets the range of the quantized
    layer that reads it (through max pooling and flatten), else of the add that reads it, else its
    own add's range; a global average pooling left in float (``_global_avg_pools``) gives its output
    the range of the layer that reads it; ``(0, r)`` after a ReLU, ``(-r, r)`` otherwise.
    The network input gets the first layer's range and the logits their largest magnitude."""
    from .export import export

    model = export(qat_net, (0.0,) * 3, (1.0,) * 3, input_shape, [])
    graph, readers, nonneg = model.layers, model.readers(), model.nonneg()
    other = sorted({op.type for op in graph if isinstance(op, (Affine, Concat, Slice, Shuffle))})
    if other:
        raise UserError(f"oneDNN int8 with the learned ranges cannot run this model's {', '.join(other)} ops (a "
                        "BatchNorm that no convolution precedes, channel split/concat/shuffle); run it with the numpy "
                        "engines or ONNX Runtime")
    ranges = {name: float(b.input_max.data().asscalar()) for name, b in quantized_layers(qat_net)}

    def reach(v: int) -> float:
        return _learned_range(v, graph, readers, ranges)

    r_in = reach(-1)
    table = {"data": (-r_in, r_in)}
    for node, v in fused_ops(qsym, float_net, model).items():
        out = node[len("quantized_"):] + "_output"
        if out not in names:
            continue
        if _to_output(v, graph, readers):
            table[out] = (-logits, logits)
            continue
        r = reach(v)
        if isinstance(graph[v], Add) and nonneg[v] and not nonneg[graph[v].inputs[1]]:
            # conv + sum (+ ReLU) writes into the shortcut's buffer: after an int8 shortcut the uint8-typed
            # output holds codes 0..127 only, so the range doubles (onednn scheme: 255.5/r' = 127.5/r); an
            # add without ReLU (a linear bottleneck's) stays int8 at its own range
            r *= UINT8_DIV / INT8_DIV
        table[out] = (0.0 if nonneg[v] else -r, r)
    pools = [i for i, op in enumerate(graph) if isinstance(op, AvgPool)]
    table.update({f"{n}_output": (0.0 if nonneg[pools[0]] else -reach(pools[0]), reach(pools[0]))
                  for n in _global_avg_pools(qsym) if f"{n}_output" in names and len(pools) == 1})
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"cannot map learned ranges onto oneDNN's layers {missing}")
    return table


def ptq(float_net: gluon.HybridBlock, input_shape: tuple, calib_x: mx.nd.NDArray, mode: str = "naive",
        granularity: str = "channel-wise") -> gluon.SymbolBlock:
    """MXNet's post-training quantization of ``float_net`` calibrated on ``calib_x``."""
    sym, args, auxs = _export(float_net, input_shape)
    qsym, qargs, qauxs, collector = _quiet(
        mxq.quantize_graph, sym=sym, arg_params=args, aux_params=auxs, ctx=mx.cpu(), calib_mode=mode,
        quantized_dtype="auto", quantize_granularity=granularity)
    batch = min(64, calib_x.shape[0])
    mod = mx.mod.Module(symbol=sym, context=mx.cpu(), data_names=["data"], label_names=None)
    mod.bind(for_training=False, data_shapes=[("data", (batch,) + tuple(calib_x.shape[1:]))])
    mod.set_params(args, auxs, allow_missing=False, force_init=True)
    it = mx.io.NDArrayIter(calib_x, batch_size=batch, last_batch_handle="discard")
    _quiet(mxq._collect_layer_statistics, mod, it, collector, calib_x.shape[0])
    qsym, qargs, qauxs = _quiet(mxq.calib_graph, qsym=qsym, arg_params=qargs, aux_params=qauxs,
                                collector=collector, calib_mode=mode, quantized_dtype="auto")
    return _block(qsym, qargs, qauxs)


def calib_table(block: gluon.SymbolBlock) -> dict:
    """The thresholds that landed in the int8 graph: {node name: (min, max)}."""
    import json

    graph = json.loads(block._cached_graph[1].tojson())
    return {n["name"]: (float(n["attrs"]["min_calib_range"]), float(n["attrs"]["max_calib_range"]))
            for n in graph["nodes"] if "max_calib_range" in n.get("attrs", {})}


def kernel_model(qat_net: gluon.HybridBlock, model: Int8Model, vnni: Optional[bool] = None) -> Int8Model:
    """``model`` (exported from ``qat_net``) as oneDNN's int8 kernels compute it on this CPU (``vnni``:
    default ``machine.onednn_vnni()``, so ``DNNL_MAX_CPU_ISA`` counts); ``engine.simulate`` runs it.

    With VNNI that is ``model``. Without VNNI (AVX2, AVX-512 without DL Boost) oneDNN multiplies u8 by s8
    with VPMADDUBSW, which adds the products of input channels 2k and 2k+1 in int16, saturating, before the
    int32 sum (oneDNN's "Nuances of int8 computations"):

    * a layer of uint8 input computes ``sum_k sat16(x_2k w_2k + x_2k+1 w_2k+1)`` (``s16_pairs``); a pair
      saturates where both inputs and both weights are large, rarely;
    * a convolution of int8 (signed) input shifts its codes by 128 to u8 and, so that no pair can saturate,
      its weight reorder scales the weights by 0.5 (one rounding of the float weights) while the kernel
      scales the bias by 0.5 and the output scale by 2 (``sa0.5`` in ``DNNL_VERBOSE``)::

          w'_c = clip(round(0.5 * w_f * m_c), -128, 127)      m_c: the scheme's weight multiplier
          y    = (sum x * w' + 0.5 * b_q) * 2 M  =  (sum x * 2 w' + b_q) * M

      so it runs on the even codes ``2 w'`` (int16: ``2 w'`` reaches 128) in place of ``round(w_f * m_c)``,
      one bit of weight resolution fewer.

    Depthwise and grouped convolutions widen to int16 before multiplying (no pair sums); their int8-input
    weights are halved all the same. A fully connected layer's pairs are taken along its flattened input;
    one of int8 input (oneDNN's s8 x s8 GEMM shifts it and may saturate) is left as it is.
    """
    if machine.onednn_vnni() if vnni is None else vnni:
        return model
    blocks = dict(quantized_layers(qat_net, weights_only=True))
    layers = []
    for op in model.layers:
        if isinstance(op, Conv) and op.act.qmin < 0:
            w_f, _, s_w, mult = folded(blocks[op.name])
            t = quant.weight_ratio(mx.nd, w_f, s_w, mult).asnumpy()
            half = np.clip(np.rint(t * np.float32(S8_WEIGHT_ADJUST)), -128, 127)
            op = replace(op, w=(2 * half).astype(np.int16))
        elif isinstance(op, (Conv, Dense)) and op.act.qmin >= 0:
            op = replace(op, s16_pairs=True)
        layers.append(op)
    return replace(model, layers=layers)


def logits(block: gluon.Block, x: np.ndarray, batch: int = 250) -> np.ndarray:
    """Run ``block`` over normalized float NCHW ``x`` in batches."""
    out = [block(mx.nd.array(x[i:i + batch])).asnumpy() for i in range(0, len(x), batch)]
    return np.concatenate(out)


def size_bytes(block: gluon.SymbolBlock) -> Optional[int]:
    """Bytes of the block's parameters as MXNet saves them."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.params")
        block.save_parameters(path)
        return os.path.getsize(path)
