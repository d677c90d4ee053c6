// diffeq_fd: the Jacobian of a solve in forward mode (dual tensors), wrapped in an autograd
// Function whose backward returns grad . J; and single JVPs.
//
// Why the passes look the way they do:
//  * A tangent has its primal's shape and forward AD has one process-global level (nesting is
//    refused by PyTorch), so a plain dual tensor carries one direction. Several directions
//    share a pass as a batched tangent (see kDefaultChunk); torch.func.vmap refuses
//    _make_dual, so this uses the legacy vmap (at::_add_batch_dim) that
//    torch.autograd.functional.jacobian uses for the same purpose. The primal output comes
//    from the first pass (no extra plain solve).
//  * Every floating input gets a tangent in every pass, zeros where it is not the direction.
//    An input without a tangent meets duals inside f with an implicit zero tangent, which in
//    torch 2.13 takes a decomposed slow path (prims ops, ~50x slower per op on small tensors);
//    materialised zeros keep every op on the fast dual kernels.
//  * Step-size control sees primal values only (solve.cpp's step_error works on detached
//    tensors, and detach() drops tangents), so each pass takes exactly the plain solve's steps
//    and J is the exact derivative of that discretisation, as diffeq_rd's is.
#include "diffeqlayers/forward_mode.h"

#include <ATen/ATen.h>
#include <ATen/LegacyVmapMode.h>
#include <ATen/LegacyVmapTransforms.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <thread>

namespace diffeqlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::ForwardADLevel;
using torch::autograd::variable_list;

// Chunking. A pass carries a whole chunk of directions as one batched tangent [k, *shape]
// (PyTorch's legacy vmap, the mechanism torch.autograd.functional.jacobian uses for
// forward-mode vectorisation): the primal stays unbatched, so step-size control, item() and
// the Python calls of f are paid once per chunk, and each op on the tangent is one batched
// kernel. The chunk bounds memory (every tangent the solve keeps, saved states included, is k
// times its primal) and is the unit between calls of on_chunk (Ctrl-C checks). 32 directions:
// on small states (where forward mode is the right choice) a pass then costs little more than
// a plain solve, and the tangents of a saved trajectory stay in the megabytes; beyond that,
// per-op tangent work dominates and larger chunks gain little. When f or the reduction uses an
// op that cannot run on batched tangents, the solve falls back to one direction per pass.
constexpr int64_t kDefaultChunk = 32;

const char* const kNestedMessage =
    "diffeq_fd / diffeq_jvp need PyTorch's forward-AD level, and another forward-AD level is "
    "already active: they cannot run inside torch.func.jvp, torch.func.jacfwd or "
    "torch.autograd.forward_ad.dual_level() (nor while another thread holds such a level), "
    "and cannot be nested inside each other. Call them outside, or use diffeq_rd there.";

// Serialises our own calls: the forward-AD level is process-global, so two threads cannot
// each hold one. A second thread waits (the bindings release the GIL before calling in, so the
// first thread's Python f can still run). The owner is tracked to refuse re-entry on the same
// thread (a closure calling diffeq_fd) with an error instead of a deadlock.
std::mutex g_mutex;
std::atomic<std::thread::id> g_owner{std::thread::id()};

class ExclusiveDualLevel {
 public:
  ExclusiveDualLevel() {
    TORCH_CHECK(g_owner.load() != std::this_thread::get_id(), kNestedMessage);
    lock_ = std::unique_lock<std::mutex>(g_mutex);
    g_owner.store(std::this_thread::get_id());
    try {
      // A level taken outside diffeqlayers (fwAD.dual_level, torch.func.jvp) is level 0.
      TORCH_CHECK(ForwardADLevel::try_get_by_idx(0) == nullptr, kNestedMessage);
      try {
        level_ = ForwardADLevel::get_next_idx();
      } catch (const c10::Error&) {
        // Lost a race with a level entered elsewhere since the check above.
        TORCH_CHECK(false, kNestedMessage);
      }
      TORCH_INTERNAL_ASSERT(level_ == 0);
    } catch (...) {
      g_owner.store(std::thread::id());
      throw;
    }
  }
  ~ExclusiveDualLevel() {
    // Clears every tangent made at this level, then lets the next caller in.
    ForwardADLevel::release_idx(level_);
    g_owner.store(std::thread::id());
  }
  ExclusiveDualLevel(const ExclusiveDualLevel&) = delete;
  ExclusiveDualLevel& operator=(const ExclusiveDualLevel&) = delete;
  uint64_t level() const { return level_; }

