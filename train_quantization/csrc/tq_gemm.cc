// Exact int8 GEMM for the numpy engines (plain C ABI, loaded with ctypes; no MXNet):
//
//   C[m][n] = sum_k A[m][k] * B[k][n]      A: int8 codes (M x K4), B: int8 weight codes, int32 C (M x ldc)
//
// B comes packed in panels of 32 columns, four consecutive k per column: Bp[panel][k/4][col][k%4]
// (tq_gemm.pack in int8/fastgemm.py), K4 = K rounded up to 4, A and B zero beyond K.
// Every product and sum is an integer in int32 (|a| <= 128, |b| <= 127, K <= 2**17), so any order
// gives the same C: the result equals the float64 reference exactly.
//
// Kernels, chosen at run time (isa argument: 2 AVX-512 VNNI, 1 AVX2, 0 scalar):
// * VNNI: VPDPBUSD multiplies u8 by s8 and sums four products into int32 without saturation. A signed
//   A is offset to u8 (a ^ 0x80 = a + 128) and 128 * colsum(B) is subtracted at the end.
// * AVX2: VPMADDUBSW (u8 x s8, pairs summed in int16 with saturation) then VPMADDWD by ones. A pair is at
//   most 2 * 128 * 127 = 32512 < 32767 when |a| <= 128 goes in as u8 and b's sign takes a's
//   (VPSIGNB; |b| <= 127 as weight codes are): no saturation, exact. Non-negative A skips VPSIGNB.
//
// tq_requantize: the integer engine's requantization (model.requantize, the reference) in one pass:
//   out = clip(round_half_even(acc * m0[c] / 2**k[c]), qmin, qmax),  c = the channel (last axis)
// with (p + 2**(k-1) - 1 + ((p >> k) & 1)) >> k for p = acc * m0 (|acc| < 2**31, 0 <= m0 < 2**31, 1 <= k <= 62).
//
// tq_quantize: the simulation's input quantization (engine.input_codes) written as bytes into the GEMM's
// channels-last input buffer: code = clip(rint(x / s), qmin, qmax) in the input's precision (float32 input:
// float32 division; float64: float64 division) and round half to even, as numpy computes it.
// tq_depthwise: a depthwise convolution (one filter per channel) on the channels-last buffer, int32 sums of
// int8 x int8 (or uint8 x int8) products: exact, vectorized over channels.
// tq_im2col: the GEMM's input rows from the channels-last buffer, one memcpy per kernel row (kw * C bytes).
// tq_epilogue: a layer's output from its int32 accumulators: acc + bias as int64 (integer engine), or
// double(acc) + double(bias), times scale[c] (simulation), then max(., 0) for a ReLU (numpy's maximum: -0.0 stays).
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <omp.h>

// Elementwise passes compiled for AVX-512, AVX2 and baseline x86-64 (chosen at load time; IEEE ops only)
#define TQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

static const int NR = 32;  // columns of a panel
static const int MC = 64;  // rows of A a thread works through per panel sweep (A block stays in L2)

// ---------------------------------------------------------------------------- AVX-512 VNNI
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void tile_vnni(const int8_t* a, int64_t lda, int mr, const int8_t* bp, int k4, int32_t* c, int64_t ldc,
                      bool signed_a, const int32_t* corr) {
  __m512i acc[8][2];
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi32(signed_a ? (int)0x80808080 : 0);
  for (int k = 0; k < k4; k += 4) {
    const __m512i b0 = _mm512_loadu_si512(bp + (int64_t)k * NR);
    const __m512i b1 = _mm512_loadu_si512(bp + (int64_t)k * NR + 64);
    for (int i = 0; i < 8; ++i) {
      if (i >= mr) break;
      int32_t q;
      std::memcpy(&q, a + i * lda + k, 4);
      const __m512i av = _mm512_xor_si512(_mm512_set1_epi32(q), flip);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b1);
    }
  }
  const __m512i c0 = signed_a ? _mm512_loadu_si512(corr) : _mm512_setzero_si512();
  const __m512i c1 = signed_a ? _mm512_loadu_si512(corr + 16) : _mm512_setzero_si512();
  for (int i = 0; i < mr; ++i) {
    _mm512_storeu_si512(c + i * ldc, _mm512_sub_epi32(acc[i][0], c0));
    _mm512_storeu_si512(c + i * ldc + 16, _mm512_sub_epi32(acc[i][1], c1));
  }
}

