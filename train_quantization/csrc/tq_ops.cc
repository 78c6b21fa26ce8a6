// Fused quantizers for MXNet 1.9 (loaded with mx.library.load).
//
// tq_act_quant(x, state, flag) -> (y, scale), mutates state:
//   if flag > 0 (training):  b = max|x|;  state = state > 0 ? m*state + (1-m)*b : b
//   scale = (state > 0 ? state : 1) / divisor
//   y = clip(round_half_even(x / scale), qmin, qmax) * scale
// Backward: dy passes unchanged (ste=plain) or masked where x/scale is outside
// [qmin, qmax] (ste=clipped).
//
// tq_weight_quant(w, gamma, beta, mean, var, s_a) -> (w_q, b_q): the BatchNorm fold and the
// weight and bias fake quantization of a QConv2DBN in one pass over the weights:
//   inv = gamma / sqrt(var + eps)   (float64, rounded to float32, with mxnet_arithmetic=1)
//   w_f = w * inv[c],  b_f = beta - mean * inv
//   m = max|w_f| (per tensor or per output channel c),  s_w = m > 0 ? m / divisor : 1
//   w_q = clip(round_half_even(w_f / s_w), qmin, qmax) * s_w   (w_f * divisor/m with mxnet_arithmetic=1)
//   b_q = clip(round_half_even(b_f / (s_w * s_a)), -bias_qmax, bias_qmax) * (s_w * s_a)
// Backward (straight through the rounding, through the fold): dw = dw_f * inv[c],
// dbeta = db_f, dgamma = (sum_k dw_f * w - db_f * mean) / sqrt(var + eps); dw_f, db_f are
// dw_q, db_q (masked outside the clip range with ste=clipped). No gradient to mean, var, s_a.
//
// tq_relu6(x) -> y: y = x > 6 ? 6 : (x < 0 ? 0 : x), the value of MXNet's clip(x, 0, 6); backward
// dx = (x > 6 || x < 0) ? 0 : dy, clip's gradient. MXNet's clip branches per element, which a ReLU6's
// half-negative inputs mispredict (about 3x the time of a pass over memory); these loops compile to blends.
//
// tq_lsq_quant(x, step) -> y: LSQ (Esser et al. 2019) with the step learned; step has one entry (per
// tensor) or one per entry of x's first axis (per output channel):
//   u = clip(x / s, qmin, qmax),  y = round_half_even(u) * s
// Backward, as the stock graph of quant.lsq_fake_quant: dx = (dy * s) * (1 / s) where qmin <= x/s <= qmax, else 0;
//   ds = g * sum(dy * (round(u) - x/s)) inside, g * sum(dy * round(u)) at the bounds (summed in float64).
//
// Every forward step is float32 arithmetic in the same order as the stock-op graph in
// quant.py/layers.py, so both paths give bit-identical outputs; gradients sum in another
// order. Library ops do not see is_train (hence the flag input) and ignore req (gradients are
// written, not accumulated).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>
#include <omp.h>
#include "mxnet/lib_api.h"

using namespace mxnet::ext;

static const float kMagic = 12582912.0f;  // 1.5 * 2**23, as quant.MAGIC
static const int64_t kSerialBelow = 1 << 15;  // small tensors: a thread team costs more than it saves

static int n_threads() {
  const char* e = std::getenv("OMP_NUM_THREADS");
  int n = e ? std::atoi(e) : 0;
  return n > 0 ? n : omp_get_num_procs();
}

static float attr_f(const std::unordered_map<std::string, std::string>& a, const char* k) {
  return std::stof(a.at(k));
}

// Parse-time checks shared by the ops: the attributes each needs, and float32 in and out.
static MXReturnValue need_attrs(const char* op, const std::unordered_map<std::string, std::string>& attrs,
                                std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (!attrs.count(k)) {
      MX_ERROR_MSG << op << " needs attribute " << k;
      return MX_FAIL;
    }
  return MX_SUCCESS;
}

