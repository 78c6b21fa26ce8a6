"""ONNX export of an ``Int8Model`` as a QDQ graph, run by ONNX Runtime's int8 kernels.

Each quantized layer (in the layer graph's order; each reads the outputs its ``inputs`` name) becomes::

    x_q = QuantizeLinear(x, s_a, zp)         uint8, round half to even
    y   = Conv|Gemm(DequantizeLinear(x_q, s_a, zp), DequantizeLinear(w, s_w, axis=0),
                    DequantizeLinear(b, s_w * s_a, axis=0))   then Relu

Our signed codes are carried exactly in uint8: a signed input (the network input) with zero
point 128 (codes -128..127 -> 0..255, same saturation), a ReLU output with zero point 0 and an
explicit ``Clip(0, 127 * s_a)`` after the kernel's requantization (uint8 alone would saturate
at 255, ours at 127) where the ReLU output has that one reader; ReLU outputs with several
readers (a ResNet block's output) use zero point 128 like signed data. A residual add
quantizes both branches to its scale (zero point 128) and adds the dequantized values.
Weights are int8 where the input is a ReLU output with zero point 0 (u8 codes <= 127 times s8
never overflow the 16-bit pair sums of non-VNNI x86 kernels) and uint8 with zero point 128
where the input has zero point 128 (u8u8 kernels, no saturation). Measured: logits equal to
the simulated engine's to float rounding (tests/test_onnx.py).

The weights are our codes (any width 2-8: they fit int8), the bias our int32 bias, the scales
our learned activation scales; ONNX Runtime fuses the pattern into QLinearConv/QGemm kernels.
Max pooling, global average pooling, Flatten and a float last layer map to their ONNX ops.
Activations below 8 bits cannot be expressed by QuantizeLinear's int8 saturation, so those
models are refused (the simulated and integer-only engines run them). Opset 13 (per-axis
DequantizeLinear).

Optional dependencies (see README, Install): ``onnx==1.14.1`` and
``pip install --no-deps onnxruntime==1.17.3`` (its wheels declare numpy>=1.24.2 but run with
MXNet's numpy 1.23.5).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .model import Int8Model

OPSET = 13
INSTALL = ("pip install onnx==1.14.1 && pip install --no-deps onnxruntime==1.17.3 coloredlogs flatbuffers "
           "sympy packaging")


def available() -> bool:
    """Whether onnx and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UserError(f"ONNX export needs the onnx package: {INSTALL}") from None
    return onnx


def _zero_point(layer: dict) -> int:
    """uint8 zero point of a layer's input codes: 0 for codes that are >= 0 (uint8 grid), else 128."""
    return 0 if layer["in_qmin"] == 0 else 128


