"""ONNX export of an ``Int8Model`` as a QDQ graph, run by ONNX Runtime's int8 kernels.

Each quantized layer becomes ``DequantizeLinear -> Conv|Gemm (-> Relu) -> QuantizeLinear``, which
ONNX Runtime fuses into one QLinearConv/QGemm: int8 weights, our int32 bias, our learned scales.
Codes travel between layers as uint8 tensors holding exactly our codes:

* a tensor that is a ReLU output (``Int8Model.nonneg``) with zero point 0: the producer's kernel
  requantizes it to the reader's scale (the ReLU folds away), then ``Clip`` on the uint8 codes
  saturates them at the reader's ``in_qmax`` (127 in the original scheme: uint8 alone would stop at
  255); max pooling and flatten run on the codes;
* a signed tensor (the network input, a conv without ReLU) with zero point 128: codes -128..127
  are 0..255, with the same saturation.

The producer quantizes for its reader when that is the only reader (through max pooling and
flatten); otherwise each reader quantizes the float tensor itself. A residual add quantizes both
branches to its scale and adds the dequantized values (the ``onednn`` scheme's add: the body in
float plus the shortcut's codes).

**Targets** (``target``, recorded in the file's metadata): where an input reaches codes above 127
(zero point 128, or the onednn scheme's uint8), ``avx2`` stores uint8 weights with zero point 128
(u8 x u8 kernels, exact on every x86 CPU: the u8 x s8 kernels of CPUs without VNNI add pairs of
products in int16 and saturate) and ``vnni`` int8 weights (u8 x s8, the fast kernels of AVX-512
VNNI, AVX-VNNI and AMX, exact there). Inputs with codes <= 127 take int8 weights in both. The
default ``auto`` is ``vnni`` on a CPU with VNNI, else ``avx2``. Measured (tests/test_onnx.py):
logits equal to the simulated engine's to float rounding, but for codes within float rounding
of a rounding tie (ONNX Runtime requantizes in float32).

Activations below 8 bits cannot be expressed by QuantizeLinear's 8-bit saturation, so those
models are refused (the simulated and integer-only engines run them). Opset 13 (per-axis
DequantizeLinear).

Optional dependencies (see README, Install): ``onnx==1.14.1`` and
``pip install --no-deps onnxruntime==1.17.3`` (its wheels declare numpy>=1.24.2 but run with
MXNet's numpy 1.23.5).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import UserError
from ..quant import shuffle_permutation
from .model import Add, Affine, AvgPool, Concat, Conv, Dense, DenseFloat, Flatten, Int8Model, MaxPool, Shuffle, Slice

OPSET = 13
TARGETS = ("auto", "avx2", "vnni")
INSTALL = ("pip install onnx==1.14.1 && pip install --no-deps onnxruntime==1.17.3 coloredlogs flatbuffers "
           "sympy packaging")
PASS_CODES = (MaxPool, Flatten, Slice, Shuffle)  # run on uint8 codes unchanged


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


def resolve_target(target: str = "auto") -> str:
    """``auto`` -> ``vnni`` on a CPU with VNNI (or AMX), else ``avx2``."""
    if target not in TARGETS:
        raise UserError(f"ONNX target must be one of {TARGETS}, got {target!r}")
    if target != "auto":
        return target
    from ..machine import has_vnni

    return "vnni" if has_vnni() else "avx2"


@dataclass(frozen=True)
class Grid:
    """uint8 codes ``q`` of a tensor ``x``: ``x = (q - zp) * scale``, ``q`` in ``[0, hi]``."""

    scale: float
    zp: int
    hi: int


@dataclass
class _Builder:
    """The graph under construction: nodes, initializers, and each layer's output tensor with its
    ``Grid`` (uint8 codes) or None (float)."""

    m: Int8Model
    target: str
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    out: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.readers, self.nonneg = self.m.readers(), self.m.nonneg()
        self.out[-1] = ("x", None)

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))  # keeps 0-d scalars 0-d
        return name

    def node(self, op: str, ins: list, out: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def grid(self, reader: int, source: int) -> Optional[Grid]:
        """The codes ``reader`` reads from ``source``'s output (None: it reads float)."""
        op = self.m.layers[reader]
        if isinstance(op, Add) and op.shortcut_only and source != op.inputs[1]:
            return None  # the onednn scheme's add reads the body unrequantized
        act = getattr(op, "act", None)
        if act is None:
            return None
        if self.nonneg[source]:
            return Grid(float(np.float32(act.scale)), 0, int(act.qmax))
        return Grid(float(np.float32(act.scale)), 128, 255)

    def reader_grid(self, i: int) -> Optional[Grid]:
        """The grid of the one quantizing reader of ``i``'s output (through max pooling and flatten)."""
        v = i
        while len(self.readers.get(v, [])) == 1:
            r = self.readers[v][0]
            if not isinstance(self.m.layers[r], PASS_CODES):
                return self.grid(r, i)
            v = r
        return None

    def quantize(self, n: str, tensor: str, g: Grid) -> str:
        s = self.const(f"{n}.s", np.array(g.scale, np.float32))
        z = self.const(f"{n}.zp", np.array(g.zp, np.uint8))
        q = self.node("QuantizeLinear", [tensor, s, z], f"{n}.q")
        if g.hi < 255:  # our grid saturates before uint8 does
            q = self.node("Clip", [q, self.const(f"{n}.lo", np.array(0, np.uint8)),
                                   self.const(f"{n}.hi", np.array(g.hi, np.uint8))], f"{n}.qc")
        return q

    def dequantize(self, n: str, codes: str, g: Grid) -> str:
        s = self.const(f"{n}.ds", np.array(g.scale, np.float32))
        z = self.const(f"{n}.dzp", np.array(g.zp, np.uint8))
        return self.node("DequantizeLinear", [codes, s, z], f"{n}.dq")

    def as_float(self, n: str, v: int) -> str:
        tensor, g = self.out[v]
        return tensor if g is None else self.dequantize(n, tensor, g)

    def as_grid(self, n: str, v: int, g: Grid) -> str:
        """``v``'s output as float values on grid ``g`` (DequantizeLinear of its codes)."""
        tensor, have = self.out[v]
        if have != g:
            tensor = self.quantize(n, self.as_float(f"{n}.f", v), g)
        return self.dequantize(n, tensor, g)

    def finish(self, i: int, tensor: str) -> None:
        """Store layer ``i``'s float output: its ReLU, then the quantization its only reader needs."""
        op, n = self.m.layers[i], f"l{i}"
        if getattr(op, "relu", False):
            tensor = self.node("Relu", [tensor], f"{n}.relu")
        g = self.reader_grid(i)
        self.out[i] = (tensor, None) if g is None else (self.quantize(f"{n}.out", tensor, g), g)