static MXReturnValue float32_only(const char* op, std::vector<int>* in, std::vector<int>* out) {
  for (int t : *in)
    if (t != kFloat32) {
      MX_ERROR_MSG << op << " supports float32 only";
      return MX_FAIL;
    }
  for (int& t : *out) t = kFloat32;
  return MX_SUCCESS;
}

static float round_clip(float u, float lo, float hi) {
  u = u < lo ? lo : (u > hi ? hi : u);
  return (u + kMagic) - kMagic;  // half to even, exact for |u| <= 2**22 (-ffp-contract=off, no -ffast-math)
}

// Elementwise kernels over one block, compiled for AVX-512, AVX2 and baseline x86-64 (chosen at load
// time): the same IEEE operations (no FMA: -ffp-contract=off), so the same bits on every CPU.
static const int64_t kBlock = 1 << 14;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TQ_CLONES
#endif

TQ_CLONES static float abs_max(const float* x, int64_t n) {
  float b = 0.0f;
#pragma omp simd reduction(max : b)
  for (int64_t i = 0; i < n; ++i) b = std::max(b, std::fabs(x[i]));
  return b;
}

TQ_CLONES static void fake_quant(const float* x, float* y, int64_t n, float s, float qmin, float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = round_clip(x[i] / s, qmin, qmax) * s;
}

TQ_CLONES static void clipped_ste(const float* dy, const float* x, float* dx, int64_t n, float s, float qmin,
                                  float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i] / s;
    dx[i] = (u >= qmin && u <= qmax) ? dy[i] : 0.0f;
  }
}

MXReturnValue act_forward(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& res) {
  const float* x = inputs->at(0).data<float>();
  float* state = inputs->at(1).data<float>();
  const float flag = inputs->at(2).data<float>()[0];
  float* y = outputs->at(0).data<float>();
  float* scale_out = outputs->at(1).data<float>();
  const int64_t n = inputs->at(0).size();
  const double m = std::stod(attrs.at("momentum"));
  const float qmin = attr_f(attrs, "qmin"), qmax = attr_f(attrs, "qmax");
  const float divisor = attr_f(attrs, "divisor");
  const int nt = n_threads();
  float st = state[0];
  if (flag > 0.5f) {
    float b = 0.0f;
#pragma omp parallel for num_threads(nt) reduction(max : b) if (n >= kSerialBelow)
    for (int64_t j = 0; j < n; j += kBlock) b = std::max(b, abs_max(x + j, std::min(kBlock, n - j)));
    volatile float a1 = static_cast<float>(m) * st;  // volatile: no fused multiply-add
    volatile float a2 = static_cast<float>(1.0 - m) * b;
    st = st > 0.0f ? a1 + a2 : b;
    state[0] = st;
  }
  const float s = (st > 0.0f ? st : 1.0f) / divisor;
  scale_out[0] = s;
#pragma omp parallel for num_threads(nt) if (n >= kSerialBelow)
  for (int64_t j = 0; j < n; j += kBlock) fake_quant(x + j, y + j, std::min(kBlock, n - j), s, qmin, qmax);
  return MX_SUCCESS;
}

MXReturnValue act_backward(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& res) {
  // inputs: dy, dscale, x, state, flag, y, scale; outputs: dx, dstate, dflag
  const float* dy = inputs->at(0).data<float>();
  const float* x = inputs->at(2).data<float>();
  const float s = inputs->at(6).data<float>()[0];
  float* dx = outputs->at(0).data<float>();
  const int64_t n = inputs->at(2).size();
  const bool clipped = attrs.count("ste") && attrs.at("ste") == "clipped";
  const float qmin = attr_f(attrs, "qmin"), qmax = attr_f(attrs, "qmax");
  const int nt = n_threads();
#pragma omp parallel for num_threads(nt) if (n >= kSerialBelow)
  for (int64_t j = 0; j < n; j += kBlock) {
    const int64_t len = std::min(kBlock, n - j);
    if (clipped)
      clipped_ste(dy + j, x + j, dx + j, len, s, qmin, qmax);
    else
      std::memcpy(dx + j, dy + j, len * sizeof(float));
  }
  outputs->at(1).data<float>()[0] = 0.0f;
  outputs->at(2).data<float>()[0] = 0.0f;
  return MX_SUCCESS;
}