// ---------------------------------------------------------------------------- AVX2
__attribute__((target("avx2")))
static void tile_avx2(const int8_t* a, int64_t lda, int mr, const int8_t* bp, int k4, int32_t* c, int64_t ldc,
                      bool signed_a) {
  // 4 rows x 16 columns (half a panel) per pass: 8 accumulators of the 16 ymm registers
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256i acc[4][2];
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int k = 0; k < k4; k += 4) {
      const int8_t* b = bp + (int64_t)k * NR + half * 64;
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)b);
      const __m256i b1 = _mm256_loadu_si256((const __m256i*)(b + 32));
      for (int i = 0; i < 4; ++i) {
        if (i >= mr) break;
        int32_t q;
        std::memcpy(&q, a + i * lda + k, 4);
        const __m256i av = _mm256_set1_epi32(q);
        __m256i p0, p1;
        if (signed_a) {
          const __m256i ua = _mm256_abs_epi8(av);  // |-128| = 0x80 = 128 as u8
          p0 = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(b0, av));
          p1 = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(b1, av));
        } else {
          p0 = _mm256_maddubs_epi16(av, b0);
          p1 = _mm256_maddubs_epi16(av, b1);
        }
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(p0, ones));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(p1, ones));
      }
    }
    for (int i = 0; i < mr; ++i) {
      _mm256_storeu_si256((__m256i*)(c + i * ldc + half * 16), acc[i][0]);
      _mm256_storeu_si256((__m256i*)(c + i * ldc + half * 16 + 8), acc[i][1]);
    }
  }
}

// ---------------------------------------------------------------------------- scalar
static void tile_scalar(const int8_t* a, int64_t lda, int mr, const int8_t* bp, int k4, int32_t* c, int64_t ldc) {
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = 0;
      for (int k = 0; k < k4; ++k) s += (int32_t)a[i * lda + k] * bp[(int64_t)(k / 4) * NR * 4 + j * 4 + k % 4];
      c[i * ldc + j] = s;
    }
}

extern "C" int tq_gemm_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
  return 0;
}

// A: M x k4 (row stride lda), Bp: panels (npanels = ldc / 32), C: M x ldc. signed_a: A may hold negative
// codes; corr: 128 * colsum(B) (ldc values), used by the VNNI kernel for signed A. Returns 0, or -1 for a
// bad argument.
extern "C" int tq_gemm_s8(const int8_t* a, int64_t m, int64_t lda, int k4, const int8_t* bp, int64_t ldc, int32_t* c,
               int signed_a, const int32_t* corr, int isa, int threads) {
  if (k4 % 4 || ldc % NR || lda < k4 || isa < 0 || isa > tq_gemm_isa()) return -1;
  const int mr = isa == 2 ? 8 : 4;
  const int64_t npanel = ldc / NR, nblock = (m + MC - 1) / MC;
#pragma omp parallel for num_threads(threads > 0 ? threads : omp_get_num_procs()) schedule(static) \
    if (m * k4 * ldc >= (1 << 20))
  for (int64_t blk = 0; blk < nblock; ++blk) {
    const int64_t m0 = blk * MC, m1 = m0 + MC < m ? m0 + MC : m;
    for (int64_t p = 0; p < npanel; ++p) {
      const int8_t* b = bp + p * (int64_t)k4 * NR;
      for (int64_t i = m0; i < m1; i += mr) {
        const int rows = (int)(m1 - i < mr ? m1 - i : mr);
        int32_t* ct = c + i * ldc + p * NR;
        if (isa == 2)
          tile_vnni(a + i * lda, lda, rows, b, k4, ct, ldc, signed_a, corr + p * NR);
        else if (isa == 1)
          tile_avx2(a + i * lda, lda, rows, b, k4, ct, ldc, signed_a);
        else
          tile_scalar(a + i * lda, lda, rows, b, k4, ct, ldc);
      }
    }
  }
  return 0;
}