def _weights(b: _Builder, n: str, op: Conv | Dense, g: Grid) -> tuple:
    """Weight and bias DequantizeLinear outputs; uint8 weights (zero point 128) where inputs reach 255
    on the ``avx2`` target."""
    s_w = op.w_scale.astype(np.float32)
    if b.target == "avx2" and g.zp + op.act.qmax > 127:
        w, zp = (op.w.astype(np.int16) + 128).astype(np.uint8), np.full(len(s_w), 128, np.uint8)
    else:
        w, zp = op.w.astype(np.int8), np.zeros(len(s_w), np.int8)
    wdq = b.node("DequantizeLinear", [b.const(f"{n}.w", w), b.const(f"{n}.s_w", s_w), b.const(f"{n}.w_zp", zp)],
                 f"{n}.wdq", axis=0)
    s_b = (s_w * np.float32(op.act.scale)).astype(np.float32)
    bdq = b.node("DequantizeLinear", [b.const(f"{n}.b", op.b.astype(np.int32)), b.const(f"{n}.s_b", s_b),
                                      b.const(f"{n}.b_zp", np.zeros(len(s_w), np.int32))], f"{n}.bdq", axis=0)
    return wdq, bdq


def _conv_dense(b: _Builder, i: int, op: Conv | Dense) -> None:
    n, src = f"l{i}", op.inputs[0]
    g = b.grid(i, src)
    x = b.as_grid(f"{n}.in", src, g)
    if isinstance(op, Dense) and isinstance(b.m.layers[src], AvgPool):  # Gemm takes 2-D input
        x = b.node("Flatten", [x], f"{n}.flat", axis=1)
    wdq, bdq = _weights(b, n, op, g)
    if isinstance(op, Conv):
        y = b.node("Conv", [x, wdq, bdq], f"{n}.y", kernel_shape=[int(op.kernel)] * 2, pads=[int(op.pad)] * 4,
                   strides=[int(op.stride)] * 2, group=int(op.groups))
    else:
        y = b.node("Gemm", [x, wdq, bdq], f"{n}.y", transB=1)
    b.finish(i, y)


def _add(b: _Builder, i: int, op: Add) -> None:
    n, (src_a, src_b) = f"l{i}", op.inputs
    ga = b.grid(i, src_a)
    a = b.as_float(f"{n}.a", src_a) if ga is None else b.as_grid(f"{n}.a", src_a, ga)
    b.finish(i, b.node("Add", [a, b.as_grid(f"{n}.b", src_b, b.grid(i, src_b))], f"{n}.y"))


def _pass_codes(onnx_op: str, **attrs: Callable) -> Callable:
    """Max pooling and flatten: on the codes when the input holds codes (the grid passes through)."""
    def emit(b: _Builder, i: int, op: MaxPool | Flatten) -> None:
        tensor, g = b.out[op.inputs[0]]
        b.out[i] = (b.node(onnx_op, [tensor], f"l{i}.y", **{k: f(op) for k, f in attrs.items()}), g)
    return emit


