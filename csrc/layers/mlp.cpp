// diffeqlayers::MLP: the built-in multilayer perceptron for dynamics (see diffeqlayers/mlp.h).
#include "diffeqlayers/mlp.h"

#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <type_traits>
#include <utility>

#include "core/autograd_node.h"
#include "core/grad_sinks.h"
#include "core/lincomb.h"

namespace diffeqlayers {

namespace {

struct ActivationName {
  Activation a;
  const char* name;
};
constexpr ActivationName kActivations[] = {
    {Activation::Tanh, "tanh"},         {Activation::ReLU, "relu"},
    {Activation::Softplus, "softplus"}, {Activation::Sigmoid, "sigmoid"},
    {Activation::GELU, "gelu"},         {Activation::ELU, "elu"},
    {Activation::SiLU, "silu"},         {Activation::Identity, "identity"},
};

// A gradient may be recorded through x: then no op on it may run in place.
bool records(const torch::Tensor& x) {
  return x.requires_grad() || x._fw_grad(/*level=*/0).defined();
}

// The activation, in place on x when nothing is recorded (x is always the fresh output of the
// preceding linear layer, owned by nobody else). The functions and their default arguments are
// those of torch.nn's modules (Softplus(beta=1, threshold=20), ELU(alpha=1), GELU exact).
torch::Tensor activate(Activation a, torch::Tensor x) {
  const bool inplace = !records(x);
  switch (a) {
    case Activation::Tanh:
      return inplace ? x.tanh_() : at::tanh(x);
    case Activation::ReLU:
      return inplace ? x.relu_() : at::relu(x);
    case Activation::Softplus:
      return at::softplus(x, 1.0, 20.0);
    case Activation::Sigmoid:
      return inplace ? x.sigmoid_() : at::sigmoid(x);
    case Activation::GELU:
      return inplace ? at::gelu_(x) : at::gelu(x);
    case Activation::ELU:
      return inplace ? at::elu_(x) : at::elu(x);
    case Activation::SiLU:
      return inplace ? at::silu_(x) : at::silu(x);
    case Activation::Identity:
      return x;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
  return x;
}

// x W^T + b as one fused op: addmv for a single state, addmm for a batch (leading dimensions
// flattened).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor* b) {
  if (x.dim() == 1) return b ? at::addmv(*b, w, x) : at::mv(w, x);
  if (x.dim() == 2) return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  std::vector<int64_t> shape = x.sizes().vec();
  torch::Tensor flat = x.reshape({-1, shape.back()});
  torch::Tensor y = b ? at::addmm(*b, flat, w.t()) : at::mm(flat, w.t());
  shape.back() = w.size(0);
  return y.view(shape);
}

// ------------------------------------------------------------------------------------------
// Small states on the CPU: the whole evaluation, and its vector-Jacobian product, as host loops.
//
// For the sizes neural ODEs use (2 -> 50 -> 2), the generic path above pays a dispatch, an
// allocation and, when a gradient is recorded, an autograd node for every op (pow, addmv, tanh,
// addmv): far more than its few hundred multiply-adds, forward and backward. Here one evaluation
// is one loop nest and, when recorded, one autograd node (MLPEvalNode) whose backward returns the
// gradients of the input and of every weight from saved activations. The choice depends only on
// the tensors (never on grad mode), so that recorded and unrecorded solves, and an adjoint's
// replays, evaluate f with the same arithmetic. Forward-mode duals, functorch wrappers, CUDA,
// other dtypes and large problems keep the generic path.
// ------------------------------------------------------------------------------------------

// Multiply-adds of one evaluation above which BLAS beats the plain loops (and their one thread).
constexpr int64_t kHostLoopMaxMacs = 16384;

// Whether host_forward takes this evaluation.
bool host_loops_apply(const MLPSpec& spec, at::TensorList params, const torch::Tensor& u) {
  const auto dtype = u.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (!plain_cpu(u, dtype)) return false;
  int64_t macs = 0;
  for (int64_t i = 0; i < spec.num_layers(); ++i)
    macs += spec.in_features(i) * spec.sizes[static_cast<size_t>(i + 1)];
  const int64_t rows = u.numel() / spec.sizes[0];
  if (rows * macs > kHostLoopMaxMacs) return false;
  for (const auto& w : params)
    if (!plain_cpu(w, dtype) || !w.is_contiguous()) return false;
  return true;
}

// u^p with the special cases ATen's pow(Tensor, Scalar) takes (the same rounding).
template <typename T>
T power_of(T u, double p) {
  if (p == 1.0) return u;
  if (p == 2.0) return u * u;
  if (p == 3.0) return u * u * u;
  if (p == 0.5) return std::sqrt(u);
  if (p == -0.5) return T(1) / std::sqrt(u);
  if (p == -1.0) return T(1) / u;
  if (p == -2.0) return T(1) / (u * u);
  if (p == 0.0) return T(1);
  return std::pow(u, static_cast<T>(p));
}

// tanh of a float without a library call, so that a layer's activation loop vectorizes (glibc's
// scalar tanhf was the largest single cost of a small float32 MLP's evaluation): in double,
// tanh|x| = 1 - 2 / (e^{2|x|} + 1), e^y = 2^n e^r with y = n ln 2 + r, |r| <= ln(2) / 2, e^r by its
// Taylor polynomial to r^11 (truncation below 1e-14), rounded to float once: within 0.5 ulp of
// tanh computed in double on every 97th float (checked when written). |x| is clamped to 20
// (tanh = 1 in float beyond 9.1); below 2^-12 tanh x = x in float, returned as is, with -0 and
// NaN. The selections work on the bits, so that no floating-point operation is conditional.
inline float tanh_float(float xf) {
  uint32_t xb;
  std::memcpy(&xb, &xf, sizeof xb);
  const uint32_t ab = xb & 0x7fffffffu;
  const uint32_t cb = std::min(ab, uint32_t{0x41a00000u});  // 20.0f
  float af;
  std::memcpy(&af, &cb, sizeof af);
  const double y = 2.0 * static_cast<double>(af);
  constexpr double kShift = 0x1.8p52;  // adding it rounds to an integer, kept in the low bits
  const double shifted = y * 1.4426950408889634 + kShift;
  const double n = shifted - kShift;
  const double r = y - n * 0.6931471805599453;
  double p = 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t k;
  std::memcpy(&k, &shifted, sizeof k);
  const uint64_t scale_bits = (k + 1023) << 52;  // 2^n (0 <= n <= 58)
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const float t = static_cast<float>(1.0 - 2.0 / (p * scale + 1.0));
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  // x itself below 2^-12 (0x39800000) and for NaN; otherwise t with the sign of x.
  const uint32_t keep =
      static_cast<uint32_t>(ab < 0x39800000u) | static_cast<uint32_t>(ab > 0x7f800000u);
  const uint32_t mask = 0u - keep;
  const uint32_t rb = (xb & mask) | ((tb | (xb & 0x80000000u)) & ~mask);
  float out;
  std::memcpy(&out, &rb, sizeof out);
  return out;
}

// The activations with torch.nn's defaults, written as ATen's CPU kernels write them (tanh of a
// float: tanh_float).
template <typename T>
T act_forward(Activation a, T z) {
  switch (a) {
    case Activation::Tanh:
      if constexpr (std::is_same_v<T, float>)
        return tanh_float(z);
      else
        return std::tanh(z);
    case Activation::ReLU:
      return (z > T(0) || std::isnan(z)) ? z : T(0);
    case Activation::Softplus:
      return z > T(20) ? z : std::log1p(std::exp(z));
    case Activation::Sigmoid:
      return T(1) / (T(1) + std::exp(-z));
    case Activation::GELU:
      return z * T(0.5) * (T(1) + std::erf(z * static_cast<T>(M_SQRT1_2)));
    case Activation::ELU:
      return z <= T(0) ? std::expm1(z) : z;
    case Activation::SiLU:
      return z / (T(1) + std::exp(-z));
    case Activation::Identity:
      return z;
  }
  return z;
}

// g * act'(z), given z and h = act(z) (ATen's *_backward formulas).
template <typename T>
T act_backward(Activation a, T g, T z, T h) {
  switch (a) {
    case Activation::Tanh:
      return g * (T(1) - h * h);
    case Activation::ReLU:
      return h <= T(0) ? T(0) : g;
    case Activation::Softplus: {
      if (z > T(20)) return g;
      const T e = std::exp(z);
      return g * e / (e + T(1));
    }
    case Activation::Sigmoid:
      return g * (T(1) - h) * h;
    case Activation::GELU: {
      const T alpha = static_cast<T>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
      const T cdf = T(0.5) * (T(1) + std::erf(z * static_cast<T>(M_SQRT1_2)));
      const T pdf = alpha * std::exp(z * z * T(-0.5));
      return g * (cdf + z * pdf);
    }
    case Activation::ELU:
      return z <= T(0) ? g * std::exp(z) : g;
    case Activation::SiLU: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return g * s * (T(1) + z * (T(1) - s));
    }
    case Activation::Identity:
      return g;
  }
  return g;
}

// Per row of the saved workspace: the first layer's input x (u^p, then t), then for each hidden
// layer its pre-activation z and its output h.
int64_t workspace_row(const MLPSpec& spec) {
  int64_t n = spec.in_features(0);
  for (size_t i = 1; i + 1 < spec.sizes.size(); ++i) n += 2 * spec.sizes[i];
  return n;
}

// What the host loops read from the spec: layers, parameters per layer (weight, bias), workspace
// row length, input and output widths, input power.
struct LoopDims {
  int64_t L;
  size_t per;
  int64_t row, n0, out;
  double p;
};

LoopDims loop_dims(const MLPSpec& spec) {
  return {spec.num_layers(),   spec.bias ? size_t{2} : size_t{1},
          workspace_row(spec), spec.sizes[0],
          spec.sizes.back(),   spec.input_power};
}

// z[o + j] = sum_k W[o + j, k] a[k] (+ b[o + j]) for the B outputs from o (W row-major, `in`
// columns): each summed over k in order from 0, then + b, as a plain loop over one output.
template <int B, typename T>
inline void affine_outputs(const T* W, const T* b, const T* a, int64_t in, int64_t o, T* z) {
  T s[B] = {};
  const T* Wo = W + o * in;
  for (int64_t k = 0; k < in; ++k) {
    const T ak = a[k];
    for (int j = 0; j < B; ++j) s[j] += Wo[j * in + k] * ak;
  }
  for (int j = 0; j < B; ++j) z[o + j] = b ? s[j] + b[o + j] : s[j];
}

template <typename T>
void host_forward_rows(const MLPSpec& spec, at::TensorList params, double t, const T* u,
                       int64_t rows, T* y, T* ws) {
  const auto [L, per, row, n0, out, p] = loop_dims(spec);
  for (int64_t r = 0; r < rows; ++r) {
    T* x = ws + r * row;
    const T* ur = u + r * n0;
    for (int64_t k = 0; k < n0; ++k) x[k] = power_of(ur[k], p);
    if (spec.time_input) x[n0] = static_cast<T>(t);
    const T* a = x;
    T* next = x + spec.in_features(0);
    for (int64_t i = 0; i < L; ++i) {
      const size_t j = per * static_cast<size_t>(i);
      const T* W = params[j].const_data_ptr<T>();
      const T* b = spec.bias ? params[j + 1].const_data_ptr<T>() : nullptr;
      const int64_t in = spec.in_features(i);
      const int64_t m = spec.sizes[static_cast<size_t>(i + 1)];
      T* z = i + 1 < L ? next : y + r * out;
      // z = W a (+ b): four (then two, then one) outputs at a time, as independent chains of
      // additions instead of one after the other.
      int64_t o = 0;
      for (; o + 4 <= m; o += 4) affine_outputs<4>(W, b, a, in, o, z);
      for (; o + 2 <= m; o += 2) affine_outputs<2>(W, b, a, in, o, z);
      for (; o < m; ++o) affine_outputs<1>(W, b, a, in, o, z);
      if (i + 1 < L) {
        const Activation act = spec.activations[static_cast<size_t>(i)];
        T* h = z + m;
        if (act == Activation::Tanh) {  // a loop without the switch, which vectorizes for float
          for (int64_t o = 0; o < m; ++o) h[o] = act_forward(Activation::Tanh, z[o]);
        } else {
          for (int64_t o = 0; o < m; ++o) h[o] = act_forward(act, z[o]);
        }
        a = h;
        next = h + m;
      }
    }
  }
}

// The evaluation by host loops; also returns the workspace when `keep` (for the backward).
torch::Tensor host_forward(const MLPSpec& spec, at::TensorList params, double t,
                           const torch::Tensor& u, bool keep, torch::Tensor* workspace) {
  const torch::Tensor uc = u.contiguous();
  const int64_t rows = uc.numel() / spec.sizes[0];
  std::vector<int64_t> shape = uc.sizes().vec();
  shape.back() = spec.sizes.back();
  torch::Tensor y = at::empty(shape, uc.options());
  const int64_t row = workspace_row(spec);
  AT_DISPATCH_FLOATING_TYPES(uc.scalar_type(), "diffeqlayers_mlp_forward", [&] {
    if (keep) {
      *workspace = at::empty({rows, row}, uc.options());
      host_forward_rows<scalar_t>(spec, params, t, uc.const_data_ptr<scalar_t>(), rows,
                                  y.mutable_data_ptr<scalar_t>(),
                                  workspace->mutable_data_ptr<scalar_t>());
    } else {
      // Only the current row's activations are needed: one row, reused.
      std::vector<scalar_t> ws(static_cast<size_t>(row));
      const scalar_t* u_data = uc.const_data_ptr<scalar_t>();
      scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
      const int64_t n0 = spec.sizes[0];
      const int64_t out = spec.sizes.back();
      for (int64_t r = 0; r < rows; ++r)
        host_forward_rows<scalar_t>(spec, params, t, u_data + r * n0, 1, y_data + r * out,
                                    ws.data());
    }
  });
  return y;
}

// The vector-Jacobian product: given g = dL/dy per row, accumulates dL/dW_i, dL/db_i (where the
// pointer is given) and writes dL/du (where du is given).
template <typename T>
void host_backward_rows(const MLPSpec& spec, at::TensorList params, const T* u, const T* ws,
                        const T* gy, int64_t rows, const std::vector<T*>& dw, T* du) {
  const auto [L, per, row, n0, out, p] = loop_dims(spec);
  int64_t width = 0;
  for (int64_t i = 0; i < L; ++i) width = std::max(width, spec.in_features(i));
  // Scratch kept per thread between calls (see host_functions_of): two gradient rows, and the
  // offsets of each layer's input within a workspace row.
  const auto span = static_cast<size_t>(std::max(width, out));
  thread_local std::vector<T> buf;
  if (buf.size() < 2 * span) buf.resize(2 * span);
  thread_local std::vector<int64_t> input_at;
  input_at.assign(static_cast<size_t>(L), 0);
  int64_t off = spec.in_features(0);
  for (int64_t i = 1; i < L; ++i) {
    const int64_t m = spec.sizes[static_cast<size_t>(i)];
    input_at[static_cast<size_t>(i)] = off + m;  // h after z
    off += 2 * m;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* wr = ws + r * row;
    T* g = buf.data();
    T* gin = buf.data() + span;
    std::copy(gy + r * out, gy + (r + 1) * out, g);
    for (int64_t i = L - 1; i >= 0; --i) {
      const size_t j = per * static_cast<size_t>(i);
      const T* W = params[j].const_data_ptr<T>();
      const int64_t in = spec.in_features(i);
      const int64_t m = spec.sizes[static_cast<size_t>(i + 1)];
      const T* a = wr + input_at[static_cast<size_t>(i)];
      if (T* dW = dw[j]) {
        // dW += g a^T. The gradient rows live in the thread's scratch, never in dW, a or W:
        // restrict lets the compiler vectorize without runtime overlap checks.
        const T* __restrict ar = a;
        for (int64_t o = 0; o < m; ++o) {
          const T go = g[o];
          T* __restrict dWo = dW + o * in;
          for (int64_t k = 0; k < in; ++k) dWo[k] += go * ar[k];
        }
      }
      if (spec.bias) {
        if (T* db = dw[j + 1])
          for (int64_t o = 0; o < m; ++o) db[o] += g[o];
      }
      if (i == 0 && du == nullptr) break;
      // gin = W^T g over the layer's inputs (the time column has no gradient to pass on).
      const int64_t nin = i == 0 ? n0 : in;
      T* __restrict gi = gin;
      if (nin <= 8) {
        // Few inputs (the first layer of a small state): each sum in registers, two at a time,
        // rather than read back from memory after every output's product. Same order of
        // additions as below.
        int64_t k = 0;
        for (; k + 2 <= nin; k += 2) {
          T s0 = T(0), s1 = T(0);
          for (int64_t o = 0; o < m; ++o) {
            s0 += g[o] * W[o * in + k];
            s1 += g[o] * W[o * in + k + 1];
          }
          gi[k] = s0;
          gi[k + 1] = s1;
        }
        if (k < nin) {
          T s0 = T(0);
          for (int64_t o = 0; o < m; ++o) s0 += g[o] * W[o * in + k];
          gi[k] = s0;
        }
      } else {
        std::fill(gi, gi + nin, T(0));
        for (int64_t o = 0; o < m; ++o) {
          const T go = g[o];
          const T* __restrict Wo = W + o * in;
          for (int64_t k = 0; k < nin; ++k) gi[k] += go * Wo[k];
        }
      }
      if (i > 0) {
        const Activation act = spec.activations[static_cast<size_t>(i - 1)];
        const T* __restrict h = a;
        const T* __restrict z = a - in;
        if (act == Activation::Tanh) {  // without the switch, the loop vectorizes
          for (int64_t k = 0; k < in; ++k)
            gi[k] = act_backward(Activation::Tanh, gi[k], z[k], h[k]);
        } else {
          for (int64_t k = 0; k < in; ++k) gi[k] = act_backward(act, gi[k], z[k], h[k]);
        }
      } else {
        const T* ur = u + r * n0;
        T* dur = du + r * n0;
        if (p == 1.0) {
          std::copy(gin, gin + n0, dur);
        } else {
          // ATen's pow_backward: grad * (p * u^(p - 1)), zero for p = 0.
          for (int64_t k = 0; k < n0; ++k)
            dur[k] = p == 0.0 ? T(0) : gin[k] * (static_cast<T>(p) * power_of(ur[k], p - 1.0));
        }
      }
      std::swap(g, gin);
    }
  }
}

// The vector-Jacobian product by host loops from a kept forward workspace `ws`: dL/du into du
// (when need_u) and dL/dW_i, dL/db_i into dparams[i] where need_w[i], for g = dL/dy shaped like
// the output. A dparams[i] defined on entry (contiguous, of u's dtype) is added into; the others
// are made (zeroed first) where needed and stay undefined elsewhere.
void host_vjp(const MLPSpec& spec, at::TensorList params, const torch::Tensor& u,
              const torch::Tensor& ws, const torch::Tensor& g, bool need_u,
              const std::vector<bool>& need_w, torch::Tensor* du,
              std::vector<torch::Tensor>* dparams) {
  const torch::Tensor gc = g.to(u.scalar_type()).contiguous();
  const torch::Tensor uc = u.contiguous();
  const int64_t rows = uc.numel() / spec.sizes[0];
  const size_t np = params.size();
  if (need_u) *du = at::empty_like(uc, at::MemoryFormat::Contiguous);
  // Entries given (defined) are accumulated into; the others are made here, zeroed in the loop
  // below: at::empty and a fill cost a third of zeros_like's dispatches, paid for every weight of
  // every evaluation in a backward pass.
  dparams->resize(np);
  std::vector<bool> fresh(np, false);
  for (size_t i = 0; i < np; ++i)
    if (need_w[i] && !(*dparams)[i].defined()) {
      (*dparams)[i] = at::empty(params[i].sizes(), uc.options());
      fresh[i] = true;
    }
  AT_DISPATCH_FLOATING_TYPES(uc.scalar_type(), "diffeqlayers_mlp_backward", [&] {
    std::vector<scalar_t*> dw(np, nullptr);
    for (size_t i = 0; i < np; ++i)
      if (need_w[i]) {
        dw[i] = (*dparams)[i].mutable_data_ptr<scalar_t>();
        if (fresh[i]) std::fill(dw[i], dw[i] + (*dparams)[i].numel(), scalar_t(0));
      }
    host_backward_rows<scalar_t>(spec, params, uc.const_data_ptr<scalar_t>(),
                                 ws.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), rows,
                                 dw, need_u ? du->mutable_data_ptr<scalar_t>() : nullptr);
  });
}

