"""What a number ran on: the CPU model, its ISA flags and the ISA oneDNN dispatches; AMX for oneDNN.

oneDNN (MXNet's kernels) picks its kernels from the CPU and ``DNNL_MAX_CPU_ISA`` (e.g. ``AVX2``
on an AVX-512 machine makes it behave like an AVX2-only one); ONNX Runtime's MLAS picks its
own from the CPU flags and ignores that variable. Float results differ in the last bits
between ISAs, so every record (``env.json``, ``benchmark.py``, ``compare.json``) carries these facts.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # u8 x s8 products summed in int32, no 16-bit saturation
AMX_ISA = "AVX512_CORE_AMX"  # oneDNN's name of the ISA with AMX tiles
# x86-64 Linux: the arch_prctl system call, its request for a permission, and the AMX tile-data state
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple:
    """``(model name, set of flags)`` from /proc/cpuinfo (``platform`` elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model or platform.machine(), flags


def isa_flags() -> list:
    """The ISA extensions of ``ISA_FLAGS`` this CPU reports."""
    return [f for f in ISA_FLAGS if f in _cpuinfo()[1]]


def has_vnni() -> bool:
    """Whether the CPU multiplies u8 by s8 with int32 sums (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return any(f in _cpuinfo()[1] for f in VNNI_FLAGS)


def has_amx() -> bool:
    """Whether the CPU has AMX tiles with int8 products, on x86-64 Linux (where ``enable_amx`` can ask for them)."""
    return {"amx_tile", "amx_int8"} <= _cpuinfo()[1] and sys.platform == "linux" and platform.machine() == "x86_64"


def onednn_vnni() -> bool:
    """Whether the ISA oneDNN dispatches (``onednn_isa``, so under ``DNNL_MAX_CPU_ISA`` too) has VNNI. Without
    it oneDNN's convolutions of int8 (signed) inputs run on weights scaled by 0.5, so on other codes than the
    ``onednn`` scheme's (``onednn.kernel_model`` computes them); uint8-input layers keep theirs."""
    isa = onednn_isa()
    return "DL Boost" in isa or "AMX" in isa


@functools.lru_cache(maxsize=1)
def enable_amx() -> bool:
    """Let oneDNN run its AMX int8 kernels in this process (Sapphire Rapids and later); whether it does.

    MXNet 1.9.1's oneDNN (v2.4) has AMX convolutions but dispatches them only under
    ``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX``, and it does not ask Linux (5.16+) for the tile state, without
    which an AMX instruction kills the process (SIGILL). This asks for it (``arch_prctl``), sets the
    variable for oneDNN's first primitive (oneDNN reads it once, then keeps its ISA) and removes it
    again, so child processes, which start without the permission, do not inherit it. Integer results
    are those of the AVX-512 VNNI kernels (int32 sums either way); float kernels are the same at this ISA.

    Nothing happens (False) without ``amx_tile``/``amx_int8`` in the CPU flags, outside x86-64 Linux, when
    ``DNNL_MAX_CPU_ISA`` is set (the user's cap wins; ``AVX512_CORE_BF16`` is oneDNN's default) or when
    MXNet was imported first (its ISA may already be fixed): import ``train_quantization`` before ``mxnet``.
    """
    if not has_amx() or "DNNL_MAX_CPU_ISA" in os.environ or "mxnet" in sys.modules:
        return False
    import ctypes

    try:
        granted = ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False
    if not granted:
        return False
    os.environ["DNNL_MAX_CPU_ISA"] = AMX_ISA
    try:
        import mxnet as mx

        x = mx.nd.ones((1, 1, 2, 2))
        mx.nd.Convolution(x, mx.nd.ones((1, 1, 1, 1)), kernel=(1, 1), num_filter=1, no_bias=True).wait_to_read()
    except (ImportError, OSError):  # the numpy engines run without MXNet (or with a broken one)
        return False
    finally:
        del os.environ["DNNL_MAX_CPU_ISA"]
    return True


_PROBE = ("import mxnet as mx; x = mx.nd.ones((1, 3, 8, 8)); w = mx.nd.ones((4, 3, 3, 3)); "
          "mx.nd.Convolution(x, w, kernel=(3, 3), num_filter=4, no_bias=True).wait_to_read()")


@functools.lru_cache(maxsize=1)
def onednn_isa() -> str:
    """The ISA oneDNN dispatches in this environment (its verbose line, from a child process that
    inherits ``DNNL_MAX_CPU_ISA``, or gets ``AVX512_CORE_AMX`` where ``enable_amx`` raised it here), or ``unknown``."""
    env = dict(os.environ, DNNL_VERBOSE="1", MKLDNN_VERBOSE="1")
    if amx_on():
        env["DNNL_MAX_CPU_ISA"] = AMX_ISA  # the probe runs float kernels only, which need no tile permission
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if ",cpu,isa:" in line:
            return line.split(",cpu,isa:", 1)[1].strip()
    return "unknown"


def openblas_coretype(flags: frozenset | None = None, cap: str | None = None) -> str:
    """The OpenBLAS kernel family for this CPU's flags under oneDNN's ISA cap ``DNNL_MAX_CPU_ISA`` (so a
    capped run gets the kernels a CPU of that ISA gets): ``SkylakeX`` (AVX-512 F/BW/DQ/VL), ``Haswell``
    (AVX2 + FMA), or "" (OpenBLAS's own detection).

    ``flags`` None: this CPU's; ``cap`` None: the environment's ("": no cap).

    >>> openblas_coretype(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}), "")
    'SkylakeX'
    >>> openblas_coretype(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}), "AVX2")
    'Haswell'
    >>> openblas_coretype(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}), "AVX512_CORE")
    'SkylakeX'
    >>> openblas_coretype(frozenset({"sse4_2"}), "")
    ''
    """
    flags = _cpuinfo()[1] if flags is None else flags
    cap = (os.environ.get("DNNL_MAX_CPU_ISA", "") if cap is None else cap).upper()
    below_avx2 = cap.startswith("SSE") or cap == "AVX"  # oneDNN's cap names: SSE41, AVX, AVX2, AVX2_VNNI, ...
    below_avx512 = below_avx2 or cap.startswith("AVX2")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags and not below_avx512:
        return "SkylakeX"
    avx2 = {"avx2", "fma"} <= flags and not below_avx2
    return "Haswell" if avx2 else ""


def int8_gemm_isa(flags: frozenset | None = None, cap: str | None = None) -> str:
    """The kernel of the numpy engines' int8 GEMM (``int8/igemm.py``) for this CPU's flags under
    ``DNNL_MAX_CPU_ISA`` (as ``openblas_coretype``): ``avx512_vnni``, ``avx2`` or ``scalar``.

    >>> vnni = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"})
    >>> [int8_gemm_isa(vnni, c) for c in ("", "AVX512_CORE_AMX", "AVX512_CORE", "AVX2")]
    ['avx512_vnni', 'avx512_vnni', 'avx2', 'avx2']
    >>> int8_gemm_isa(frozenset({"sse4_2"}), "")
    'scalar'
    """
    flags = _cpuinfo()[1] if flags is None else flags
    cap = (os.environ.get("DNNL_MAX_CPU_ISA", "") if cap is None else cap).upper()
    below_avx2 = cap.startswith("SSE") or cap == "AVX"
    below_vnni512 = below_avx2 or cap.startswith("AVX2") or cap == "AVX512_CORE"  # oneDNN: AVX512_CORE_VNNI and up
    if {"avx512bw", "avx512_vnni"} <= flags and not below_vnni512:
        return "avx512_vnni"
    return "avx2" if "avx2" in flags and not below_avx2 else "scalar"


def blas_core() -> str:
    """The kernel family of the OpenBLAS that runs the numpy engines' GEMMs (scipy's, else numpy's:
    ``openblas_get_corename``), or ``unknown``."""
    import ctypes

    try:
        import scipy.linalg.blas  # noqa: F401  (loads scipy's OpenBLAS, which the engines use when present)
        owner = "scipy"
    except ImportError:
        import numpy  # noqa: F401
        owner = "numpy"
    try:
        path = next(ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln and f"/{owner}" in ln)
        lib = ctypes.CDLL(path)
    except (OSError, StopIteration):
        return "unknown"
    for name in ("openblas_get_corename64_", "openblas_get_corename"):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return fn().decode()
    return "unknown"


def facts() -> dict:
    """The machine of a measurement: CPU model, ISA flags, the oneDNN ISA and its cap, core count,
    the OpenBLAS kernels of the numpy engines' GEMMs and ``OMP_NUM_THREADS`` (unset: MXNet picks its own
    count, one thread on the 2-CPU VMs measured; float results and speeds depend on it)."""
    return {"cpu": _cpuinfo()[0], "isa_flags": isa_flags(), "onednn_isa": onednn_isa(),
            "dnnl_max_cpu_isa": os.environ.get("DNNL_MAX_CPU_ISA"), "amx": amx_on(), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "openblas_core": blas_core(),
            "machine": platform.machine()}


def amx_on() -> bool:
    """Whether ``enable_amx`` switched AMX on in this process (the package's import made its one call;
    the answer is cached)."""
    return enable_amx()


def describe(f: dict) -> str:
    """One line for tables: ``AMD EPYC (avx2 avx512f ...; oneDNN: Intel AVX2; OMP threads: 2)``."""
    threads = f.get("omp_num_threads") or "default"
    blas = f"; OpenBLAS: {f['openblas_core']}" if f.get("openblas_core") else ""
    return (f"{f['cpu']} ({' '.join(f['isa_flags']) or 'no AVX2'}; oneDNN: {f['onednn_isa']}{blas}; "
            f"OMP threads: {threads})")
