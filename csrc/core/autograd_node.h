// Internal (not installed): autograd nodes made directly, without the dispatcher or the
// custom-Function machinery, for the solver's own recorded operations on plain CPU tensors (a
// node per stage is most of the unrolled graph of a small f; the generic route costs more than
// the arithmetic there).
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/types.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace diffeqlayers::detail {

// A new node, held as a Tensor's grad_fn is: by std::shared_ptr with torch's deleter (which frees
// long chains without recursion) up to torch 2.12, by c10::intrusive_ptr since.
template <typename NodeT, typename... Args>
auto make_node(Args&&... args) {
  using Held = std::decay_t<decltype(std::declval<const torch::Tensor&>().grad_fn())>;
  if constexpr (std::is_same_v<Held, std::shared_ptr<torch::autograd::Node>>) {
    // Unqualified: found by argument-dependent lookup, on the versions that have it.
    auto del = [](auto* node) { deleteNode(node); };
    return std::shared_ptr<NodeT>(new NodeT(std::forward<Args>(args)...), [del](NodeT* node) {
      del(static_cast<torch::autograd::Node*>(node));
    });
  } else {
    return c10::make_intrusive<NodeT>(std::forward<Args>(args)...);
  }
}

// Makes `node` the grad_fn of `out` (a fresh tensor, not a view), with one input edge per
// tensor of `inputs` in order (an empty edge for those that do not require grad): backward then
// calls node->apply({grad of out}) and hands its j-th result to inputs[j].
template <typename NodePtr>
void record_node(const torch::Tensor& out, const NodePtr& node, at::TensorList inputs) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  torch::autograd::set_history(out, node);
}

}  // namespace diffeqlayers::detail