// The first layer's input in ATen ops: u^p, then t as a last column when the MLP takes time.
torch::Tensor generic_input(const MLPSpec& spec, double t, const torch::Tensor& u) {
  // Integer powers go to ATen's pow kernel as torch's u ** p does (exact same rounding).
  torch::Tensor x = spec.input_power == 1.0 ? u : at::pow(u, spec.input_power);
  if (spec.time_input) {
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = 1;
    x = at::cat({x, at::full(shape, t, x.options())}, -1);
  }
  return x;
}

// The generic path: one ATen op per layer and activation (autograd records each).
torch::Tensor generic_forward(const MLPSpec& spec, at::TensorList params, double t,
                              const torch::Tensor& u) {
  torch::Tensor x = generic_input(spec, t, u);
  const int64_t n = spec.num_layers();
  const size_t per = spec.bias ? 2 : 1;
  for (int64_t i = 0; i < n; ++i) {
    const size_t j = per * static_cast<size_t>(i);
    x = linear(x, params[j], spec.bias ? &params[j + 1] : nullptr);
    if (i + 1 < n) x = activate(spec.activations[static_cast<size_t>(i)], std::move(x));
  }
  return x;
}

// g * act'(z) in ATen ops (differentiable: the create_graph path), given z and h = act(z):
// the formulas of act_backward.
torch::Tensor activation_backward(Activation a, const torch::Tensor& g, const torch::Tensor& z,
                                  const torch::Tensor& h) {
  switch (a) {
    case Activation::Tanh:
      return g * (1 - h * h);
    case Activation::ReLU:
      return g * (h > 0).to(g.scalar_type());
    case Activation::Softplus:
      return at::where(z > 20, g, g * at::sigmoid(z));
    case Activation::Sigmoid:
      return g * (1 - h) * h;
    case Activation::GELU: {
      const torch::Tensor cdf = 0.5 * (1 + at::erf(z * M_SQRT1_2));
      const torch::Tensor pdf = (M_2_SQRTPI * M_SQRT1_2 * 0.5) * at::exp(z * z * -0.5);
      return g * (cdf + z * pdf);
    }
    case Activation::ELU:
      return at::where(z <= 0, g * at::exp(z), g);
    case Activation::SiLU: {
      const torch::Tensor sg = at::sigmoid(z);
      return g * sg * (1 + z * (1 - sg));
    }
    case Activation::Identity:
      return g;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
  return g;
}

// The vector-Jacobian product of one evaluation in ATen ops on u, the weights and g, so that a
// backward that records (create_graph) records it: partial derivatives at this evaluation, u
// and the weights held fixed (an autograd.grad of the generic path from u would also follow u's
// own history back through the earlier evaluations of a solve, which depend on the same
// weights: every earlier evaluation again per evaluation, and those paths counted twice).
// Returns [du, dparams...], undefined where not wanted (want[0]: u, want[i + 1]: params[i]).
std::vector<torch::Tensor> generic_vjp(const MLPSpec& spec, at::TensorList params, double t,
                                       const torch::Tensor& u, const torch::Tensor& g,
                                       const std::vector<bool>& want) {
  const double p = spec.input_power;
  const torch::Tensor x0 = generic_input(spec, t, u);
  const int64_t n = spec.num_layers();
  const size_t per = spec.bias ? 2 : 1;
  // Each layer's input a_i and, for the hidden layers, the pre-activation z_i.
  std::vector<torch::Tensor> a{x0}, z;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const size_t j = per * static_cast<size_t>(i);
    z.push_back(linear(a.back(), params[j], spec.bias ? &params[j + 1] : nullptr));
    // activate works in place on what records nothing; z is needed after.
    const torch::Tensor& zi = z.back();
    a.push_back(activate(spec.activations[static_cast<size_t>(i)], records(zi) ? zi : zi.clone()));
  }
  std::vector<torch::Tensor> out(params.size() + 1);
  torch::Tensor gz = g.to(u.scalar_type());
  for (int64_t i = n - 1; i >= 0; --i) {
    const size_t j = per * static_cast<size_t>(i);
    const int64_t m = params[j].size(0);
    const torch::Tensor g2 = gz.reshape({-1, m});
    if (want[j + 1])
      out[j + 1] = at::mm(g2.t(), a[static_cast<size_t>(i)].reshape({-1, params[j].size(1)}));
    if (spec.bias && want[j + 2]) out[j + 2] = g2.sum(0);
    if (i == 0 && !want[0]) break;
    torch::Tensor ga = at::matmul(gz, params[j]);
    if (i > 0) {
      gz = activation_backward(spec.activations[static_cast<size_t>(i - 1)], ga,
                               z[static_cast<size_t>(i - 1)], a[static_cast<size_t>(i)]);
    } else {
      if (spec.time_input) ga = ga.narrow(-1, 0, spec.sizes[0]);
      // pow's derivative p u^(p - 1), zero for p = 0 (as ATen's pow_backward).
      out[0] = p == 1.0 ? ga : p == 0.0 ? at::zeros_like(u) : ga * (p * at::pow(u, p - 1.0));
    }
  }
  return out;
}

