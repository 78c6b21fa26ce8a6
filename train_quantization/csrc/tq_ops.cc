// Fused activation quantizer for MXNet 1.9 (loaded with mx.library.load).
//
// tq_act_quant(x, state, flag) -> (y, scale), mutates state:
//   if flag > 0 (training):  b = max|x|;  state = state > 0 ? m*state + (1-m)*b : b
//   scale = (state > 0 ? state : 1) / divisor
//   y = clip(round_half_even(x / scale), qmin, qmax) * scale
// Backward: dy passes unchanged (ste=plain) or masked where x/scale is outside
// [qmin, qmax] (ste=clipped). Every step is float32 arithmetic in the same order as the
// stock-op graph in quant.py/layers.py, so both paths give bit-identical outputs.
// Library ops do not see is_train (hence the flag input) and ignore req (gradients are
// written, not accumulated).
#include <cmath>
#include <cstdlib>
#include <string>
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
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(x[i]);
      b = a > b ? a : b;
    }
    volatile float a1 = static_cast<float>(m) * st;  // volatile: no fused multiply-add
    volatile float a2 = static_cast<float>(1.0 - m) * b;
    st = st > 0.0f ? a1 + a2 : b;
    state[0] = st;
  }
  const float s = (st > 0.0f ? st : 1.0f) / divisor;
  scale_out[0] = s;
#pragma omp parallel for num_threads(nt) if (n >= kSerialBelow)
  for (int64_t i = 0; i < n; ++i) {
    float u = x[i] / s;
    u = u < qmin ? qmin : (u > qmax ? qmax : u);
    y[i] = ((u + kMagic) - kMagic) * s;  // half to even, exact for |u| <= 2**22
  }
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
  for (int64_t i = 0; i < n; ++i) {
    if (clipped) {
      const float u = x[i] / s;
      dx[i] = (u >= qmin && u <= qmax) ? dy[i] : 0.0f;
    } else {
      dx[i] = dy[i];
    }
  }
  outputs->at(1).data<float>()[0] = 0.0f;
  outputs->at(2).data<float>()[0] = 0.0f;
  return MX_SUCCESS;
}

MXReturnValue act_parse(const std::unordered_map<std::string, std::string>& attrs,
                        int* num_in, int* num_out) {
  *num_in = 3;
  *num_out = 2;
  for (const char* k : {"momentum", "qmin", "qmax", "divisor"})
    if (!attrs.count(k)) {
      MX_ERROR_MSG << "tq_act_quant needs attribute " << k;
      return MX_FAIL;
    }
  return MX_SUCCESS;
}

MXReturnValue act_type(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<int>* in, std::vector<int>* out) {
  for (int t : *in)
    if (t != kFloat32) {
      MX_ERROR_MSG << "tq_act_quant supports float32 only";
      return MX_FAIL;
    }
  out->at(0) = kFloat32;
  out->at(1) = kFloat32;
  return MX_SUCCESS;
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

MXReturnValue initialize(int version) {
  return version >= 10700 ? MX_SUCCESS : MX_FAIL;
}
