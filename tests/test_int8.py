"""Int8 export, the float-simulated and integer-only engines, and the artifact."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import mxnet as mx
import numpy as np
import pytest

from conftest import FLOAT_TOL, layerwise_codes, top1_agreement
from train_quantization import machine
from train_quantization.errors import UserError
from train_quantization.int8 import engine, igemm
from train_quantization.int8 import model as int8_model
from train_quantization.int8.export import export


@pytest.fixture(scope="module")
def int8(qat_run, tiny_ds):
    mean, std = tiny_ds.mean_std()
    return export(qat_run["net"], mean, std, (3, 16, 16), tiny_ds.classes)


def test_multiplier_decomposition_error_and_rounding():
    rng = np.random.default_rng(0)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(50.0), 10000))
    m0, shift = int8_model.quantize_multiplier(m)
    assert m0.dtype == np.int32 and np.all(m0 >= 2**30) and np.all(m0.astype(np.int64) < 2**31)
    approx = m0.astype(np.float64) * np.exp2(shift.astype(np.float64) - 31)
    assert np.max(np.abs(approx - m) / m) <= 2.0**-31
    # ties round half to even, both signs; non-ties to nearest
    p = np.array([6, 10, 14, -6, -10, -14, 7, -7, 9], np.int64)  # /4: 1.5 2.5 3.5 -1.5 -2.5 -3.5 1.75 -1.75 2.25
    assert int8_model.rounding_shift(p, np.int64(2)).tolist() == [2, 2, 4, -2, -2, -4, 2, -2, 2]
    # requantize: exact multiplier 0.5 -> ties, and saturation at both ends
    m0, sh = int8_model.quantize_multiplier(np.array([0.5]))
    acc = np.array([[1, 3, 5, -1, -3, 1000, -1000]], np.int64)
    out = int8_model.requantize(acc, m0, sh, -128, 127, channel_axis=0)
    assert out.tolist() == [[0, 2, 2, 0, -2, 127, -128]]


def test_rounding_shift_is_exact_half_to_even_at_every_shift():
    rng = np.random.default_rng(2)
    for k in range(1, 63):
        lim = max(1, min(50, 2**max(0, 61 - k)))  # ties (q + 1/2) * 2**k within |p| < 2**62
        ties = (rng.integers(-lim, lim, 100, dtype=np.int64) << k) + (1 << (k - 1)) * rng.integers(-1, 2, 100)
        p = np.concatenate([rng.integers(-2**62 + 1, 2**62 - 1, 300, dtype=np.int64), ties])
        ref = []
        for v in p.tolist():  # Python integers: q + 1 above half, and at half from an odd quotient
            q, r = divmod(v, 2**k)
            ref.append(q + (2 * r > 2**k or (2 * r == 2**k and q % 2 == 1)))
        assert int8_model.rounding_shift(p, np.int64(k)).tolist() == ref, k


def test_exact_gemm_chunks_bound_every_partial_sum_by_the_weights_l1():
    """One chunk where ``max|a| * sum|b|`` of every column stays within 2**24 (the max-based bound would
    cut 4,608 terms in five); inputs with the weights' signs reach the bound and the sum stays exact; larger
    weights make more chunks, each within the bound."""
    k = 4608
    b = np.full((k, 2), 28.0, np.float32)
    b[::3, 0] = -28.0
    b[:, 1] = -b[:, 0]  # 128 * 28 * 4608 = 16,515,072 <= 2**24
    a = np.stack([128 * np.sign(b[:, 0]), -128 * np.sign(b[:, 0])]).astype(np.float32)
    assert engine.exact_chunks(b, 128) == [0, k]
    ref = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float64)
    assert np.abs(ref).max() == 128 * 28 * k and np.array_equal(engine.exact_gemm(a, b, [0, k]), ref)
    b[:30, 0] = 127.0
    chunks = engine.exact_chunks(b, 128)
    assert len(chunks) == 3 and all(128 * np.abs(b[i:j]).sum(axis=0).max() <= 2**24 for i, j in zip(chunks, chunks[1:]))
    a[0] = 128 * np.sign(b[:, 0])
    ref = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float64)
    assert ref[0, 0] > 2**24 and np.array_equal(engine.exact_gemm(a, b, chunks), ref)


def needs_kernel(kernel: str) -> None:
    if kernel == "int8" and not igemm.available():
        pytest.skip("the int8 GEMM did not build (g++ missing?); the engines use float32 BLAS")


@pytest.mark.parametrize("kernel", engine.KERNELS)
def test_integer_gemms_equal_int64_gemms(kernel):
    needs_kernel(kernel)
    rng = np.random.default_rng(1)
    for lo, hi, stride, k in ((-128, 128, 1, 3), (0, 128, 2, 3), (0, 256, 1, 3), (-128, 128, 2, 1)):
        x = rng.integers(lo, hi, (2, 5, 6, 6))
        w = rng.integers(-127, 128, (4, 5, k, k))
        got = engine.conv2d_int(x, w, pad=k // 2, stride=stride, kernel=kernel, bias=np.arange(4) - 2**30)
        xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
        ref = np.zeros(got.shape, np.int64)
        for i in range(got.shape[2]):
            for j in range(got.shape[3]):
                win = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
                ref[:, :, i, j] = np.einsum("ncij,ocij->no", win, w.astype(np.int64)) + np.arange(4) - 2**30
        assert got.dtype == np.float64 and np.array_equal(got, ref.astype(np.float64)), (lo, stride, k)
    a, b = rng.integers(-128, 128, (7, 300)), rng.integers(-127, 128, (9, 300))
    ref = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.float64)
    assert np.array_equal(engine.dense_int(a, b, kernel), ref)


def test_int8_gemm_kernels_against_int64():
    """Every kernel this CPU has (scalar, AVX2, AVX-512 VNNI) equals int64 products on tails of every dimension
    (M, N, K off their block sizes), the extreme codes (-128 x +-127: the AVX2 kernel's pairs reach 32,512)
    and, with VNNI, uint8 codes up to 255."""
    if not igemm.available():
        pytest.skip("the int8 GEMM did not build (g++ missing?)")
    rng = np.random.default_rng(3)
    have = list(igemm.ISA_CODES)[:igemm.ISA_CODES[machine.int8_gemm_isa(cap="")] + 1]
    for m, k, n in ((1, 1, 1), (13, 27, 33), (130, 4608, 70)):
        b = rng.integers(-127, 128, (k, n))
        b[:, 0] = 127 * np.where(np.arange(k) % 2, 1, -1)
        p = igemm.pack(b)
        for kernel in have:
            for dtype, lo, hi in ((np.int8, -128, 128), (np.int8, 0, 128), (np.uint8, 0, 256)):
                if dtype == np.uint8 and kernel != "avx512_vnni":
                    continue
                a = rng.integers(lo, hi, (m, k))
                a[0] = -128 if lo < 0 else hi - 1  # times +-127 in column 0
                got = igemm.gemm(igemm.pad_k(a.astype(dtype), p.k4), p, signed=lo < 0, kernel=kernel)
                assert np.array_equal(got, a @ b), (m, k, n, kernel, lo, hi)
    assert igemm.gemm(igemm.pad_k(np.full((1, 4608), -128, np.int8), 4608), igemm.pack(np.full((4608, 1), 127)),
                      signed=True)[0, 0] == -128 * 127 * 4608
    # weight code -128 (the onednn scheme's grid): exact on VNNI and scalar, refused by AVX2's sign trick
    b, a = np.full((64, 3), -128), np.full((2, 64), -128)
    p = igemm.pack(b)
    a8 = igemm.pad_k(a.astype(np.int8), p.k4)
    for kernel in have:
        if kernel == "avx2":
            assert not igemm.supports(p, kernel)
            with pytest.raises(ValueError, match="-128"):
                igemm.gemm(a8, p, signed=True, kernel=kernel)
        else:
            assert igemm.supports(p, kernel)
            assert np.array_equal(igemm.gemm(a8, p, signed=True, kernel=kernel), a @ b)
    with pytest.raises(ValueError, match="weight codes"):
        igemm.pack(np.full((4, 1), 128))


@pytest.mark.parametrize("size,stride,ceil", [(2, 2, False), (3, 2, True), (3, 2, False), (3, 1, False)])
def test_max_pooling_against_a_direct_loop(size, stride, ceil):
    rng = np.random.default_rng(6)
    for x in (rng.integers(-128, 128, (2, 3, 7, 7)), rng.normal(size=(2, 3, 7, 7)).transpose(0, 2, 3, 1).copy()
              .transpose(0, 3, 1, 2)):  # codes, and floats in a channels-last layout
        got = engine.maxpool(x, size, stride, ceil)
        ho = -(-(7 - size) // stride) + 1 if ceil else (7 - size) // stride + 1
        want = np.array([[[[x[i, c, a * stride:a * stride + size, b * stride:b * stride + size].max()
                            for b in range(ho)] for a in range(ho)] for c in range(3)] for i in range(2)])
        assert got.dtype == x.dtype and np.array_equal(got, want), (size, stride, ceil)


def test_compiled_requantization_equals_the_reference():
    """``igemm.requantize`` against ``model.requantize`` (int64 numpy): random accumulators, exact ties of both
    signs at every shift, saturation at both ends; None (the reference's business) beyond int32 or for a
    multiplier of 2**30 or more (a shift below 1)."""
    if not igemm.available():
        pytest.skip("the int8 GEMM library did not build (g++ missing?)")
    rng = np.random.default_rng(4)
    mult = np.exp(rng.uniform(np.log(2.0**-31), np.log(0.999), 64))
    m0, sh = int8_model.quantize_multiplier(mult)
    acc = rng.integers(-2**31 + 1, 2**31, (500, 64))
    k = (31 - sh).astype(np.int64)
    ties = (rng.integers(-1000, 1000, (50, 64)) * 2 + 1) * (np.int64(1) << (k - 1)) // m0  # p near q + 1/2
    acc = np.concatenate([acc, np.clip(ties, -2**31 + 1, 2**31 - 1), -acc[:5]])
    for qmin, qmax in ((-128, 127), (0, 255), (-8, 7)):
        want = int8_model.requantize(acc, m0, sh, qmin, qmax)
        assert np.array_equal(igemm.requantize(acc, m0, sh, qmin, qmax), want)
        # 7 channels: one vector step (AVX2: 4 channels) and a scalar tail of 3
        assert np.array_equal(igemm.requantize(acc[:, 3:10], m0[3:10], sh[3:10], qmin, qmax), want[:, 3:10])
    exact = np.array([[6, 10, -6, -10]]) * (1 << 20)  # / 2**22: 1.5 2.5 -1.5 -2.5 -> 2 2 -2 -2
    m0, sh = int8_model.quantize_multiplier(np.array([2.0**-22]))
    assert igemm.requantize(exact, m0, sh, -128, 127).tolist() == [[2, 2, -2, -2]]
    assert igemm.requantize(np.array([[2**31]]), m0, sh, -128, 127) is None
    for big in (2**31, -2**31):  # beyond int32 inside a vector step too
        assert igemm.requantize(np.array([[0, 0, big, 0]]), *int8_model.quantize_multiplier(np.full(4, 0.5)),
                                -128, 127) is None
    assert igemm.requantize(np.array([[3]]), *int8_model.quantize_multiplier(np.array([4.0])), -128, 127) == 12
    assert igemm.requantize(np.array([[3]]), *int8_model.quantize_multiplier(np.array([2.0**31])), -128, 127) is None


def test_compiled_quantization_equals_numpy_in_the_inputs_precision():
    """``igemm.quantize_into`` against ``engine.input_codes`` on values exactly half-way between two codes (of
    float64; float32 rounds them to either side), both signs, both bounds, into a strided channels-last view:
    float32 input divides in float32, float64 input in float64 (where a tie rounds half to even)."""
    if not igemm.available():
        pytest.skip("the int8 GEMM library did not build (g++ missing?)")
    rng = np.random.default_rng(5)
    grid = int8_model.InGrid(float(np.float32(0.0371)), -128, 127)
    x = (rng.integers(-140, 140, (3, 8, 5, 5)) + rng.choice([0.0, 0.5], (3, 8, 5, 5))) * grid.scale
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        buf = np.zeros((3, 7, 7, 12), np.int8)
        inner = buf[:, 1:6, 1:6, :8].transpose(0, 3, 1, 2)  # (N, C, H, W) view of a padded NHWC buffer
        igemm.quantize_into(xd, grid.scale, grid.qmin, grid.qmax, inner)
        want = engine.input_codes(grid, xd)
        assert np.array_equal(inner, want) and want.min() == -128 and want.max() == 127
        assert not buf[:, 0].any() and not buf[..., 8:].any()  # the padding stays zero
    ties = np.abs(x / grid.scale % 1 - 0.5) < 1e-9
    codes = engine.input_codes(grid, x)[ties]
    assert ties.sum() > 100 and ((codes % 2 == 0) | (np.abs(codes) >= 127)).all()
    assert (engine.input_codes(grid, x.astype(np.float32))[ties] != codes).sum() >= 5  # 17


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_s16_pairs_saturate_each_pair_of_input_channels(kind):
    """oneDNN's u8 x s8 kernels without VNNI: ``sum_k sat16(x_2k w_2k + x_2k+1 w_2k+1)`` per kernel tap,
    against an int64 reference over every pair (an odd last channel pairs with zero)."""
    rng = np.random.default_rng(5)
    c = 5
    x = rng.integers(0, 256, (3, c, 6, 6)).astype(np.float32)
    w = rng.integers(-128, 128, (4, c, 3, 3)).astype(np.int8)
    w[:2, :2] = 127  # channels 0 and 1 of outputs 0 and 1: pairs up to 255 * 254
    w[2, :2] = -128
    grid = int8_model.InGrid(0.1, 0, 255)
    common = dict(name="l", inputs=[-1], act=grid, w_scale=np.ones(4), b=np.arange(4, dtype=np.int32),
                  b_float=np.zeros(4, np.float32))
    if kind == "dense":
        x, w = x[:, :, 2, 2], w[:, :, 1, 1]
        op = int8_model.Dense(w=w, **common)
        cols = x[:, None, :, None]  # (N, positions, C, taps)
        wt = w[:, :, None]
    else:
        op = int8_model.Conv(w=w, kernel=3, pad=1, stride=2, **common)
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        cols = np.stack([xp[:, :, i:i + 6:2, j:j + 6:2] for i in range(3) for j in range(3)], -1)  # N C 3 3 9
        cols = cols.transpose(0, 2, 3, 1, 4).reshape(3, 9, c, 9)
        wt = w.reshape(4, c, 9)
    prod = cols[:, :, None].astype(np.int64) * wt[None, None].astype(np.int64)  # N, P, O, C, taps
    prod = np.concatenate([prod, np.zeros_like(prod[:, :, :, :1])], 3)  # C even
    want = np.clip(prod[:, :, :, 0:c:2] + prod[:, :, :, 1:c + 1:2], -32768, 32767).sum((3, 4)) + op.b
    plain = engine._accumulate(op, x, "reference", None)
    sat = engine._accumulate(dataclasses.replace(op, s16_pairs=True), x, "reference", None)
    if kind == "conv":
        sat, plain = (a.transpose(0, 2, 3, 1).reshape(3, 9, 4) for a in (sat, plain))
    assert np.array_equal(sat.reshape(want.shape), want)
    assert (plain != sat).sum() >= 3 and np.all(plain[..., 0] >= sat.reshape(plain.shape)[..., 0])


def test_float32_accumulation_would_be_wrong_but_ours_is_exact():
    # a 3x3 conv over 512 channels: 4,608 products of up to 127*128, near 2**26 in all
    x = np.full((1, 512, 3, 3), 127.0)
    w = np.full((1, 512, 3, 3), 127.0)
    w[0, 0, 0, 0] = 126  # make the sum odd: float32 cannot hold an odd integer above 2**24
    exact = int((x.astype(np.int64) * w.astype(np.int64)).sum())
    assert exact > 2**24 and exact % 2 == 1
    f32 = np.float32(0)
    for v in (x * w).astype(np.float32).ravel():
        f32 = np.float32(f32 + v)
    assert int(f32) != exact  # sequential float32 accumulation rounds
    got = engine.conv2d_int(x, w, pad=0)
    assert got.shape == (1, 1, 1, 1) and int(got[0, 0, 0, 0]) == exact


def test_sim_and_integer_engines_give_the_same_codes(int8, tiny_ds):
    """Layer by layer on identical inputs: the first layer's codes are the same float32 arithmetic in
    both engines, so they are equal; later layers requantize with a fixed-point multiplier (relative
    error 2**-31) instead of a float64 division, so a code may differ by one step where the value
    lies within 2**-31 of a tie: measured 0 of the 6.6 million codes here and of the 204 million of
    every model of the tests, AVX2 and AVX-512 oneDNN (a float32 division parted on up to 16 of these
    6.6 million); the bound is 1e-6 of the codes."""
    rng = np.random.default_rng(3)
    x = engine.normalize(int8, tiny_ds.test_x) + rng.normal(0, 0.2, (len(tiny_ds.test_x), 3, 16, 16)).astype(np.float32)
    ref, got = layerwise_codes(int8, x, engine.simulate, engine.run_integer)
    names = list(ref)
    assert len(names) == 15 and np.array_equal(ref[names[0]], got[names[0]])
    for name in names:
        assert np.abs(ref[name] - got[name]).max() <= 1, name
    diff = sum(int((ref[n] != got[n]).sum()) for n in names)
    assert diff <= 1e-6 * sum(ref[n].size for n in names), diff
    # free-running, a flipped code moves later layers: top-1 still equal on every decided image
    assert top1_agreement(engine.simulate(int8, x), engine.run_integer(int8, x)) >= 0.995
    with pytest.raises(ValueError, match="precision must be float64 or float32"):
        engine.simulate(int8, x, precision="float16")


def test_engines_match_fake_quant_on_the_synthetic_set(int8, qat_run, tiny_ds):
    """The simulation computes the fake-quant graph's codes in float64 (MXNet: float32 convolutions), the
    integer engine with fixed-point requantization: top-1 equal on the decided images (measured: all
    of them, 18 models x 2 oneDNN ISAs); logits equal to float rounding on most images (measured 98.5-100 %:
    a code on a near-tie moves the rest)."""
    sim = engine.predict(int8, tiny_ds.test_x, "sim")
    integer = engine.predict(int8, tiny_ds.test_x, "integer")
    fq = qat_run["logits"]
    assert top1_agreement(sim, fq) >= 0.995 and top1_agreement(sim, integer) >= 0.995
    for other in (fq, integer):
        close = np.abs(other - sim).max(1) <= FLOAT_TOL * np.maximum(1.0, np.abs(sim).max(1))
        assert close.mean() >= 0.97, close.mean()


def test_artifact_roundtrip_size_and_errors(int8, tiny_ds, tmp_path):
    path = int8_model.save(int8, tmp_path / "m.npz")
    back = int8_model.load(path)
    assert [op.name for op in back.layers] == [op.name for op in int8.layers]
    for a, b in zip(int8.layers, back.layers):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if isinstance(va, np.ndarray):
                assert np.array_equal(va, vb) and va.dtype == vb.dtype
            else:
                assert va == vb, f.name
    x = engine.normalize(int8, tiny_ds.test_x[:20])
    assert np.array_equal(engine.run_integer(int8, x), engine.run_integer(back, x))
    assert back.layers[0].w.dtype == np.int8 and back.layers[0].b.dtype == np.int32
    # truncated file
    raw = path.read_bytes()
    bad = tmp_path / "cut.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated"):
        int8_model.load(bad)
    # wrong format version
    header = json.loads(bytes(np.load(path)["header"]).decode())
    header["version"] = 99
    arrays = dict(np.load(path))
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(UserError, match="version 99"):
        int8_model.load(tmp_path / "v99.npz")
    # earlier format versions keep loading: 3 (the same layer dicts) and 1 (a sequential list, no inputs)
    for version in (3, 1):
        old = json.loads(bytes(np.load(path)["header"]).decode())
        old["version"] = version
        for layer in old["layers"] if version == 1 else []:
            del layer["inputs"]
        arrays["header"] = np.frombuffer(json.dumps(old).encode(), np.uint8)
        np.savez(tmp_path / f"v{version}.npz", **arrays)
        back = int8_model.load(tmp_path / f"v{version}.npz")
        assert [op.inputs for op in back.layers] == [op.inputs for op in int8.layers]
        assert np.array_equal(engine.run_integer(back, x), engine.run_integer(int8, x))
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(UserError, match="not an int8 artifact"):
        int8_model.load(tmp_path / "foreign.npz")


def test_artifact_is_at_most_026_of_float_params(tmp_path):
    """On a real-size network (VGG16 width 0.25, CIFAR shape) the artifact is ~1/4 the .params."""
    from train_quantization.config import ModelConfig, QuantConfig
    from train_quantization.layers import quantized_layers
    from train_quantization.models import build_model

    fnet = build_model(ModelConfig(width=0.25), 10, 3, 32)
    fnet.initialize(mx.init.Xavier())
    fnet(mx.nd.zeros((1, 3, 32, 32)))
    fnet.save_parameters(str(tmp_path / "f.params"))
    qnet = build_model(ModelConfig(width=0.25), 10, 3, 32, QuantConfig(per_channel=True))
    qnet.load_parameters(str(tmp_path / "f.params"), allow_missing=True)
    for _, layer in quantized_layers(qnet):
        layer.input_max.initialize(init=mx.init.Constant(4.0))
    m = export(qnet, (0.5,) * 3, (0.25,) * 3, (3, 32, 32), [str(i) for i in range(10)])
    size = int8_model.artifact_size(int8_model.save(m, tmp_path / "m.npz"))
    ratio = size / (tmp_path / "f.params").stat().st_size
    assert 0.15 < ratio <= 0.26


def test_a_new_op_is_one_dataclass_and_one_handler_per_engine(qat_run, tiny_ds, tmp_path, monkeypatch):
    """A toy op (a Gluon block that halves its input, placed before the classifier): its dataclass, one
    export handler, one numpy-engine handler, one ONNX handler; then it saves, loads and runs everywhere."""
    from dataclasses import dataclass

    import mxnet as mx
    from mxnet.gluon import nn

    from train_quantization.int8 import export as export_mod
    from train_quantization.int8 import onnx_export

    @dataclass
    class Half:
        type: ClassVar[str] = "half"
        name: str
        inputs: list

    class HalfBlock(nn.HybridBlock):
        def hybrid_forward(self, F, x):  # noqa: ANN001
            return x * 0.5

    monkeypatch.setitem(int8_model.OPS, "half", Half)
    monkeypatch.setattr(export_mod, "EXPORT", [((HalfBlock,), lambda g, b, src, path: g.emit(Half(path, [src])))]
                        + export_mod.EXPORT)
    monkeypatch.setitem(engine.RUN, Half, lambda r, op, ins: (_half(ins[0][0]), ins[0][1]))
    monkeypatch.setitem(onnx_export.EMIT, Half, lambda b, i, op: b.finish(i, b.node(
        "Mul", [b.as_float(f"l{i}.in", op.inputs[0]), b.const(f"l{i}.k", np.array(0.5, np.float32))], f"l{i}.y")))

    def _half(a: np.ndarray) -> np.ndarray:
        assert a.dtype.kind == "f"  # float data after the last max pool (a float op between quantized layers)
        return a * 0.5

    net = qat_run["net"]
    net.classifier._children["0"] = nn.HybridSequential()
    net.classifier._children["0"].add(HalfBlock(), nn.Flatten())
    net.hybridize(static_alloc=True)
    try:
        m = export(net, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
        fq = net(mx.nd.array(engine.normalize(m, tiny_ds.test_x[:100]))).asnumpy()
    finally:
        net.classifier._children["0"] = nn.Flatten()
        net.hybridize(static_alloc=True)
    assert [op.type for op in m.layers].count("half") == 1
    back = int8_model.load(int8_model.save(m, tmp_path / "h.npz"))
    x = engine.normalize(m, tiny_ds.test_x[:100])
    sim = back.simulate(x)
    assert top1_agreement(sim, fq) >= 0.99 and not np.allclose(sim, qat_run["logits"][:100], atol=1e-3)
    ort = onnx_export.runner(onnx_export.session(back.to_onnx(target="avx2")))(x)
    assert top1_agreement(sim, ort) >= 0.99


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_kernels_equal_the_reference_code_for_code(float_run, tiny_ds, bits):
    """The int8 GEMM and float32 GEMMs over exact chunks vs float64 GEMMs: identical codes at every layer and
    identical logits, in both engines, at 8 and 4 bits (per-channel weights: per-channel maxima differ)."""
    from conftest import tiny_config
    from train_quantization import cli

    cfg = tiny_config(float_run["run"].parent, weight_bits=bits, act_bits=bits, per_channel=True)
    net, _ = cli.qat_from_float(cfg, tiny_ds, float_run["run"] / "best.params", [mx.cpu()])
    net.hybridize(static_alloc=True)
    x = engine.normalize(export(net, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes), tiny_ds.test_x[:200])
    with mx.autograd.train_mode():
        net(mx.nd.array(x))  # ranges from one batch
    m = export(net, *tiny_ds.mean_std(), (3, 16, 16), tiny_ds.classes)
    kernels = ["float32"] + (["int8"] if igemm.available() else [])
    for run in (engine.simulate, engine.run_integer):
        ref = {}
        lr = run(m, x, ref, kernel="reference")
        for kernel in kernels:
            fast = {}
            lf = run(m, x, fast, kernel=kernel)
            assert all(np.array_equal(fast[n], ref[n]) for n in ref) and np.array_equal(lf, lr), kernel
    big = np.full((1, 512, 3, 3), 127.0)  # one output sums 4,608 products: five float32 chunks
    for kernel in kernels:
        w = np.full((1, 512, 3, 3), -128.0)  # beyond int8 weights: the int8 kernel hands over to float32
        assert engine.conv2d_int(big, w, 0, kernel=kernel)[0, 0, 0, 0] == -127 * 128 * 4608
        assert engine.conv2d_int(-big - 1, w + 1, 0, kernel=kernel)[0, 0, 0, 0] == 128 * 127 * 4608