 private:
  std::unique_lock<std::mutex> lock_;
  uint64_t level_ = 0;
};

// A (legacy) vmap level for batched tangents; left even on exceptions.
class VmapLevel {
 public:
  VmapLevel() : level_(at::impl::VmapMode::increment_nesting()) {}
  ~VmapLevel() { at::impl::VmapMode::decrement_nesting(); }
  VmapLevel(const VmapLevel&) = delete;
  VmapLevel& operator=(const VmapLevel&) = delete;
  int64_t level() const { return level_; }

 private:
  int64_t level_;
};

// The full reduction aten::sum on a batched tangent. PyTorch's legacy vmap has a rule for
// sum.dim_IntList but none for sum (torch 2.4 to 2.13), so every x.sum() in f, in the
// reduction (`(sol.u ** 2).sum()`) or in the solver's checks took the batched fallback: one sum
// per direction of the chunk in a loop, about 200 us for 16 directions on a small state against
// 23 us for sum over explicit dims. This rule sums the physical tensor over every logical
// dimension at once (the batch dimensions lead after logicalToPhysical).
at::Tensor sum_batching_rule(const at::Tensor& self, std::optional<at::ScalarType> dtype) {
  at::VmapPhysicalView view = at::MultiBatchVmapTransform::logicalToPhysical(self);
  const at::Tensor& physical = view.tensor();
  std::vector<int64_t> dims;
  for (int64_t d = view.numBatchDims(); d < physical.dim(); ++d) dims.push_back(d);
  // A 0-d logical tensor: the sum over an added dimension of size 1 keeps sum's dtype rules
  // (integers to int64) without reducing over the batch dimensions, which an empty list would.
  at::Tensor result = dims.empty() ? at::sum(physical.unsqueeze(-1), {-1}, false, dtype)
                                   : at::sum(physical, dims, false, dtype);
  return view.getPhysicalToLogicalMap().apply(result);
}

// Registers the rule above for the legacy vmap's Batched key once per process, unless this
// PyTorch already has a kernel there (then it is left alone).
void register_batching_rules() {
  static std::once_flag once;
  std::call_once(once, [] {
    const auto op = c10::Dispatcher::singleton().findSchema({"aten::sum", ""});
    if (!op.has_value() || op->hasKernelForDispatchKey(c10::DispatchKey::Batched)) return;
    // Never destroyed: the registration lives as long as the process.
    static auto* lib = new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::Batched,
                                          __FILE__, __LINE__);
    lib->impl("sum", TORCH_FN(sum_batching_rule));
  });
}

bool wants_tangent(const torch::Tensor& x) { return x.defined() && x.is_floating_point(); }