MXReturnValue act_parse(const std::unordered_map<std::string, std::string>& attrs,
                        int* num_in, int* num_out) {
  *num_in = 3;
  *num_out = 2;
  return need_attrs("tq_act_quant", attrs, {"momentum", "qmin", "qmax", "divisor"});
}

MXReturnValue act_type(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<int>* in, std::vector<int>* out) {
  return float32_only("tq_act_quant", in, out);
}

MXReturnValue act_shape(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<std::vector<unsigned int>>* in,
                        std::vector<std::vector<unsigned int>>* out) {
  out->at(0) = in->at(0);
  out->at(1) = std::vector<unsigned int>{1};
  return MX_SUCCESS;
}

MXReturnValue act_mutate(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* idx) {
  idx->push_back(1);
  return MX_SUCCESS;
}

REGISTER_OP(tq_act_quant)
    .setForward(act_forward, "cpu")
    .setBackward(act_backward, "cpu")
    .setParseAttrs(act_parse)
    .setInferType(act_type)
    .setInferShape(act_shape)
    .setMutateInputs(act_mutate);

// ---------------------------------------------------------------- tq_weight_quant
struct WeightAttrs {
  float qmin, qmax, divisor, eps_f, bias_qmax;
  double eps;
  bool per_channel, mxnet_arithmetic, clipped;
};

static WeightAttrs weight_attrs(const std::unordered_map<std::string, std::string>& a) {
  WeightAttrs w;
  w.qmin = attr_f(a, "qmin");
  w.qmax = attr_f(a, "qmax");
  w.divisor = attr_f(a, "divisor");
  w.eps = std::stod(a.at("eps"));
  w.eps_f = static_cast<float>(w.eps);
  w.bias_qmax = attr_f(a, "bias_qmax");
  w.per_channel = a.at("per_channel") == "1";
  w.mxnet_arithmetic = a.at("mxnet_arithmetic") == "1";
  w.clipped = a.count("ste") && a.at("ste") == "clipped";
  return w;
}

// gamma / sqrt(var + eps) as the stock graph computes it (quant.fold_bn)
static float fold_inv(const WeightAttrs& a, float gamma, float var) {
  if (a.mxnet_arithmetic)
    return static_cast<float>(static_cast<double>(gamma) / std::sqrt(static_cast<double>(var) + a.eps));
  return gamma / std::sqrt(var + a.eps_f);
}

// Each output channel's max|w_f| (the layer's maximum in every entry when per tensor); writes w_f to wf
// unless it is null.
static std::vector<float> fold_maxima(const WeightAttrs& a, const float* w, const float* gamma, const float* var,
                                      int64_t c_n, int64_t k_n, float* wf) {
  std::vector<float> m(c_n);
#pragma omp parallel for num_threads(n_threads()) if (c_n * k_n >= kSerialBelow)
  for (int64_t c = 0; c < c_n; ++c) {
    const float inv = fold_inv(a, gamma[c], var[c]);
    float mx = 0.0f;
    for (int64_t k = 0; k < k_n; ++k) {
      const float f = w[c * k_n + k] * inv;
      if (wf) wf[c * k_n + k] = f;
      mx = std::max(mx, std::fabs(f));
    }
    m[c] = mx;
  }
  if (!a.per_channel) std::fill(m.begin(), m.end(), *std::max_element(m.begin(), m.end()));
  return m;
}

// What is rounded, as quant.weight_ratio: w_f / s_w, or w_f * (divisor / max) with mxnet_arithmetic.
struct ChannelScale {
  float s, mult;
  ChannelScale(const WeightAttrs& a, float m)
      : s(m > 0.0f ? m / a.divisor : 1.0f), mult(m > 0.0f ? a.divisor / m : 1.0f) {}
  float ratio(const WeightAttrs& a, float f) const { return a.mxnet_arithmetic ? f * mult : f / s; }
};