// One evaluation as one autograd node, made directly (no custom-Function machinery: with the
// MLP this small, its boxing of the spec and saved tensors cost as much as the evaluation): the
// forward by host loops keeps x, z and h per row (ws), the backward is the vector-Jacobian
// product for u and every weight by host loops. Under create_graph (grad mode on in the
// backward) it computes the product in ATen ops instead (generic_vjp), so that higher
// derivatives are recorded. Inputs: u, then the weights.
struct MLPEvalNode : public torch::autograd::Node {
  using variable_list = torch::autograd::variable_list;

  MLPEvalNode(const MLPSpec& spec, double t, const torch::Tensor& u, at::TensorList params,
              torch::Tensor ws, std::vector<detail::GradSinkPtr> sinks)
      : spec_(spec),
        t_(t),
        u_(u, /*is_output=*/false),
        ws_(std::move(ws)),
        sinks_(std::move(sinks)) {
    params_.reserve(params.size());
    for (const auto& w : params) params_.emplace_back(w, /*is_output=*/false);
  }

  std::string name() const override { return "diffeqlayers::MLPBackward"; }

  void release_variables() override {
    u_.reset_data();
    for (auto& w : params_) w.reset_data();
    ws_.reset();
  }

  variable_list apply(variable_list&& grad_out) override {
    const size_t np = params_.size();
    variable_list grads(np + 1);  // [u, params...]
    const torch::Tensor& g = grad_out[0];
    if (!g.defined()) return grads;
    // Unpacked (checked against in-place changes since the forward) only when a gradient flows.
    const torch::Tensor u = u_.unpack();
    std::vector<torch::Tensor> params;
    params.reserve(np);
    for (const auto& w : params_) params.push_back(w.unpack());
    const bool need_u = should_compute_output(0);
    if (at::GradMode::is_enabled()) {
      // create_graph: the vector-Jacobian product in recorded ATen ops. Weights whose edge goes
      // to a sink get theirs through the edge too (the sink passes it on).
      std::vector<bool> want(np + 1);
      want[0] = need_u;
      bool any = need_u;
      for (size_t i = 0; i < np; ++i) any = (want[i + 1] = should_compute_output(i + 1)) || any;
      if (!any) return grads;
      return generic_vjp(spec_, params, t_, u, g, want);
    }
    std::vector<bool> need_w(np);
    for (size_t i = 0; i < np; ++i) need_w[i] = should_compute_output(i + 1);
    torch::Tensor du;
    // A weight whose edge goes to a sink: added into the sink's buffer (host_vjp adds into
    // entries given), its edge handed an undefined gradient.
    std::vector<torch::Tensor> dparams(np);
    for (size_t i = 0; i < np; ++i)
      if (need_w[i] && sinks_[i]) dparams[i] = sinks_[i]->buffer();
    host_vjp(spec_, params, u, ws_, g, need_u, need_w, &du, &dparams);
    if (need_u) grads[0] = du;
    for (size_t i = 0; i < np; ++i)
      if (!sinks_[i]) grads[i + 1] = dparams[i];
    return grads;
  }

