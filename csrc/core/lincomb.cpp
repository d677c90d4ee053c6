// Linear combinations of stages, u + sum_j w_j k_j, as one autograd node.
#include "core/lincomb.h"

#include <torch/csrc/autograd/custom_function.h>

namespace diffeqlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Weights travel as one non-tensor argument (a bare std::vector<double> would be iterated by
// the argument extractor and counted as one input per element).
struct Weights {
  std::vector<double> w;
};

// sum_j w[j] * terms[j] into one fresh tensor.
torch::Tensor combine_no_grad(at::TensorList terms, const std::vector<double>& w) {
  torch::Tensor out;
  size_t j = 1;
  if (terms.size() > 1 && w[0] == 1.0) {
    out = at::add(terms[0], terms[1], w[1]);
    j = 2;
  } else {
    out = at::mul(terms[0], w[0]);
  }
  for (; j < terms.size(); ++j) out.add_(terms[j], w[j]);
  return out;
}

struct LinComb : public torch::autograd::Function<LinComb> {
  // The terms come as a TensorList: the argument type the extractor expands into one input per
  // tensor (a std::vector would count as a single non-tensor argument). Every term is defined:
  // the autograd machinery needs a device for each input.
  static torch::Tensor forward(AutogradContext* ctx, at::TensorList terms, const Weights& weights) {
    ctx->saved_data["w"] = weights.w;
    return combine_no_grad(terms, weights.w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const torch::Tensor& g = grad_out[0];
    const std::vector<double> w = ctx->saved_data["w"].toDoubleVector();
    variable_list grads;
    grads.reserve(w.size() + 1);
    if (!g.defined()) {
      grads.resize(w.size() + 1);
      return grads;
    }
    // Every g * w_j from one broadcast multiplication by the weights in g's dtype: the same
    // products as separate g * w_j (which round w_j to g's dtype too), without converting a
    // scalar to a tensor per term, which costs more than the product on small states.
    const int64_t n = static_cast<int64_t>(w.size());
    std::vector<int64_t> shape(static_cast<size_t>(g.dim()) + 1, 1);
    shape[0] = n;
    torch::Tensor wt = at::tensor(w, g.options()).view(shape);
    std::vector<torch::Tensor> scaled = at::mul(g.unsqueeze(0), wt).unbind(0);
    for (int64_t j = 0; j < n; ++j)
      grads.push_back(w[static_cast<size_t>(j)] == 1.0 ? g : scaled[static_cast<size_t>(j)]);
    grads.push_back(torch::Tensor());  // the weights
    return grads;
  }
};

}  // namespace

torch::Tensor lincomb(const torch::Tensor& u, const std::vector<torch::Tensor>& k,
                      const std::vector<double>& w) {
  TORCH_INTERNAL_ASSERT(!k.empty() && k.size() == w.size());
  std::vector<torch::Tensor> terms;
  std::vector<double> weights;
  terms.reserve(k.size() + 1);
  weights.reserve(k.size() + 1);
  if (u.defined()) {
    terms.push_back(u);
    weights.push_back(1.0);
  }
  terms.insert(terms.end(), k.begin(), k.end());
  weights.insert(weights.end(), w.begin(), w.end());
  bool record = false, dual = false;
  for (const auto& t : terms) {
    record = record || t.requires_grad();
    dual = dual || t._fw_grad(/*level=*/0).defined();
  }
  record = record && at::GradMode::is_enabled();
  // C++ autograd Functions have no forward-mode formula: dual tensors take plain ATen ops,
  // which carry tangents (and record reverse mode too, one node per term).
  if (dual) {
    torch::Tensor out = at::mul(terms[0], weights[0]);
    for (size_t j = 1; j < terms.size(); ++j) out = at::add(out, terms[j], weights[j]);
    return out;
  }
  if (!record) return combine_no_grad(terms, weights);
  return LinComb::apply(at::TensorList(terms), Weights{std::move(weights)});
}

}  // namespace diffeqlayers
