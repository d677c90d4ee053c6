// State-sized buffers that the loops' unrecorded paths reuse across steps.
#pragma once

#include <torch/types.h>

#include <vector>

namespace diffeqlayers::detail {

// Hands out tensors shaped like the state that nothing else references any more, instead of a
// fresh allocation per stage and step (OrdinaryDiffEq's caches). A buffer is handed out again
// only while the pool holds its last reference, counted on the tensor and on its storage: a
// state still held by the solution, the tape, a dense step, f itself (a Python f that keeps its
// input, or returns it or a view of it) or the caller is never overwritten. Give the buffer to
// lincomb as its `buffer`: it is written only on paths that record no graph.
class BufferPool {
 public:
  explicit BufferPool(size_t capacity = 16) : capacity_(capacity) {}

  torch::Tensor get(const torch::Tensor& like) {
    for (const auto& b : bufs_)
      if (b.use_count() == 1 && b.storage().use_count() == 1 && b.sizes() == like.sizes() &&
          b.scalar_type() == like.scalar_type() && b.device() == like.device())
        return b;
    torch::Tensor b = at::empty(like.sizes(), like.options());
    // Full of buffers still in use (every state saved, say): replace one in turn; whoever
    // holds it keeps it.
    if (bufs_.size() < capacity_) {
      bufs_.push_back(b);
    } else {
      bufs_[next_] = b;
      next_ = (next_ + 1) % capacity_;
    }
    return b;
  }

 private:
  size_t capacity_;
  size_t next_ = 0;
  std::vector<torch::Tensor> bufs_;
};

}  // namespace diffeqlayers::detail