 private:
  MLPSpec spec_;
  double t_;
  torch::autograd::SavedVariable u_;
  std::vector<torch::autograd::SavedVariable> params_;
  torch::Tensor ws_;  // the forward's activations per row (no grad)
  // Per weight: the sink its edge goes to (see mlp_forward), or null.
  std::vector<detail::GradSinkPtr> sinks_;
};

}  // namespace

Activation activation_from_string(const std::string& name) {
  for (const auto& e : kActivations)
    if (name == e.name) return e.a;
  std::string known;
  for (const auto& e : kActivations) known += std::string(known.empty() ? "" : ", ") + e.name;
  TORCH_CHECK_VALUE(false, "MLP: unknown activation \"", name, "\"; available: ", known);
  return Activation::Identity;
}

std::string to_string(Activation a) {
  for (const auto& e : kActivations)
    if (e.a == a) return e.name;
  return "?";
}

std::vector<std::string> mlp_activations() {
  std::vector<std::string> out;
  for (const auto& e : kActivations) out.emplace_back(e.name);
  return out;
}

int64_t MLPSpec::in_features(int64_t layer) const {
  return sizes[static_cast<size_t>(layer)] + (layer == 0 && time_input ? 1 : 0);
}

void MLPSpec::check() const {
  TORCH_CHECK_VALUE(sizes.size() >= 2,
                    "MLP: sizes must hold at least the input and output sizes, got ", sizes.size(),
                    " entries");
  for (size_t i = 0; i < sizes.size(); ++i)
    TORCH_CHECK_VALUE(sizes[i] > 0, "MLP: sizes[", i, "] must be positive, got ", sizes[i]);
  TORCH_CHECK_VALUE(activations.size() + 2 == sizes.size(), "MLP: ", sizes.size() - 2,
                    " hidden layer(s) need as many activations, got ", activations.size());
  TORCH_CHECK_VALUE(std::isfinite(input_power) && input_power != 0.0,
                    "MLP: input_power must be a finite non-zero number, got ", input_power);
}

