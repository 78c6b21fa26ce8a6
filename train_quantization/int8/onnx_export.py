"""ONNX export of an ``Int8Model`` as a QDQ graph, run by ONNX Runtime's int8 kernels.

Each quantized layer becomes::

    x_q = QuantizeLinear(x, s_a, zp)         uint8, round half to even
    y   = Conv|Gemm(DequantizeLinear(x_q, s_a, zp), DequantizeLinear(w, s_w, axis=0),
                    DequantizeLinear(b, s_w * s_a, axis=0))   then Relu

Our signed codes are carried exactly in uint8: a signed input (the network input) with zero
point 128 (codes -128..127 -> 0..255, same saturation), a ReLU output with zero point 0 and an
explicit ``Clip(0, 127 * s_a)`` after the kernel's requantization (uint8 alone would saturate at
255, ours at 127). Weights are int8 where the input is a ReLU output (u8 codes <= 127 times s8
never overflow the 16-bit pair sums of non-VNNI x86 kernels) and uint8 with zero point 128
where the input has zero point 128 (u8u8 kernels, no saturation). Measured: logits equal to the
simulated engine's to float rounding (tests/test_onnx.py).

with our weight codes (any width 2-8: the codes fit int8), our int32 bias and our learned
activation scales; ONNX Runtime fuses the pattern into QLinearConv/QGemm kernels. Max pooling,
Flatten and a float last layer map to their ONNX ops. Activations below 8 bits cannot be
expressed by QuantizeLinear's int8 saturation, so those models are refused (the simulated and
integer-only engines run them). Opset 13 (per-axis DequantizeLinear).

Optional dependencies (see README, Install): ``onnx==1.14.1`` and
``pip install --no-deps onnxruntime==1.17.3`` (its wheels declare numpy>=1.24.2 but run with
MXNet's numpy 1.23.5).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def build_qdq(m: Int8Model) -> Any:
    """The ``onnx.ModelProto`` of ``m`` (input ``x``: normalized float32 NCHW, output ``logits``)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    low = [la["name"] for la in m.quantized() if la["act_bits"] < 8]
    if low:
        raise UserError(f"ONNX Runtime runs 8-bit activations only; layers {low} use fewer bits. "
                        "Use sim_int8_infer.py --engine sim|integer for this model")
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    # the next quantized layer after each quantized layer, when only pooling/flatten lie between
    nxt: dict = {}
    for i, la in enumerate(m.layers):
        if la["type"] in ("conv", "dense"):
            for later in m.layers[i + 1:]:
                if later["type"] in ("conv", "dense"):
                    nxt[i] = later
                if later["type"] not in ("maxpool", "flatten"):
                    break
    cur, nonneg = "x", False  # nonneg: the tensor is a ReLU output (max pooling and flatten keep that)
    for i, la in enumerate(m.layers):
        n, t = f"l{i}", la["type"]
        if t in ("conv", "dense"):
            a = la["arrays"]
            s_a = const(f"{n}.s_a", np.array(la["in_scale"], np.float32))
            zp = const(f"{n}.zp", np.array(0 if nonneg else 128, np.uint8))
            nodes += [helper.make_node("QuantizeLinear", [cur, s_a, zp], [f"{n}.xq"]),
                      helper.make_node("DequantizeLinear", [f"{n}.xq", s_a, zp], [f"{n}.xdq"])]
            s_w = a["w_scale"].astype(np.float32)
            if nonneg and la["in_qmax"] <= 127:  # u8 codes <= 127 times s8 weights: no 16-bit saturation
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
            ins = [f"{n}.xdq", f"{n}.wdq", f"{n}.bdq"]
            if t == "conv":
                k, p = int(la["kernel"]), int(la["pad"])
                nodes.append(helper.make_node("Conv", ins, [f"{n}.y"], kernel_shape=[k, k], pads=[p] * 4,
                                              strides=[int(la.get("stride", 1))] * 2))
            else:
                nodes.append(helper.make_node("Gemm", ins, [f"{n}.y"], transB=1))
            cur, nonneg = f"{n}.y", la["relu"]
            if la["relu"]:
                nodes.append(helper.make_node("Relu", [cur], [f"{n}.r"]))
                cur = f"{n}.r"
            if la["relu"] and i in nxt:
                # requantize in the kernel (u8, zero point 0: ReLU folds away), then saturate at the
                # next layer's qmax as our arithmetic does (u8 would only saturate at 255)
                nx = nxt[i]
                s_n = const(f"{n}.s_out", np.array(nx["in_scale"], np.float32))
                zp0 = const(f"{n}.zp_out", np.array(0, np.uint8))
                hi = const(f"{n}.hi", np.array(np.float32(nx["in_qmax"]) * np.float32(nx["in_scale"]), np.float32))
                lo = const(f"{n}.lo", np.array(0, np.float32))
                nodes += [helper.make_node("QuantizeLinear", [cur, s_n, zp0], [f"{n}.oq"]),
                          helper.make_node("DequantizeLinear", [f"{n}.oq", s_n, zp0], [f"{n}.odq"]),
                          helper.make_node("Clip", [f"{n}.odq", lo, hi], [f"{n}.oc"])]
                cur = f"{n}.oc"
        elif t == "maxpool":
            s = int(la["size"])
            nodes.append(helper.make_node("MaxPool", [cur], [f"{n}.y"], kernel_shape=[s, s],
                                          strides=[int(la["stride"])] * 2, ceil_mode=int(bool(la["ceil"]))))
            cur = f"{n}.y"
        elif t == "flatten":
            nodes.append(helper.make_node("Flatten", [cur], [f"{n}.y"], axis=1))
            cur = f"{n}.y"
        elif t == "dense_float":
            a = la["arrays"]
            nodes.append(helper.make_node("Gemm", [cur, const(f"{n}.w", a["w"].astype(np.float32)),
                                                   const(f"{n}.b", a["b"].astype(np.float32))], [f"{n}.y"], transB=1))
            cur, nonneg = f"{n}.y", la["relu"]
            if la["relu"]:
                nodes.append(helper.make_node("Relu", [cur], [f"{n}.r"]))
                cur = f"{n}.r"
        else:
            raise ValueError(f"layer type {t!r} has no ONNX mapping")
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