// acc, out: rows x channels (contiguous int64); m0, k: per channel. Returns 0, or -1 when an accumulator
// reaches 2**31 (the product would leave int64) or a shift is outside [1, 62].
// One row of tq_requantize (any CPU). Branch-free clamps: random codes make a branching clamp mispredict.
static int requantize_row(const int64_t* a, int64_t c0, int64_t channels, const int64_t* m0, const int64_t* k,
                          int64_t qmin, int64_t qmax, int64_t* o) {
  int bad = 0;
  for (int64_t c = c0; c < channels; ++c) {
    const int64_t v = a[c];
    bad |= v >= (int64_t(1) << 31) || v <= -(int64_t(1) << 31);
    const int64_t p = v * m0[c], sh = k[c];
    const int64_t q = (p + (int64_t(1) << (sh - 1)) - 1 + ((p >> sh) & 1)) >> sh;
    o[c] = std::min(std::max(q, qmin), qmax);
  }
  return bad;
}

// The same on AVX2, four channels a step. AVX2 has no per-lane arithmetic shift of int64 (VPSRAVQ is
// AVX-512), but it has the logical one (VPSRLVQ): for |t| < 2**62 + 2**61, (t + 2**62) >> k (unsigned) is
// floor(t / 2**k) + (2**62 >> k), nothing wraps. VPMULDQ multiplies the low int32 of each lane exactly (the
// accumulators are checked to fit int32, the multipliers are below 2**31).
__attribute__((target("avx2")))
static int requantize_row_avx2(const int64_t* a, int64_t channels, const int64_t* m0, const int64_t* k,
                               int64_t qmin, int64_t qmax, int64_t* o) {
  const __m256i bias = _mm256_set1_epi64x(int64_t(1) << 62), one = _mm256_set1_epi64x(1);
  const __m256i lo = _mm256_set1_epi64x(qmin), hi = _mm256_set1_epi64x(qmax);
  const __m256i top = _mm256_set1_epi64x((int64_t(1) << 31) - 1), bottom = _mm256_set1_epi64x(1 - (int64_t(1) << 31));
  __m256i bad = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c));
    bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi64(v, top), _mm256_cmpgt_epi64(bottom, v)));
    const __m256i p = _mm256_mul_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m0 + c)));
    const __m256i sh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + c));
    const __m256i off = _mm256_srlv_epi64(bias, sh);
    const __m256i fl = _mm256_sub_epi64(_mm256_srlv_epi64(_mm256_add_epi64(p, bias), sh), off);  // p >> sh
    const __m256i half = _mm256_sub_epi64(_mm256_sllv_epi64(one, _mm256_sub_epi64(sh, one)), one);
    const __m256i t = _mm256_add_epi64(_mm256_add_epi64(p, half), _mm256_and_si256(fl, one));
    __m256i q = _mm256_sub_epi64(_mm256_srlv_epi64(_mm256_add_epi64(t, bias), sh), off);
    q = _mm256_blendv_epi8(q, lo, _mm256_cmpgt_epi64(lo, q));
    q = _mm256_blendv_epi8(q, hi, _mm256_cmpgt_epi64(q, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), q);
  }
  return !_mm256_testz_si256(bad, bad) | requantize_row(a, c, channels, m0, k, qmin, qmax, o);
}

