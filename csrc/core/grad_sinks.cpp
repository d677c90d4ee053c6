#include "core/grad_sinks.h"

#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

namespace diffeqlayers::detail {

namespace {
thread_local GradSinks* tls_current = nullptr;
}  // namespace

GradSinkNode::GradSinkNode(torch::autograd::Edge target, const torch::Tensor& like) {
  add_next_edge(std::move(target));
  if (like.defined()) {
    sizes_ = like.sizes().vec();
    options_ = like.options();
    add_input_metadata(like);
  }
}

torch::Tensor GradSinkNode::buffer() {
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, buf] : buffers_)
    if (id == task) return buf;
  torch::Tensor buf = at::zeros(sizes_, options_);
  buffers_.emplace_back(task, buf);
  return buf;
}

torch::autograd::variable_list GradSinkNode::apply(torch::autograd::variable_list&& grads) {
  const int task = torch::autograd::get_current_graph_task_id();
  torch::Tensor acc;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it)
      if (it->first == task) {
        acc = std::move(it->second);
        buffers_.erase(it);
        break;
      }
  }
  torch::Tensor g = grads.empty() ? torch::Tensor() : grads[0];
  if (!acc.defined()) return {g};
  return {g.defined() ? acc + g : acc};
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