void MLPSpec::check_params(at::TensorList params) const {
  const int64_t per = bias ? 2 : 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == per * num_layers(), "MLP ", repr(),
                    " takes ", per * num_layers(), " weight tensors (",
                    bias ? "weight and bias of each layer" : "one weight per layer", "), got ",
                    params.size());
  for (int64_t i = 0; i < num_layers(); ++i) {
    const torch::Tensor& w = params[static_cast<size_t>(per * i)];
    const int64_t out = sizes[static_cast<size_t>(i + 1)];
    TORCH_CHECK_TYPE(w.defined(), "MLP: the weight of layer ", i, " is undefined");
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == out && w.size(1) == in_features(i),
                      "MLP: the weight of layer ", i, " must have shape [", out, ", ",
                      in_features(i), "], got ", w.sizes());
    TORCH_CHECK_TYPE(w.is_floating_point(), "MLP: the weight of layer ", i,
                     " must be floating point, got ", w.scalar_type());
    const torch::Tensor& w0 = params[0];
    TORCH_CHECK_TYPE(w.scalar_type() == w0.scalar_type() && w.device() == w0.device(),
                     "MLP: the weights must share one dtype and device; layer ", i, " has ",
                     w.scalar_type(), " on ", w.device(), ", layer 0 ", w0.scalar_type(), " on ",
                     w0.device());
    if (bias) {
      const torch::Tensor& b = params[static_cast<size_t>(per * i + 1)];
      TORCH_CHECK_TYPE(b.defined(), "MLP: the bias of layer ", i, " is undefined");
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out, "MLP: the bias of layer ", i,
                        " must have shape [", out, "], got ", b.sizes());
      TORCH_CHECK_TYPE(b.scalar_type() == w0.scalar_type() && b.device() == w0.device(),
                       "MLP: the bias of layer ", i, " has ", b.scalar_type(), " on ", b.device(),
                       " but the weights are ", w0.scalar_type(), " on ", w0.device());
    }
  }
}