// One pass: inputs made dual with the given tangents (zeros where undefined), the closure called,
// its output split into primal and tangent (zeros when the output does not depend on the inputs).
std::pair<torch::Tensor, torch::Tensor> dual_pass(const SolveAndReduce& fn, uint64_t level,
                                                  const std::vector<torch::Tensor>& inputs,
                                                  const std::vector<torch::Tensor>& tangents) {
  std::vector<torch::Tensor> duals(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const torch::Tensor& x = inputs[i];
    if (!wants_tangent(x)) {
      duals[i] = x;
      continue;
    }
    torch::Tensor tangent = tangents[i].defined() ? tangents[i] : at::zeros_like(x);
    // The primal is detached so that the pass records nothing for reverse mode even if grad
    // mode is on (jvp is called outside any Function).
    duals[i] = at::_make_dual(x.detach(), tangent, static_cast<int64_t>(level));
  }
  std::vector<torch::Tensor> params(duals.begin() + 1, duals.end());
  torch::Tensor out = fn(duals[0], params);
  TORCH_CHECK_TYPE(out.defined(), "the reduction returned no tensor");
  TORCH_CHECK_TYPE(out.is_floating_point(), "the reduction must return a floating tensor, got ",
                   out.scalar_type());
  auto unpacked = at::_unpack_dual(out, static_cast<int64_t>(level));
  // Copies: both are views into tensors whose tangents die with the level.
  torch::Tensor primal = std::get<0>(unpacked).detach().clone();
  torch::Tensor tangent = std::get<1>(unpacked);
  // (No detach() on the tangent: it has no batching rule, and under NoGradGuard the tangent
  // carries no autograd history anyway.)
  tangent = tangent.defined() ? tangent.clone() : at::zeros_like(primal);
  return {primal, tangent};
}

void check_inputs(const torch::Tensor& u0, const std::vector<torch::Tensor>& params) {
  TORCH_CHECK_TYPE(u0.defined(), "u0 is undefined");
  TORCH_CHECK_TYPE(u0.is_floating_point(), "u0 must be a floating tensor, got ", u0.scalar_type());
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_TYPE(params[i].defined(), "parameter ", i, " is undefined");
}

std::pair<torch::Tensor, torch::Tensor> jacobian_impl(const SolveAndReduce& fn,
                                                      const std::vector<torch::Tensor>& inputs,
                                                      const ForwardModeOptions& options) {
  TORCH_CHECK_VALUE(options.chunk_size >= 0, "chunk_size must be non-negative, got ",
                    options.chunk_size);
  const int64_t chunk = options.chunk_size > 0 ? options.chunk_size : kDefaultChunk;
  // Directions: (input index, flat offset) for every scalar of every input requiring grad.
  std::vector<std::pair<size_t, int64_t>> dirs;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (wants_tangent(inputs[i]) && inputs[i].requires_grad())
      for (int64_t j = 0; j < inputs[i].numel(); ++j) dirs.emplace_back(i, j);
  const int64_t n = static_cast<int64_t>(dirs.size());

  register_batching_rules();
  at::NoGradGuard no_grad;
  // Forward AD may have been switched off by the caller; the passes need it.
  c10::AutoFwGradMode fw_grad_on(true);
  ExclusiveDualLevel level;
  const std::vector<torch::Tensor> no_tangents(inputs.size());
  if (n == 0) {
    auto [y, dy] = dual_pass(fn, level.level(), inputs, no_tangents);
    return {y, at::empty({y.numel(), 0}, y.options())};
  }

  torch::Tensor y, jac;
  bool vectorize = options.vectorize;
  // The primal output of every pass is the same; the first one is returned.
  auto keep = [&](const torch::Tensor& primal) {
    if (!y.defined()) {
      y = primal;
      jac = at::empty({y.numel(), n}, y.options());
    }
    TORCH_CHECK(primal.sizes() == y.sizes(), "the reduction returned shape ", primal.sizes(),
                " in one pass and ", y.sizes(),
                " in another: it must not depend on anything but the solution");
  };
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t stop = std::min(n, start + chunk);
    const int64_t k = stop - start;
    torch::Tensor block;  // [y.numel(), k]
    if (vectorize && k > 1) {
      try {
        // One pass for the whole chunk: batched one-hot tangents [k, *shape] per input.
        std::vector<torch::Tensor> batched(inputs.size());
        for (size_t i = 0; i < inputs.size(); ++i)
          if (wants_tangent(inputs[i]))
            batched[i] = at::zeros({k, inputs[i].numel()}, inputs[i].options());
        for (int64_t d = start; d < stop; ++d) {
          const auto [i, j] = dirs[static_cast<size_t>(d)];
          batched[i][d - start][j].fill_(1.0);
        }
        VmapLevel vmap;
        std::vector<torch::Tensor> tangents(inputs.size());
        for (size_t i = 0; i < inputs.size(); ++i) {
          if (!batched[i].defined()) continue;
          std::vector<int64_t> shape{k};
          for (int64_t s : inputs[i].sizes()) shape.push_back(s);
          tangents[i] = at::_add_batch_dim(batched[i].reshape(shape), 0, vmap.level());
        }
        auto [primal, tangent] = dual_pass(fn, level.level(), inputs, tangents);
        // A tangent without the batch dimension (the output ignores the inputs) is expanded.
        torch::Tensor cols = at::_remove_batch_dim(tangent, vmap.level(), k, 0);
        keep(primal);
        block = cols.reshape({k, -1}).t().to(y.scalar_type());
      } catch (const std::exception&) {
        // Some op of f or of the reduction cannot run on batched tangents: one direction per
        // pass from here on (a genuine error in f recurs there and propagates).
        if (options.on_vectorize_failure) options.on_vectorize_failure();
        vectorize = false;
      }
    }
    if (!block.defined()) {
      std::vector<torch::Tensor> columns;
      columns.reserve(static_cast<size_t>(k));
      for (int64_t d = start; d < stop; ++d) {
        const auto [i, j] = dirs[static_cast<size_t>(d)];
        std::vector<torch::Tensor> tangents(inputs.size());
        tangents[i] = at::zeros_like(inputs[i], at::MemoryFormat::Contiguous);
        tangents[i].view({-1})[j].fill_(1.0);
        auto [primal, tangent] = dual_pass(fn, level.level(), inputs, tangents);
        keep(primal);
        columns.push_back(tangent.reshape({-1}).to(y.scalar_type()));
      }
      block = at::stack(columns, 1);
    }
    jac.narrow(1, start, k).copy_(block);
    if (options.on_chunk) options.on_chunk(stop, n);
  }
  return {y, jac};
}