def build_qdq(m: Int8Model) -> Any:
    """The ``onnx.ModelProto`` of ``m`` (input ``x``: normalized float32 NCHW, output ``logits``)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    low = [la["name"] for la in m.layers if la["type"] in ("conv", "dense", "add") and la["act_bits"] < 8]
    if low:
        raise UserError(f"ONNX Runtime runs 8-bit activations only; layers {low} use fewer bits. "
                        "Use sim_int8_infer.py --engine sim|integer for this model")
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    layers = m.layers
    inputs, consumers = m.inputs(), m.readers()

    def target(v: int) -> Optional[int]:
        """The one quantized layer that reads ``v``, through max pooling/flatten, if it is the only reader."""
        while len(consumers.get(v, [])) == 1:
            v = consumers[v][0]
            if layers[v]["type"] in ("conv", "dense"):
                return v
            if layers[v]["type"] not in ("maxpool", "flatten"):
                return None
        return None

    out = {-1: "x"}  # ONNX tensor of each layer's output
    clipped: set = set()  # quantized layers whose input was requantized and clipped for them (zero point 0)

    def quantize(n: str, tensor: str, s: float, zp: int) -> str:
        s_a = const(f"{n}.s_a", np.array(s, np.float32))
        z = const(f"{n}.zp", np.array(zp, np.uint8))
        nodes.extend([helper.make_node("QuantizeLinear", [tensor, s_a, z], [f"{n}.xq"]),
                      helper.make_node("DequantizeLinear", [f"{n}.xq", s_a, z], [f"{n}.xdq"])])
        return f"{n}.xdq"

    for i, la in enumerate(layers):
        n, t, src = f"l{i}", la["type"], inputs[i][0]
        if t in ("conv", "dense"):
            a = la["arrays"]
            x_in = out[src]
            if t == "dense" and src >= 0 and layers[src]["type"] == "avgpool":  # Gemm takes 2-D input
                nodes.append(helper.make_node("Flatten", [x_in], [f"{n}.flat"], axis=1))
                x_in = f"{n}.flat"
            zp = 0 if i in clipped else _zero_point(la)
            xdq = quantize(n, x_in, la["in_scale"], zp)
            s_w = a["w_scale"].astype(np.float32)
            if zp == 0 and la["in_qmax"] <= 127:  # u8 codes <= 127 times s8 weights: no 16-bit saturation
                const(f"{n}.w", a["w"].astype(np.int8))
                const(f"{n}.w_zp", np.zeros(len(s_w), np.int8))
            else:  # u8 codes up to 255: u8 weights (zero point 128), u8u8 kernels never saturate
                const(f"{n}.w", (a["w"].astype(np.int16) + 128).astype(np.uint8))
                const(f"{n}.w_zp", np.full(len(s_w), 128, np.uint8))
            const(f"{n}.s_w", s_w)
            const(f"{n}.b", a["b"].astype(np.int32))
            const(f"{n}.s_b", (s_w * np.float32(la["in_scale"])).astype(np.float32))
            const(f"{n}.b_zp", np.zeros(len(s_w), np.int32))
            nodes += [helper.make_node("DequantizeLinear", [f"{n}.w", f"{n}.s_w", f"{n}.w_zp"], [f"{n}.wdq"], axis=0),
                      helper.make_node("DequantizeLinear", [f"{n}.b", f"{n}.s_b", f"{n}.b_zp"], [f"{n}.bdq"], axis=0)]
            ins = [xdq, f"{n}.wdq", f"{n}.bdq"]
            if t == "conv":
                k, p = int(la["kernel"]), int(la["pad"])
                nodes.append(helper.make_node("Conv", ins, [f"{n}.y"], kernel_shape=[k, k], pads=[p] * 4,
                                              strides=[int(la.get("stride", 1))] * 2))
            else:
                nodes.append(helper.make_node("Gemm", ins, [f"{n}.y"], transB=1))
            cur = f"{n}.y"
        elif t == "add" and la.get("shortcut_only"):  # onednn scheme: the body in float, the shortcut's codes
            b_dq = quantize(f"{n}b", out[inputs[i][1]], la["in_scale"], _zero_point(la))
            nodes.append(helper.make_node("Add", [out[inputs[i][0]], b_dq], [f"{n}.y"]))
            cur = f"{n}.y"
        elif t == "add":  # both branches on the add's grid (signed: zero point 128), then add
            a_dq = quantize(f"{n}a", out[inputs[i][0]], la["in_scale"], 128)
            b_dq = quantize(f"{n}b", out[inputs[i][1]], la["in_scale"], 128)
            nodes.append(helper.make_node("Add", [a_dq, b_dq], [f"{n}.y"]))
            cur = f"{n}.y"
        elif t == "maxpool":
            size = int(la["size"])
            nodes.append(helper.make_node("MaxPool", [out[src]], [f"{n}.y"], kernel_shape=[size, size],
                                          strides=[int(la["stride"])] * 2, ceil_mode=int(bool(la["ceil"]))))
            cur = f"{n}.y"
        elif t == "avgpool":  # with in_scale (onednn scheme): pools its input's codes
            x_in = quantize(n, out[src], la["in_scale"], _zero_point(la)) if "in_scale" in la else out[src]
            nodes.append(helper.make_node("GlobalAveragePool", [x_in], [f"{n}.y"]))
            cur = f"{n}.y"
        elif t == "flatten":
            nodes.append(helper.make_node("Flatten", [out[src]], [f"{n}.y"], axis=1))
            cur = f"{n}.y"
        elif t == "dense_float":
            a = la["arrays"]
            nodes.append(helper.make_node("Gemm", [out[src], const(f"{n}.w", a["w"].astype(np.float32)),
                                                   const(f"{n}.b", a["b"].astype(np.float32))], [f"{n}.y"], transB=1))
            cur = f"{n}.y"
        else:
            raise ValueError(f"layer type {t!r} has no ONNX mapping")
        if la.get("relu"):
            nodes.append(helper.make_node("Relu", [cur], [f"{n}.r"]))
            cur = f"{n}.r"
        nx = target(i) if la.get("relu") and t in ("conv", "dense") else None
        if nx is not None:
            # requantize in the kernel (u8, zero point 0: ReLU folds away), then saturate at the
            # next layer's qmax as our arithmetic does (u8 would only saturate at 255)
            s_n = const(f"{n}.s_out", np.array(layers[nx]["in_scale"], np.float32))
            zp0 = const(f"{n}.zp_out", np.array(0, np.uint8))
            hi = const(f"{n}.hi", np.array(np.float32(layers[nx]["in_qmax"]) * np.float32(layers[nx]["in_scale"]),
                                           np.float32))
            lo = const(f"{n}.lo", np.array(0, np.float32))
            nodes += [helper.make_node("QuantizeLinear", [cur, s_n, zp0], [f"{n}.oq"]),
                      helper.make_node("DequantizeLinear", [f"{n}.oq", s_n, zp0], [f"{n}.odq"]),
                      helper.make_node("Clip", [f"{n}.odq", lo, hi], [f"{n}.oc"])]
            cur = f"{n}.oc"
            clipped.add(nx)
        out[i] = cur
    cur = out[len(layers) - 1]
    nodes.append(helper.make_node("Identity", [cur], ["logits"]))
    c, h, w = m.input_shape
    graph = helper.make_graph(nodes, "train_quantization_qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(m.classes)])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="train-quantization")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_qdq(m: Int8Model, path: str | Path) -> Path:
    """Write the QDQ model to ``path`` (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(build_qdq(m).SerializeToString())
    os.replace(tmp, path)
    return path


def session(model: Any) -> Any:
    """An ONNX Runtime CPU session (all graph optimizations: QDQ -> QLinearConv/QGemm) for a
    ``ModelProto``, serialized bytes or a path."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"ONNX Runtime is not installed: {INSTALL}") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def runner(sess: Any) -> Any:
    """``f(x) -> logits`` for normalized float32 NCHW batches."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def save_float(net: Any, input_shape: tuple, path: str | Path) -> Path:
    """Float ONNX export of a hybridized float Gluon network with MXNet's exporter (dynamic batch).

    The weights are removed from ``graph.input`` (they stay initializers), or ONNX Runtime treats
    them as overridable inputs and cannot fold BatchNorm into the convolutions.
    """
    import tempfile

    import mxnet as mx

    onnx = _onnx()
    path = Path(path)
    with tempfile.TemporaryDirectory() as d:
        net.export(os.path.join(d, "m"))
        tmp = mx.onnx.export_model(os.path.join(d, "m-symbol.json"), os.path.join(d, "m-0000.params"),
                                   [(1, *input_shape)], [np.float32], os.path.join(d, "m.onnx"), dynamic=True,
                                   dynamic_input_shapes=[(None, *input_shape)])
        model = onnx.load(tmp)
    weights = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    out = path.with_name(path.name + ".tmp")
    out.write_bytes(model.SerializeToString())
    os.replace(out, path)
    return path