extern "C" int tq_requantize(const int64_t* acc, int64_t rows, int64_t channels, const int64_t* m0, const int64_t* k,
                  int64_t qmin, int64_t qmax, int64_t* out, int threads) {
  for (int64_t c = 0; c < channels; ++c)
    if (k[c] < 1 || k[c] > 62 || m0[c] < 0 || m0[c] >= (int64_t(1) << 31)) return -1;
  const bool avx2 = __builtin_cpu_supports("avx2");
  int bad = 0;
#pragma omp parallel for num_threads(threads > 0 ? threads : omp_get_num_procs()) reduction(| : bad) \
    if (rows * channels >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    bad |= avx2 ? requantize_row_avx2(acc + r * channels, channels, m0, k, qmin, qmax, out + r * channels)
                : requantize_row(acc + r * channels, 0, channels, m0, k, qmin, qmax, out + r * channels);
  return bad ? -1 : 0;
}

// One pixel's c channels: x at element stride xs, out at byte stride os.
template <typename T>
static inline void quantize_run(const T* x, int64_t xs, uint8_t* o, int64_t os, int64_t c, float scale, float lo,
                                float hi) {
  const T s = (T)scale, l = (T)lo, h = (T)hi;  // T: the input's precision (the scale is exact in both)
  for (int64_t k = 0; k < c; ++k) {
    T q = std::nearbyint(x[k * xs] / s);
    q = q < l ? l : q > h ? h : q;
    o[k * os] = (uint8_t)(int32_t)q;
  }
}

template <typename T>
TQ_CLONES static void quantize_rows(const T* x, const int64_t* shape, const int64_t* xs, float scale, float lo,
                                    float hi, uint8_t* out, const int64_t* os, int64_t r0, int64_t r1) {
  const int64_t h = shape[2], w = shape[3], c = shape[1];
  for (int64_t r = r0; r < r1; ++r) {  // r = (image, row)
    const int64_t i = r / h, y = r % h;
    for (int64_t z = 0; z < w; ++z) {
      const T* xp = x + i * xs[0] + y * xs[2] + z * xs[3];
      uint8_t* o = out + i * os[0] + y * os[2] + z * os[3];
      if (xs[1] == 1 && os[1] == 1)  // channels contiguous on both sides: the loop vectorizes
        quantize_run(xp, 1, o, 1, c, scale, lo, hi);
      else
        quantize_run(xp, xs[1], o, os[1], c, scale, lo, hi);
    }
  }
}

// x: float32 or float64 (x_f64) with logical shape (n, c, h, w) and element strides xs; out: bytes at byte
// strides os over the same logical shape.
extern "C" int tq_quantize(const void* x, int x_f64, const int64_t* shape, const int64_t* xs, float scale, int64_t qmin,
                int64_t qmax, uint8_t* out, const int64_t* os, int threads) {
  const int64_t rows = shape[0] * shape[2];
  const int nt = rows * shape[1] * shape[3] >= (1 << 16) ? (threads > 0 ? threads : omp_get_num_procs()) : 1;
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t r0 = rows * t / k, r1 = rows * (t + 1) / k;
    if (x_f64)
      quantize_rows((const double*)x, shape, xs, scale, (float)qmin, (float)qmax, out, os, r0, r1);
    else
      quantize_rows((const float*)x, shape, xs, scale, (float)qmin, (float)qmax, out, os, r0, r1);
  }
  return 0;
}

// acc: m x n int32 (row stride ldc); bias: n int32 (zeros for none); scale: n doubles (simulation) or null
// (integer: out_i). out: m x n contiguous. double(acc) + double(bias) is exact (below 2**32).
TQ_CLONES static void epilogue_rows_f(const int32_t* acc, int64_t r0, int64_t r1, int64_t n, int64_t ldc,
                                      const int32_t* bias, const double* scale, int relu, double* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* a = acc + r * ldc;
    double* o = out + r * n;
    if (relu) {
      for (int64_t j = 0; j < n; ++j) {
        const double f = ((double)a[j] + (double)bias[j]) * scale[j];
        o[j] = f < 0 ? 0.0 : f;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) o[j] = ((double)a[j] + (double)bias[j]) * scale[j];
    }
  }
}