// The closure and options cross Function::apply as one non-tensor argument.
struct FdArgs {
  const SolveAndReduce* fn;
  const ForwardModeOptions* options;
};

struct ForwardModeFunction : public torch::autograd::Function<ForwardModeFunction> {
  // inputs: u0 then the parameters (a TensorList: one autograd input per tensor).
  static torch::Tensor forward(AutogradContext* ctx, const FdArgs& args, at::TensorList inputs) {
    std::vector<torch::Tensor> in(inputs.begin(), inputs.end());
    auto [y, jac] = jacobian_impl(*args.fn, in, *args.options);
    // Columns per input, in order, with each input's shape and dtype, so that backward can
    // split grad . J back into gradients shaped like the inputs.
    std::vector<int64_t> counts, dims, sizes, dtypes;
    for (const auto& x : in) {
      counts.push_back(wants_tangent(x) && x.requires_grad() ? x.numel() : 0);
      dims.push_back(x.dim());
      for (int64_t s : x.sizes()) sizes.push_back(s);
      dtypes.push_back(static_cast<int64_t>(x.scalar_type()));
    }
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["dtypes"] = dtypes;
    ctx->save_for_backward({jac});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const torch::Tensor jac = ctx->get_saved_variables()[0];
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    // J is a constant here: a graph through this backward would give zero second derivatives
    // with respect to the inputs, a wrong answer. Refuse instead.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "diffeq_fd does not support differentiating twice (backward with "
                "create_graph=True); use diffeq_rd for higher derivatives");
    variable_list grads(counts.size() + 1);  // + the non-tensor argument
    const torch::Tensor& g = grad_out[0];
    if (!g.defined()) return grads;
    // grad . J: [m] x [m, n] -> [n], then split into the inputs' shapes.
    torch::Tensor flat = at::matmul(g.reshape({-1}).to(jac.scalar_type()), jac);
    int64_t offset = 0, size_pos = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      std::vector<int64_t> shape(sizes.begin() + size_pos, sizes.begin() + size_pos + dims[i]);
      size_pos += dims[i];
      if (counts[i] == 0) continue;
      grads[i + 1] = flat.narrow(0, offset, counts[i])
                         .reshape(shape)
                         .to(static_cast<at::ScalarType>(dtypes[i]));
      offset += counts[i];
    }
    return grads;
  }
};