std::string MLPSpec::repr() const {
  std::ostringstream s;
  s << "(sizes=[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "], activations=[";
  for (size_t i = 0; i < activations.size(); ++i) s << (i ? ", " : "") << to_string(activations[i]);
  s << "]";
  if (input_power != 1.0) s << ", input_power=" << input_power;
  if (time_input) s << ", time_input=true";
  if (!bias) s << ", bias=false";
  s << ")";
  return s.str();
}

MLPSpec make_mlp_spec(std::vector<int64_t> sizes, const std::string& activation,
                      const std::vector<std::string>& activations, double input_power,
                      bool time_input, bool bias) {
  MLPSpec spec;
  spec.sizes = std::move(sizes);
  const size_t hidden = spec.sizes.size() >= 2 ? spec.sizes.size() - 2 : 0;
  if (activations.empty()) {
    spec.activations.assign(hidden, activation_from_string(activation));
  } else {
    for (const auto& a : activations) spec.activations.push_back(activation_from_string(a));
  }
  spec.input_power = input_power;
  spec.time_input = time_input;
  spec.bias = bias;
  spec.check();
  return spec;
}

torch::Tensor mlp_forward(const MLPSpec& spec, at::TensorList params, double t,
                          const torch::Tensor& u) {
  TORCH_CHECK_VALUE(u.dim() >= 1 && u.size(-1) == spec.sizes[0], "MLP ", spec.repr(),
                    " takes states whose last dimension is ", spec.sizes[0], ", got shape ",
                    u.sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == params[0].scalar_type(), "MLP: the state has dtype ",
                   u.scalar_type(), " but the weights have ", params[0].scalar_type());
  if (!host_loops_apply(spec, params, u)) return generic_forward(spec, params, t, u);
  bool record = at::GradMode::is_enabled() && u.requires_grad();
  for (const auto& w : params) record = record || (at::GradMode::is_enabled() && w.requires_grad());
  if (!record) return host_forward(spec, params, t, u, /*keep=*/false, nullptr);
  RECORD_FUNCTION("diffeqlayers::mlp", std::vector<c10::IValue>());
  torch::Tensor ws;
  torch::Tensor y = host_forward(spec, params, t, u, /*keep=*/true, &ws);
  std::vector<torch::Tensor> inputs;
  inputs.reserve(params.size() + 1);
  inputs.push_back(u);
  inputs.insert(inputs.end(), params.begin(), params.end());
  // Within a recorded solve, every evaluation feeds the weights: their gradients gather in one
  // sink per weight (core/grad_sinks.h).
  std::vector<detail::GradSinkPtr> sinks(params.size());
  if (detail::GradSinks* scope = detail::GradSinks::current())
    for (size_t i = 0; i < params.size(); ++i) sinks[i] = scope->sink(params[i]);
  auto node = detail::make_node<MLPEvalNode>(spec, t, u, params, std::move(ws), sinks);
  detail::record_node(y, node, inputs);
  for (size_t i = 0; i < params.size(); ++i)
    if (sinks[i]) node->set_next_edge(i + 1, torch::autograd::Edge(sinks[i], 0));
  return y;
}