TQ_CLONES static void epilogue_rows_i(const int32_t* acc, int64_t r0, int64_t r1, int64_t n, int64_t ldc,
                                      const int32_t* bias, int relu, int64_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* a = acc + r * ldc;
    int64_t* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = (int64_t)a[j] + (int64_t)bias[j];
      o[j] = relu && v < 0 ? 0 : v;
    }
  }
}

extern "C" int tq_epilogue(const int32_t* acc, int64_t m, int64_t n, int64_t ldc, const int32_t* bias, const double* scale,
                int relu, double* out_f, int64_t* out_i, int threads) {
  const int nt = m * n >= (1 << 16) ? (threads > 0 ? threads : omp_get_num_procs()) : 1;
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t r0 = m * t / k, r1 = m * (t + 1) / k;
    if (scale)
      epilogue_rows_f(acc, r0, r1, n, ldc, bias, scale, relu, out_f);
    else
      epilogue_rows_i(acc, r0, r1, n, ldc, bias, relu, out_i);
  }
  return 0;
}

// buf: (n, hp, wp, c) bytes, contiguous; cols: (n * ho * wo, kh * kw * c).
extern "C" int tq_im2col(const uint8_t* buf, int64_t n, int64_t hp, int64_t wp, int64_t c, int kh, int kw,
                         int stride, int64_t ho, int64_t wo, uint8_t* cols, int threads) {
  const int64_t rows = n * ho, run = kw * c, k = kh * run;
  const int nt = rows * wo * k >= (1 << 16) ? (threads > 0 ? threads : omp_get_num_procs()) : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / ho, y = r % ho;
    for (int64_t z = 0; z < wo; ++z) {
      uint8_t* dst = cols + (r * wo + z) * k;
      for (int a = 0; a < kh; ++a)
        std::memcpy(dst + a * run, buf + ((i * hp + y * stride + a) * wp + z * stride) * c, run);
    }
  }
  return 0;
}

template <typename T>
TQ_CLONES static void depthwise_rows(const T* buf, int64_t hp, int64_t wp, int64_t c, int kh, int kw, int stride,
                                     int64_t ho, int64_t wo, const int8_t* w, int32_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {  // r = (image, output row)
    const int64_t i = r / ho, y = r % ho;
    for (int64_t z = 0; z < wo; ++z) {
      int32_t* o = out + (r * wo + z) * c;
      for (int64_t k = 0; k < c; ++k) o[k] = 0;
      for (int a = 0; a < kh; ++a)
        for (int b = 0; b < kw; ++b) {
          const T* x = buf + ((i * hp + y * stride + a) * wp + z * stride + b) * c;
          const int8_t* f = w + (a * kw + b) * c;
          for (int64_t k = 0; k < c; ++k) o[k] += (int32_t)x[k] * (int32_t)f[k];
        }
    }
  }
}

// buf: (n, hp, wp, c) int8 (or uint8 codes: unsigned_a), w: (kh * kw, c) int8, out: (n * ho * wo, c) int32.
extern "C" int tq_depthwise(const void* buf, int64_t n, int64_t hp, int64_t wp, int64_t c, int kh, int kw,
                            int stride, int64_t ho, int64_t wo, const int8_t* w, int unsigned_a, int32_t* out,
                            int threads) {
  const int64_t rows = n * ho;
  const int nt = rows * wo * c * kh * kw >= (1 << 18) ? (threads > 0 ? threads : omp_get_num_procs()) : 1;
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t r0 = rows * t / k, r1 = rows * (t + 1) / k;
    if (unsigned_a)
      depthwise_rows((const uint8_t*)buf, hp, wp, c, kh, kw, stride, ho, wo, w, out, r0, r1);
    else
      depthwise_rows((const int8_t*)buf, hp, wp, c, kh, kw, stride, ho, wo, w, out, r0, r1);
  }
  return 0;
}
