// Internal (not installed): one node per weight of a built-in module that gathers the weight's
// gradient over all of a recorded solve's evaluations.
//
// Each evaluation of dl.MLP within an unrolled solve is one node with an edge to every weight;
// in the backward pass each hands every weight a fresh gradient tensor, which autograd's engine
// adds to the others as it arrives: one allocation and one ATen addition per weight per
// evaluation (148 of each per training step of the foundation's problem, about a tenth of
// diffeq_rd's step with dl.MLP). While a GradSinks::Scope is open (an explicit solve that
// records), the evaluations' edges to a weight go to that weight's GradSinkNode instead, and their
// host-loop backward adds into the sink's buffer for the running backward pass, handing the
// engine an undefined gradient (which it does not add, but still counts: the sink runs after the
// last evaluation). The sink hands the sum on to the weight.
#pragma once

#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>
#include <torch/types.h>

#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/autograd_node.h"

namespace diffeqlayers::detail {

struct GradSinkNode : public torch::autograd::Node {
  // target: the weight's gradient edge; like: the weight (its metadata is this node's input's).
  GradSinkNode(torch::autograd::Edge target, const torch::Tensor& like);
  std::string name() const override { return "diffeqlayers::GradSinkBackward"; }

  // The running backward pass's buffer for the weight's gradient (zeros when first asked for):
  // to be added into, in place, by the nodes whose edges come here.
  torch::Tensor buffer();

  // Hands on the buffer of the running pass plus any gradient that came through the edges (from
  // nodes that could not add into the buffer: a backward that records, create_graph).
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override;

 private:
  std::vector<int64_t> sizes_;  // the weight's
  at::TensorOptions options_;
  std::mutex mutex_;
  // Keyed by the backward pass (graph task id): passes over one retained graph may run at once.
  std::vector<std::pair<int, torch::Tensor>> buffers_;
};

using GradSinkPtr = decltype(make_node<GradSinkNode>(torch::autograd::Edge(), torch::Tensor()));

class GradSinks {
 public:
  // Opens a scope on this thread while `enabled` (a no-op otherwise), restoring the enclosing
  // one when it closes (a solve nested in f has its own).
  class Scope {
   public:
    explicit Scope(bool enabled);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    GradSinks* sinks_ = nullptr;
    GradSinks* outer_ = nullptr;
  };

  // This thread's open scope, or nullptr.
  static GradSinks* current();

  // The sink of weight w (made on first use), or null when w requires no grad.
  GradSinkPtr sink(const torch::Tensor& w);

 private:
  // Keyed by the weight's TensorImpl, which the entry holds (so the address is not reused while
  // the scope lives).
  std::unordered_map<const c10::TensorImpl*, std::pair<torch::Tensor, GradSinkPtr>> sinks_;
};

}  // namespace diffeqlayers::detail