MXReturnValue weight_forward(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  const WeightAttrs a = weight_attrs(attrs);
  const float* w = inputs->at(0).data<float>();
  const float *gamma = inputs->at(1).data<float>(), *beta = inputs->at(2).data<float>();
  const float *mean = inputs->at(3).data<float>(), *var = inputs->at(4).data<float>();
  const float s_a = inputs->at(5).data<float>()[0];
  float* wq = outputs->at(0).data<float>();
  float* bq = outputs->at(1).data<float>();
  const int64_t c_n = inputs->at(1).size(), k_n = inputs->at(0).size() / c_n;
  const std::vector<float> m = fold_maxima(a, w, gamma, var, c_n, k_n, wq);  // wq holds w_f until rounded
#pragma omp parallel for num_threads(n_threads()) if (c_n * k_n >= kSerialBelow)
  for (int64_t c = 0; c < c_n; ++c) {
    const ChannelScale cs(a, m[c]);
    for (int64_t k = 0; k < k_n; ++k) {
      float& f = wq[c * k_n + k];
      f = round_clip(cs.ratio(a, f), a.qmin, a.qmax) * cs.s + 0.0f;  // the stock graph adds (w_f - w_f): -0 -> +0
    }
    const float b_f = beta[c] - mean[c] * fold_inv(a, gamma[c], var[c]);
    const float s_b = cs.s * s_a;
    bq[c] = round_clip(b_f / s_b, -a.bias_qmax, a.bias_qmax) * s_b + 0.0f;
  }
  return MX_SUCCESS;
}

MXReturnValue weight_backward(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  // inputs: dw_q, db_q, w, gamma, beta, mean, var, s_a, w_q, b_q
  // outputs: dw, dgamma, dbeta, dmean, dvar, ds_a
  const WeightAttrs a = weight_attrs(attrs);
  const float *dwq = inputs->at(0).data<float>(), *dbq = inputs->at(1).data<float>();
  const float* w = inputs->at(2).data<float>();
  const float *gamma = inputs->at(3).data<float>(), *mean = inputs->at(5).data<float>();
  const float* var = inputs->at(6).data<float>();
  const float s_a = inputs->at(7).data<float>()[0];
  float *dw = outputs->at(0).data<float>(), *dgamma = outputs->at(1).data<float>();
  float* dbeta = outputs->at(2).data<float>();
  const int64_t c_n = inputs->at(3).size(), k_n = inputs->at(2).size() / c_n;
  // ste=clipped needs the scales again (recomputed: the op's outputs do not carry them)
  const std::vector<float> m =
      a.clipped ? fold_maxima(a, w, gamma, var, c_n, k_n, nullptr) : std::vector<float>(c_n);
#pragma omp parallel for num_threads(n_threads()) if (c_n * k_n >= kSerialBelow)
  for (int64_t c = 0; c < c_n; ++c) {
    const float inv = fold_inv(a, gamma[c], var[c]);
    const ChannelScale cs(a, m[c]);
    double dinv = 0.0;
    for (int64_t k = 0; k < k_n; ++k) {
      const int64_t i = c * k_n + k;
      float g = dwq[i];
      if (a.clipped) {
        const float u = cs.ratio(a, w[i] * inv);
        g = (u >= a.qmin && u <= a.qmax) ? g : 0.0f;
      }
      dw[i] = g * inv;
      dinv += static_cast<double>(g) * w[i];
    }
    float db = dbq[c];
    if (a.clipped) {
      const float b_f = inputs->at(4).data<float>()[c] - mean[c] * inv;
      const float u = b_f / (cs.s * s_a);
      db = (u >= -a.bias_qmax && u <= a.bias_qmax) ? db : 0.0f;
    }
    dinv -= static_cast<double>(db) * mean[c];
    dbeta[c] = db;
    dgamma[c] = static_cast<float>(dinv / std::sqrt(static_cast<double>(var[c]) + a.eps));
  }
  for (int j = 3; j < 6; ++j)
    for (int64_t i = 0; i < outputs->at(j).size(); ++i) outputs->at(j).data<float>()[i] = 0.0f;
  return MX_SUCCESS;
}

