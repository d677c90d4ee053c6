#include "core/grad_sinks.h"

#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>

#include "core/lincomb.h"

namespace diffeqlayers::detail {

namespace {
thread_local GradSinks* tls_current = nullptr;
}  // namespace

namespace {
// dst[i] += w * src[i] (w rounded to the dtype first, as ATen's product rounds it), n elements.
void add_scaled(const torch::Tensor& dst, const torch::Tensor& src, double w) {
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "diffeqlayers_deposit", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = dst.mutable_data_ptr<scalar_t>();
    const auto c = static_cast<scalar_t>(w);
    const int64_t n = src.numel();
    if (w == 1.0) {
      for (int64_t i = 0; i < n; ++i) d[i] += s[i];
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] += s[i] * c;
    }
  });
}
}  // namespace

GradSinkNode::GradSinkNode(torch::autograd::Edge target, const torch::Tensor& like)
    : box_(like.sizes().vec(), like.options()) {
  add_next_edge(std::move(target));
  add_input_metadata(like);
}

torch::autograd::variable_list GradSinkNode::apply(torch::autograd::variable_list&& grads) {
  torch::Tensor acc = box_.take();
  const torch::Tensor& g = grads[0];
  if (!acc.defined()) return {g};
  return {g.defined() ? acc + g : acc};
}

std::vector<std::pair<int, torch::Tensor>>::iterator DepositBox::find_locked(int task) {
  return std::find_if(buffers_.begin(), buffers_.end(),
                      [task](const auto& entry) { return entry.first == task; });
}

torch::Tensor DepositBox::buffer() {
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = find_locked(task);
  if (it != buffers_.end()) return it->second;
  torch::Tensor buf = at::zeros(sizes_, options_);
  buffers_.emplace_back(task, buf);
  return buf;
}

torch::Tensor DepositBox::take() {
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = find_locked(task);
  if (it == buffers_.end()) return {};
  torch::Tensor buf = std::move(it->second);
  buffers_.erase(it);
  return buf;
}

bool DepositBox::matches(at::ScalarType dtype, int64_t numel) const {
  return dtype == options_.dtype().toScalarType() && c10::multiply_integers(sizes_) == numel;
}

void DepositBox::add(const torch::Tensor& g, double w) { add_scaled(buffer(), g, w); }

torch::Tensor DepositBox::emit(const torch::Tensor& own, const torch::Tensor& extra) {
  torch::Tensor out = take();
  if (own.defined()) {
    if (!out.defined()) {
      out = own;
    } else if (host_loop_grad(own) && matches(own.scalar_type(), own.numel())) {
      add_scaled(out, own, 1.0);  // the buffer is this pass's own: the share is added into it
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
