// Internal (not installed): gradients that several of a recorded solve's own nodes hand one
// tensor, summed by host loops instead of by autograd's engine.
//
// The engine adds the shares a tensor receives one by one as they arrive: an ATen addition each
// (dispatch, TensorIterator, often an allocation), on a small state the largest cost of
// diffeq_rd's backward pass after f's own. While a GradSinks::Scope is open (an explicit solve
// that records on the CPU), two kinds of tensors avoid that:
//
// - The weights of a built-in module (dl.MLP), read by every evaluation of f (148 additions and
//   allocations per training step of the foundation's problem): the evaluations' edges to a
//   weight go to its GradSinkNode, and their host-loop backward adds into the sink's buffer for
//   the running backward pass, handing the engine an undefined gradient (which it does not add
//   but still counts: the sink runs after the last evaluation); the sink hands the sum on.
// - The Runge-Kutta stages, read by every later stage combination of their step, the step's end
//   and its save points (about 90 more additions per training step there): the first reader
//   (the next stage combination, LinCombBackward) is the stage's emitter; the later readers add
//   their shares into the stage's DepositBox and hand an undefined gradient along an edge to an
//   extra input of the emitter, so that the engine runs the emitter after all of them; the
//   emitter adds the box to its own share. Under create_graph (or where a share cannot be added
//   by host loops) the readers send their shares along that edge instead, and the engine adds
//   them there. (A sum node per stage instead cost as much in nodes as it saved in additions.)
#pragma once

#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>
#include <torch/types.h>

#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/autograd_node.h"

namespace diffeqlayers::detail {

// Buffers, one per backward pass (graph task: passes over one retained graph may run at once),
// that several nodes add a tensor's gradient into.
struct DepositBox {
  DepositBox(std::vector<int64_t> sizes, at::TensorOptions options)
      : sizes_(std::move(sizes)), options_(options) {}
  // The running pass's buffer (zeros when first asked for).
  torch::Tensor buffer();
  // Removes and returns the running pass's buffer (undefined when nothing was deposited).
  torch::Tensor take();

  // Whether the box holds `numel` elements of `dtype`: a share of that kind, read by host loops
  // (host_loop_grad), can be deposited.
  bool matches(at::ScalarType dtype, int64_t numel) const;
  // Deposits w * g (w rounded to g's dtype first, as ATen's product rounds it); g matches.
  void add(const torch::Tensor& g, double w);
  // The emitter's gradient for the tensor: its own share plus what came through its extra input
  // plus the running pass's deposits (any of them undefined; undefined if all are).
  torch::Tensor emit(const torch::Tensor& own, const torch::Tensor& extra);

 private:
  std::vector<int64_t> sizes_;
  at::TensorOptions options_;
  std::mutex mutex_;
  std::vector<std::pair<int, torch::Tensor>> buffers_;
  // The entry of graph task `task` in buffers_ (end() if none); mutex_ held.
  std::vector<std::pair<int, torch::Tensor>>::iterator find_locked(int task);
};

struct GradSinkNode : public torch::autograd::Node {
  // target: the weight's gradient edge; like: the weight, defined (its metadata is this node's
  // input's).
  GradSinkNode(torch::autograd::Edge target, const torch::Tensor& like);
  std::string name() const override { return "diffeqlayers::GradSinkBackward"; }

  // The running backward pass's buffer for the weight's gradient (zeros when first asked for):
  // to be added into, in place, by the nodes whose edges come here.
  torch::Tensor buffer() { return box_.buffer(); }

  // Hands on the buffer of the running pass plus any gradient that came through the edges (from
  // nodes that could not add into the buffer: a backward that records, create_graph).
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override;

 private:
  DepositBox box_;  // per backward pass: passes over one retained graph may run at once
};

using GradSinkPtr = decltype(make_node<GradSinkNode>(torch::autograd::Edge(), torch::Tensor()));

// What a reader does with the gradient of one of its inputs.
struct DepositRole {
  std::shared_ptr<DepositBox> box;  // null: an ordinary input
  bool emit = false;                // the first reader: adds the box and the extra input to its own
  uint32_t slot = 0;                // the emitter's extra input (emit only)
};

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

  // Declares t (when it requires grad) read by several of the solver's nodes: its gradient is
  // deferred (DepositBox) when its first reader recorded through record_reader can emit it.
  void share(const torch::Tensor& t);
  static void share_if_open(const torch::Tensor& t) {
    if (GradSinks* s = current()) s->share(t);
  }

  // For a node recording `inputs` (its next edges set already, one per input in order): the role
  // of each input, rewiring the edges of the inputs it deposits to their emitter. can_emit: the
  // node adds deposits to its own gradients (it becomes the emitter of shared inputs read first
  // here); otherwise a shared input read first here is not deferred at all.
  template <typename NodePtr>
  std::vector<DepositRole> record_reader(const NodePtr& node, at::TensorList inputs, bool can_emit);

 private:
  struct Shared {
    torch::autograd::Edge target;  // the tensor's own gradient edge (holds the key's node)
    std::shared_ptr<DepositBox> box;
    torch::autograd::Edge emitter;  // the emitter's extra input; invalid before the first reader
    bool closed = false;            // first read by a node that cannot emit: not deferred
  };
  struct EdgeKey {
    const torch::autograd::Node* node;
    uint32_t input_nr;
    bool operator==(const EdgeKey& o) const { return node == o.node && input_nr == o.input_nr; }
  };
  struct EdgeKeyHash {
    size_t operator()(const EdgeKey& k) const {
      return std::hash<const void*>()(k.node) ^ (static_cast<size_t>(k.input_nr) << 1);
    }
  };
  std::unordered_map<EdgeKey, Shared, EdgeKeyHash> shared_;

  // Keyed by the weight's TensorImpl, which the entry holds (so the address is not reused while
  // the scope lives).
  std::unordered_map<const c10::TensorImpl*, std::pair<torch::Tensor, GradSinkPtr>> sinks_;
};

template <typename NodePtr>
std::vector<DepositRole> GradSinks::record_reader(const NodePtr& node, at::TensorList inputs,
                                                  bool can_emit) {
  std::vector<DepositRole> roles(inputs.size());
  if (shared_.empty()) return {};
  bool any = false;
  for (size_t j = 0; j < inputs.size(); ++j) {
    const torch::Tensor& t = inputs[j];
    if (!t.defined() || !t.requires_grad()) continue;
    const torch::autograd::Edge& e = node->next_edge(j);
    if (!e.is_valid()) continue;
    auto it = shared_.find(EdgeKey{e.function.get(), e.input_nr});
    if (it == shared_.end() || it->second.closed) continue;
    Shared& sh = it->second;
    any = true;
    if (!sh.emitter.is_valid()) {
      if (!can_emit) {
        sh.closed = true;
        continue;
      }
      const uint32_t slot = node->add_input_metadata(t);
      sh.emitter = torch::autograd::Edge(node, slot);
      roles[j] = DepositRole{sh.box, true, slot};
    } else if (sh.emitter.function.get() != node.get()) {
      node->set_next_edge(j, sh.emitter);
      roles[j] = DepositRole{sh.box, false, 0};
    }
    // (The emitter reading the tensor again, f(u) = u say, keeps that input's own edge: an edge
    // to itself would be a cycle.)
  }
  if (!any) return {};
  return roles;
}

}  // namespace diffeqlayers::detail