MXReturnValue weight_parse(const std::unordered_map<std::string, std::string>& attrs,
                           int* num_in, int* num_out) {
  *num_in = 6;
  *num_out = 2;
  return need_attrs("tq_weight_quant", attrs,
                    {"qmin", "qmax", "divisor", "eps", "bias_qmax", "per_channel", "mxnet_arithmetic"});
}

MXReturnValue weight_type(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<int>* in, std::vector<int>* out) {
  return float32_only("tq_weight_quant", in, out);
}

MXReturnValue weight_shape(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  if (in->at(0).empty() || in->at(1).size() != 1 || in->at(0)[0] != in->at(1)[0]) {
    MX_ERROR_MSG << "tq_weight_quant: weight (C, ...) and gamma (C,) must agree";
    return MX_FAIL;
  }
  out->at(0) = in->at(0);
  out->at(1) = in->at(1);
  return MX_SUCCESS;
}

REGISTER_OP(tq_weight_quant)
    .setForward(weight_forward, "cpu")
    .setBackward(weight_backward, "cpu")
    .setParseAttrs(weight_parse)
    .setInferType(weight_type)
    .setInferShape(weight_shape);

// ---------------------------------------------------------------- tq_relu6
TQ_CLONES static void relu6_fwd(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = v > 6.0f ? 6.0f : (v < 0.0f ? 0.0f : v);
  }
}

TQ_CLONES static void relu6_bwd(const float* dy, const float* x, float* dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = (x[i] > 6.0f || x[i] < 0.0f) ? 0.0f : dy[i];
}

MXReturnValue relu6_forward(const std::unordered_map<std::string, std::string>& attrs,
                            std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                            const OpResource& res) {
  const float* x = inputs->at(0).data<float>();
  float* y = outputs->at(0).data<float>();
  const int64_t n = inputs->at(0).size();
#pragma omp parallel for num_threads(n_threads()) if (n >= kSerialBelow)
  for (int64_t j = 0; j < n; j += kBlock) relu6_fwd(x + j, y + j, std::min(kBlock, n - j));
  return MX_SUCCESS;
}

MXReturnValue relu6_backward(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  // inputs: dy, x, y; outputs: dx
  const float* dy = inputs->at(0).data<float>();
  const float* x = inputs->at(1).data<float>();
  float* dx = outputs->at(0).data<float>();
  const int64_t n = inputs->at(1).size();
#pragma omp parallel for num_threads(n_threads()) if (n >= kSerialBelow)
  for (int64_t j = 0; j < n; j += kBlock) relu6_bwd(dy + j, x + j, dx + j, std::min(kBlock, n - j));
  return MX_SUCCESS;
}

MXReturnValue relu6_parse(const std::unordered_map<std::string, std::string>& attrs, int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue relu6_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in, std::vector<int>* out) {
  return float32_only("tq_relu6", in, out);
}

MXReturnValue relu6_shape(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  out->at(0) = in->at(0);
  return MX_SUCCESS;
}

REGISTER_OP(tq_relu6)
    .setForward(relu6_forward, "cpu")
    .setBackward(relu6_backward, "cpu")
    .setParseAttrs(relu6_parse)
    .setInferType(relu6_type)
    .setInferShape(relu6_shape);

// ---------------------------------------------------------------- tq_lsq_quant
// dx over one block; returns the block's part of ds before the scale g (see the header)
TQ_CLONES static double lsq_bwd(const float* dy, const float* x, float* dx, int64_t n, float s, float qmin,
                                float qmax) {
  const float inv_s = 1.0f / s;
  double ds = 0.0;
#pragma omp simd reduction(+ : ds)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] / s;
    const bool inside = v >= qmin && v <= qmax;
    const float u = inside ? v : (v < qmin ? qmin : qmax);
    const float r = (u + kMagic) - kMagic;
    dx[i] = inside ? (dy[i] * s) * inv_s : 0.0f;  // MXNet's elemwise_div gradient: * (1 / s)
    ds += static_cast<double>(dy[i]) * (inside ? static_cast<double>(r) - static_cast<double>(v) : r);
  }
  return ds;
}