namespace {

// The spec and the weights, checked once and shared by every closure over them (a solve of the
// MLP takes its dynamics, product and host functions: fourteen closures, which copied the spec
// and the weight list each).
struct MLPState {
  MLPSpec spec;
  std::vector<torch::Tensor> params;
};
using State = std::shared_ptr<const MLPState>;

State checked_state(const MLPSpec& spec, std::vector<torch::Tensor> params) {
  spec.check();
  spec.check_params(params);
  return std::make_shared<const MLPState>(MLPState{spec, std::move(params)});
}

Dynamics dynamics_of(State s) {
  return [s = std::move(s)](double t, const torch::Tensor& u) {
    return mlp_forward(s->spec, s->params, t, u);
  };
}

DynamicsVjp vjp_of(State s) {
  return [s = std::move(s)](double t, const torch::Tensor& u, const torch::Tensor& lambda,
                            at::TensorList wrt, torch::Tensor& fu, torch::Tensor& du,
                            std::vector<torch::Tensor>& dp) {
    const MLPSpec& spec = s->spec;
    const std::vector<torch::Tensor>& params = s->params;
    if (u.dim() < 1 || u.size(-1) != spec.sizes[0] || u.scalar_type() != params[0].scalar_type() ||
        lambda.sizes() != u.sizes() || !host_loops_apply(spec, params, u))
      return false;
    // Which weight each differentiated tensor is (by identity: these very tensors); the others
    // are not used by f, so their product is zero, as a reverse pass would leave it.
    // The same weight twice: left to autograd.
    std::vector<int64_t> which;
    if (!positions_by_identity(wrt, params, which)) return false;
    std::vector<bool> need_w(params.size(), false);
    for (int64_t j : which)
      if (j >= 0) need_w[static_cast<size_t>(j)] = true;
    // Accumulating (dp given): each buffer must be one the loops can add into.
    const bool accumulate = !dp.empty();
    std::vector<torch::Tensor> dparams(params.size());
    if (accumulate) {
      if (dp.size() != wrt.size()) return false;
      for (size_t i = 0; i < wrt.size(); ++i) {
        if (which[i] < 0) continue;
        const torch::Tensor& d = dp[i];
        const auto j = static_cast<size_t>(which[i]);
        if (!d.defined() || !d.is_contiguous() || d.scalar_type() != u.scalar_type() ||
            d.device() != u.device() || d.sizes() != params[j].sizes())
          return false;
        dparams[j] = d;
      }
    }
    at::NoGradGuard no_grad;
    torch::Tensor ws;
    fu = host_forward(spec, params, t, u, /*keep=*/true, &ws);
    host_vjp(spec, params, u, ws, lambda, /*need_u=*/true, need_w, &du, &dparams);
    du = du.view(u.sizes());
    if (!accumulate)
      for (size_t i = 0; i < wrt.size(); ++i)
        dp.push_back(which[i] >= 0 ? dparams[static_cast<size_t>(which[i])]
                                   : at::zeros_like(wrt[i]));
    return true;
  };
}

template <typename T>
HostFunctions<T> host_functions_of(const State& s) {
  const MLPSpec& spec = s->spec;
  HostFunctions<T> out;
  // As host_forward without a kept workspace: row by row through one reused workspace row.
  // The workspaces are per thread and kept between calls (a solve calls these per stage; an
  // allocation each time cost more than a small network's arithmetic). Neither calls itself.
  const auto row = static_cast<size_t>(workspace_row(spec));
  out.f = [s, row](double t, int64_t n, const T* u, T* y) {
    const MLPSpec& spec = s->spec;
    const int64_t n0 = spec.sizes[0];
    const int64_t nout = spec.sizes.back();
    thread_local std::vector<T> ws;
    if (ws.size() < row) ws.resize(row);
    for (int64_t r = 0; r < n / n0; ++r)
      host_forward_rows<T>(spec, s->params, t, u + r * n0, 1, y + r * nout, ws.data());
  };
  // As mlp_vjp: one forward keeping every row's activations, one backward.
  out.vjp = [s, row](double t, int64_t n, const T* u, const T* lambda, T* fu, T* du,
                     const std::vector<T*>& dparams) {
    const MLPSpec& spec = s->spec;
    const std::vector<torch::Tensor>& params = s->params;
    const int64_t rows = n / spec.sizes[0];
    thread_local std::vector<T> ws;
    if (ws.size() < static_cast<size_t>(rows) * row) ws.resize(static_cast<size_t>(rows) * row);
    host_forward_rows<T>(spec, params, t, u, rows, fu, ws.data());
    host_backward_rows<T>(spec, params, u, ws.data(), lambda, rows, dparams, du);
  };
  // The same two halves with the caller holding every row's activations in between.
  out.kept_size = [s, row](int64_t n) { return n / s->spec.sizes[0] * static_cast<int64_t>(row); };
  out.f_keep = [s](double t, int64_t n, const T* u, T* y, T* kept) {
    host_forward_rows<T>(s->spec, s->params, t, u, n / s->spec.sizes[0], y, kept);
  };
  out.vjp_kept = [s](int64_t n, const T* u, const T* kept, const T* lambda, T* du,
                     const std::vector<T*>& dparams) {
    host_backward_rows<T>(s->spec, s->params, u, kept, lambda, n / s->spec.sizes[0], dparams, du);
  };
  return out;
}

std::shared_ptr<const HostDynamics> host_of(const State& s) {
  auto host = std::make_shared<HostDynamics>();
  host->applies = [s](const torch::Tensor& u) {
    const MLPSpec& spec = s->spec;
    return spec.sizes.back() == spec.sizes[0] && u.dim() >= 1 && u.size(-1) == spec.sizes[0] &&
           u.scalar_type() == s->params[0].scalar_type() && u.is_contiguous() &&
           host_loops_apply(spec, s->params, u);
  };
  host->f32 = host_functions_of<float>(s);
  host->f64 = host_functions_of<double>(s);
  host->params = s->params;
  return host;
}

}  // namespace