// [u0, params...], after checking the closure and the tensors.
std::vector<torch::Tensor> checked_inputs(const SolveAndReduce& solve_and_reduce,
                                          const torch::Tensor& u0,
                                          const std::vector<torch::Tensor>& params) {
  TORCH_CHECK_TYPE(static_cast<bool>(solve_and_reduce), "solve_and_reduce is empty");
  check_inputs(u0, params);
  std::vector<torch::Tensor> inputs{u0};
  inputs.insert(inputs.end(), params.begin(), params.end());
  return inputs;
}

}  // namespace

std::pair<torch::Tensor, torch::Tensor> forward_jacobian(const SolveAndReduce& solve_and_reduce,
                                                         const torch::Tensor& u0,
                                                         const std::vector<torch::Tensor>& params,
                                                         const ForwardModeOptions& options) {
  const std::vector<torch::Tensor> inputs = checked_inputs(solve_and_reduce, u0, params);
  return jacobian_impl(solve_and_reduce, inputs, options);
}

torch::Tensor diffeq_fd(const SolveAndReduce& solve_and_reduce, const torch::Tensor& u0,
                        const std::vector<torch::Tensor>& params,
                        const ForwardModeOptions& options) {
  const std::vector<torch::Tensor> inputs = checked_inputs(solve_and_reduce, u0, params);
  return ForwardModeFunction::apply(FdArgs{&solve_and_reduce, &options}, at::TensorList(inputs));
}

std::pair<torch::Tensor, torch::Tensor> jvp(const SolveAndReduce& solve_and_reduce,
                                            const torch::Tensor& u0,
                                            const std::vector<torch::Tensor>& params,
                                            const torch::Tensor& tangent_u0,
                                            const std::vector<torch::Tensor>& tangent_params) {
  TORCH_CHECK_TYPE(static_cast<bool>(solve_and_reduce), "solve_and_reduce is empty");
  check_inputs(u0, params);
  TORCH_CHECK_VALUE(tangent_params.empty() || tangent_params.size() == params.size(),
                    "tangent_params holds ", tangent_params.size(), " tensors for ", params.size(),
                    " parameters");
  std::vector<torch::Tensor> inputs{u0};
  inputs.insert(inputs.end(), params.begin(), params.end());
  std::vector<torch::Tensor> tangents(inputs.size());
  tangents[0] = tangent_u0;
  for (size_t i = 0; i < tangent_params.size(); ++i) tangents[i + 1] = tangent_params[i];
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!tangents[i].defined()) continue;
    const std::string name =
        i == 0 ? "tangent_u0" : "tangent of parameter " + std::to_string(i - 1);
    TORCH_CHECK_VALUE(wants_tangent(inputs[i]), name, " given for a non-floating input");
    TORCH_CHECK_VALUE(tangents[i].sizes() == inputs[i].sizes(), name, " has shape ",
                      tangents[i].sizes(), " but its primal has shape ", inputs[i].sizes());
    // Contiguous, of the primal's dtype and device: what _make_dual expects of a tangent.
    tangents[i] = tangents[i].detach().to(inputs[i].options()).contiguous();
  }
  register_batching_rules();
  at::NoGradGuard no_grad;
  c10::AutoFwGradMode fw_grad_on(true);
  ExclusiveDualLevel level;
  return dual_pass(solve_and_reduce, level.level(), inputs, tangents);
}

}  // namespace diffeqlayers