MXReturnValue lsq_forward(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& res) {
  const float* x = inputs->at(0).data<float>();
  const float* step = inputs->at(1).data<float>();
  float* y = outputs->at(0).data<float>();
  const float qmin = attr_f(attrs, "qmin"), qmax = attr_f(attrs, "qmax");
  const int64_t c_n = inputs->at(1).size(), per = inputs->at(0).size() / c_n;
  const int64_t blocks = (per + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(n_threads()) if (c_n * per >= kSerialBelow)
  for (int64_t t = 0; t < c_n * blocks; ++t) {
    const int64_t c = t / blocks, j = (t % blocks) * kBlock, off = c * per + j;
    fake_quant(x + off, y + off, std::min(kBlock, per - j), step[c], qmin, qmax);  // the EMA quantizer's kernel
  }
  return MX_SUCCESS;
}

MXReturnValue lsq_backward(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& res) {
  // inputs: dy, x, step, y; outputs: dx, dstep
  const float* dy = inputs->at(0).data<float>();
  const float* x = inputs->at(1).data<float>();
  const float* step = inputs->at(2).data<float>();
  float *dx = outputs->at(0).data<float>(), *dstep = outputs->at(1).data<float>();
  const float qmin = attr_f(attrs, "qmin"), qmax = attr_f(attrs, "qmax");
  const double g = std::stod(attrs.at("g"));
  const int64_t c_n = inputs->at(2).size(), per = inputs->at(1).size() / c_n;
  const int64_t blocks = (per + kBlock - 1) / kBlock;
  std::vector<double> part(c_n * blocks);
#pragma omp parallel for num_threads(n_threads()) if (c_n * per >= kSerialBelow)
  for (int64_t t = 0; t < c_n * blocks; ++t) {
    const int64_t c = t / blocks, j = (t % blocks) * kBlock, off = c * per + j;
    part[t] = lsq_bwd(dy + off, x + off, dx + off, std::min(kBlock, per - j), step[c], qmin, qmax);
  }
  for (int64_t c = 0; c < c_n; ++c) {  // block sums in a fixed order: the same bits on any thread count
    double ds = 0.0;
    for (int64_t b = 0; b < blocks; ++b) ds += part[c * blocks + b];
    dstep[c] = static_cast<float>(ds * g);
  }
  return MX_SUCCESS;
}

MXReturnValue lsq_parse(const std::unordered_map<std::string, std::string>& attrs, int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return need_attrs("tq_lsq_quant", attrs, {"qmin", "qmax", "g"});
}

MXReturnValue lsq_type(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<int>* in, std::vector<int>* out) {
  return float32_only("tq_lsq_quant", in, out);
}

MXReturnValue lsq_shape_infer(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<std::vector<unsigned int>>* in,
                              std::vector<std::vector<unsigned int>>* out) {
  const auto& x = in->at(0);
  const auto& st = in->at(1);
  if (x.empty() || st.size() != 1 || (st[0] != 1 && st[0] != x[0])) {
    MX_ERROR_MSG << "tq_lsq_quant: step must have shape (1,) or (x.shape[0],)";
    return MX_FAIL;
  }
  out->at(0) = x;
  return MX_SUCCESS;
}

REGISTER_OP(tq_lsq_quant)
    .setForward(lsq_forward, "cpu")
    .setBackward(lsq_backward, "cpu")
    .setParseAttrs(lsq_parse)
    .setInferType(lsq_type)
    .setInferShape(lsq_shape_infer);

MXReturnValue initialize(int version) {
  return version >= 10700 ? MX_SUCCESS : MX_FAIL;
}