Dynamics mlp_dynamics(const MLPSpec& spec, std::vector<torch::Tensor> params) {
  return dynamics_of(checked_state(spec, std::move(params)));
}

DynamicsVjp mlp_vjp(const MLPSpec& spec, std::vector<torch::Tensor> params) {
  return vjp_of(checked_state(spec, std::move(params)));
}

std::shared_ptr<const HostDynamics> mlp_host(const MLPSpec& spec,
                                             std::vector<torch::Tensor> params) {
  return host_of(checked_state(spec, std::move(params)));
}

MLPFunctions mlp_functions(const MLPSpec& spec, std::vector<torch::Tensor> params) {
  const State s = checked_state(spec, std::move(params));
  return {dynamics_of(s), vjp_of(s), host_of(s)};
}

MLPImpl::MLPImpl(MLPOptions options_)
    : options(std::move(options_)),
      spec_(make_mlp_spec(options.sizes(), options.activation(), options.activations(),
                          options.input_power(), options.time_input(), options.bias())) {
  for (int64_t i = 0; i < spec_.num_layers(); ++i)
    layers_->push_back(torch::nn::Linear(
        torch::nn::LinearOptions(spec_.in_features(i), spec_.sizes[static_cast<size_t>(i + 1)])
            .bias(spec_.bias)));
  layers_ = register_module("layers", layers_);
}

std::vector<torch::Tensor> MLPImpl::weights() const {
  std::vector<torch::Tensor> out;
  for (const auto& m : *layers_) {
    const auto* lin = m->as<torch::nn::LinearImpl>();
    out.push_back(lin->weight);
    if (spec_.bias) out.push_back(lin->bias);
  }
  return out;
}

torch::Tensor MLPImpl::forward(const torch::Tensor& u) {
  TORCH_CHECK_VALUE(!spec_.time_input,
                    "MLP: this MLP takes time as an input; call forward_at(t, u)");
  return forward_at(0.0, u);
}

torch::Tensor MLPImpl::forward_at(double t, const torch::Tensor& u) {
  const std::vector<torch::Tensor> w = weights();
  spec_.check_params(w);
  return mlp_forward(spec_, w, t, u);
}

Dynamics MLPImpl::dynamics() const { return mlp_dynamics(spec_, weights()); }

DynamicsVjp MLPImpl::vjp() const { return mlp_vjp(spec_, weights()); }

std::shared_ptr<const HostDynamics> MLPImpl::host() const { return mlp_host(spec_, weights()); }

void MLPImpl::pretty_print(std::ostream& stream) const {
  stream << "diffeqlayers::MLP" << spec_.repr();
}

}  // namespace diffeqlayers
