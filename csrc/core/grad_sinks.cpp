#include "core/grad_sinks.h"

#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include "core/lincomb.h"

namespace diffeqlayers::detail {

namespace {
thread_local GradSinks* tls_current = nullptr;
}  // namespace

GradSinkNode::GradSinkNode(torch::autograd::Edge target, const torch::Tensor& like)
    : box_(like.defined() ? like.sizes().vec() : std::vector<int64_t>{},
           like.defined() ? like.options() : at::TensorOptions()) {
  add_next_edge(std::move(target));
  if (like.defined()) add_input_metadata(like);
}

torch::autograd::variable_list GradSinkNode::apply(torch::autograd::variable_list&& grads) {
  torch::Tensor acc = box_.take();
  torch::Tensor g = grads.empty() ? torch::Tensor() : grads[0];
  if (!acc.defined()) return {g};
  return {g.defined() ? acc + g : acc};
}

torch::Tensor DepositBox::buffer() {
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, buf] : buffers_)
    if (id == task) return buf;
  torch::Tensor buf = at::zeros(sizes_, options_);
  buffers_.emplace_back(task, buf);
  return buf;
}

torch::Tensor DepositBox::take() {
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = buffers_.begin(); it != buffers_.end(); ++it)
    if (it->first == task) {
      torch::Tensor buf = std::move(it->second);
      buffers_.erase(it);
      return buf;
    }
  return {};
}

bool DepositBox::accepts(const torch::Tensor& g) const {
  return host_loop_grad(g) && g.scalar_type() == options_.dtype().toScalarType() &&
         g.sizes() == c10::IntArrayRef(sizes_);
}

bool DepositBox::matches(at::ScalarType dtype, int64_t numel) const {
  return dtype == options_.dtype().toScalarType() && c10::multiply_integers(sizes_) == numel;
}

void DepositBox::add(const torch::Tensor& g, double w) {
  torch::Tensor buf = buffer();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "diffeqlayers_deposit", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = buf.mutable_data_ptr<scalar_t>();
    const auto c = static_cast<scalar_t>(w);
    const int64_t n = g.numel();
    if (w == 1.0) {
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i] * c;
    }
  });
}

torch::Tensor DepositBox::emit(const torch::Tensor& own, const torch::Tensor& extra) {
  torch::Tensor out = take();
  if (own.defined()) {
    if (!out.defined()) {
      out = own;
    } else if (accepts(own)) {
      // The buffer is this pass's own: the share is added into it.
      AT_DISPATCH_FLOATING_TYPES(own.scalar_type(), "diffeqlayers_emit", [&] {
        const scalar_t* src = own.const_data_ptr<scalar_t>();
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < own.numel(); ++i) dst[i] += src[i];
      });
    } else {
      out = out + own;
    }
  }
  if (extra.defined()) out = out.defined() ? out + extra : extra;
  return out;
}

void GradSinks::share(const torch::Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return;
  torch::autograd::Edge e = torch::autograd::impl::gradient_edge(t);
  if (!e.is_valid()) return;
  const EdgeKey key{e.function.get(), e.input_nr};
  if (shared_.count(key) != 0) return;
  Shared sh;
  sh.box = std::make_shared<DepositBox>(t.sizes().vec(), t.options());
  sh.target = std::move(e);
  shared_.emplace(key, std::move(sh));
}

GradSinks::Scope::Scope(bool enabled) {
  if (!enabled) return;
  outer_ = tls_current;
  sinks_ = new GradSinks();
  tls_current = sinks_;
}

GradSinks::Scope::~Scope() {
  if (sinks_ == nullptr) return;
  tls_current = outer_;
  delete sinks_;
}

GradSinks* GradSinks::current() { return tls_current; }

GradSinkPtr GradSinks::sink(const torch::Tensor& w) {
  if (!w.defined() || !w.requires_grad()) return {};
  auto it = sinks_.find(w.unsafeGetTensorImpl());
  if (it != sinks_.end()) return it->second.second;
  torch::autograd::Edge e = torch::autograd::impl::gradient_edge(w);
  if (!e.is_valid()) return {};
  GradSinkPtr s = make_node<GradSinkNode>(std::move(e), w);
  sinks_.emplace(w.unsafeGetTensorImpl(), std::make_pair(w, s));
  return s;
}

}  // namespace diffeqlayers::detail