def _avgpool(b: _Builder, i: int, op: AvgPool) -> None:
    src = op.inputs[0]
    x = b.as_float(f"l{i}.in", src) if op.act is None else b.as_grid(f"l{i}.in", src, b.grid(i, src))
    b.finish(i, b.node("GlobalAveragePool", [x], f"l{i}.y"))


def _concat(b: _Builder, i: int, op: Concat) -> None:
    ins = [b.as_grid(f"l{i}.{k}", src, b.grid(i, src)) for k, src in enumerate(op.inputs)]
    b.finish(i, b.node("Concat", ins, f"l{i}.y", axis=1))


def _gather(index: Callable) -> Callable:
    """Slice and channel shuffle: a Gather of channels, on codes when the input holds codes."""
    def emit(b: _Builder, i: int, op: Slice | Shuffle) -> None:
        tensor, g = b.out[op.inputs[0]]
        idx = b.const(f"l{i}.idx", np.asarray(index(op), np.int64))
        b.out[i] = (b.node("Gather", [tensor, idx], f"l{i}.y", axis=1), g)
    return emit


def _affine(b: _Builder, i: int, op: Affine) -> None:
    x = b.as_float(f"l{i}.in", op.inputs[0])
    shape = (-1, 1, 1)  # per channel of NCHW
    y = b.node("Mul", [x, b.const(f"l{i}.a", op.scale.astype(np.float32).reshape(shape))], f"l{i}.ax")
    b.finish(i, b.node("Add", [y, b.const(f"l{i}.b", op.shift.astype(np.float32).reshape(shape))], f"l{i}.y"))


def _dense_float(b: _Builder, i: int, op: DenseFloat) -> None:
    x = b.as_float(f"l{i}.in", op.inputs[0])
    b.finish(i, b.node("Gemm", [x, b.const(f"l{i}.w", op.w.astype(np.float32)),
                                b.const(f"l{i}.b", op.b.astype(np.float32))], f"l{i}.y", transB=1))


EMIT = {  # op type -> how it becomes ONNX nodes
    Conv: _conv_dense,
    Dense: _conv_dense,
    Add: _add,
    MaxPool: _pass_codes("MaxPool", kernel_shape=lambda op: [int(op.size)] * 2, strides=lambda op: [int(op.stride)] * 2,
                         ceil_mode=lambda op: int(bool(op.ceil))),
    Flatten: _pass_codes("Flatten", axis=lambda op: 1),
    AvgPool: _avgpool,
    Concat: _concat,
    Slice: _gather(lambda op: np.arange(op.begin, op.end)),
    Shuffle: _gather(lambda op: shuffle_permutation(op.channels, op.groups)),
    Affine: _affine,
    DenseFloat: _dense_float,
}


def build_qdq(m: Int8Model, target: str = "auto") -> Any:
    """The ``onnx.ModelProto`` of ``m`` (input ``x``: normalized float32 NCHW, output ``logits``) for
    ``target`` (``auto``, ``avx2`` or ``vnni``, see the module docstring; recorded in the metadata)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    low = [op.name for op in m.layers if getattr(op, "act", None) is not None and op.act.bits < 8]
    if low:
        raise UserError(f"ONNX Runtime runs 8-bit activations only; layers {low} use fewer bits. "
                        "Use sim_int8_infer.py --engine sim|integer for this model")
    b = _Builder(m, resolve_target(target))
    for i, op in enumerate(m.layers):
        if type(op) not in EMIT:
            raise ValueError(f"op type {op.type!r} has no ONNX mapping")
        EMIT[type(op)](b, i, op)
    b.node("Identity", [b.as_float("logits", len(m.layers) - 1)], "logits")
    c, h, w = m.input_shape
    graph = helper.make_graph(b.nodes, "train_quantization_qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(m.classes)])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="train-quantization")
    model.ir_version = 8
    helper.set_model_props(model, {"train_quantization.target": b.target, "train_quantization.scheme": m.scheme})
    onnx.checker.check_model(model)
    return model


def target_of(model: Any) -> str:
    """The target a QDQ model was exported for (its metadata), ``unknown`` for other files."""
    if isinstance(model, (str, Path)):
        model = _onnx().load(str(model))
    return {p.key: p.value for p in model.metadata_props}.get("train_quantization.target", "unknown")


def save_qdq(m: Int8Model, path: str | Path, target: str = "auto") -> Path:
    """Write the QDQ model for ``target`` to ``path`` (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(build_qdq(m, target).SerializeToString())
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

    from ..layers import stock_relu6

    onnx = _onnx()
    path = Path(path)
    with stock_relu6(net), tempfile.TemporaryDirectory() as d:
        net(mx.nd.zeros((1, *input_shape)))
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
