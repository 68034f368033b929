// CUDA implementations of the contrastive-loss ops: torch glue around csrc/cuda/launchers.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "ops/contrastive_common.h"

namespace brcd::ops {
namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "brcd CUDA kernel ", what, " failed: ", cuda::error_string(err));
}

template <class T>
at::Tensor workspace_for(const ContrastiveOperands& o) {
  // The kernels index rows of the 2B x K matrix with 32-bit integers (a batch of 2^29 would be 2^60 pairs anyway).
  TORCH_CHECK_VALUE(o.batch < (int64_t(1) << 29), "student has ", o.batch,
                    " rows: the CUDA kernels take batches below 2^29");
  const size_t bytes = cuda::contrastive_workspace<T>(o.batch, o.bits);
  return at::empty({static_cast<int64_t>(bytes)}, o.student.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cuda(const at::Tensor& student,
                                                            const at::Tensor& teacher_anchor,
                                                            const at::Tensor& teacher_view, double temperature,
                                                            const at::Tensor& alpha,
                                                            const std::optional<at::Tensor>& bit_mask,
                                                            const std::optional<at::Tensor>& row_groups,
                                                            const std::optional<at::Tensor>& col_groups) {
  // Argument checks first: with mixed devices the dispatcher lands here and the error must name the argument.
  const ContrastiveOperands o =
      prepare_operands(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor stats = at::empty({2, 2 * o.batch}, o.student.options());
  at::Tensor loss = at::empty({}, o.student.options());
  void* s = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "contrastive_forward_cuda", [&] {
    at::Tensor ws = workspace_for<scalar_t>(o);
    scalar_t* st = stats.data_ptr<scalar_t>();
    const auto p = make_problem<scalar_t>(o, temperature);
    check_cuda(
        cuda::contrastive_forward<scalar_t>(p, loss.data_ptr<scalar_t>(), st, st + 2 * o.batch, ws.data_ptr(), s),
        "contrastive_forward");
  });
  return {loss.to(o.input_dtype), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher_anchor,
    const at::Tensor& teacher_view, double temperature, const at::Tensor& alpha,
    const std::optional<at::Tensor>& bit_mask, const std::optional<at::Tensor>& row_groups,
    const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats, std::array<bool, 3> output_mask) {
  // Argument checks first: with mixed devices the dispatcher lands here and the error must name the argument.
  const ContrastiveOperands o =
      prepare_operands(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
  const c10::cuda::CUDAGuard guard(student.device());
  check_backward_inputs(grad_loss, row_stats, o);
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor g = grad_loss.reshape({}).to(o.compute_dtype).contiguous();
  at::Tensor gs = at::empty_like(o.student), ga = at::empty_like(o.student), gv = at::empty_like(o.student);
  void* s = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "contrastive_backward_cuda", [&] {
    at::Tensor ws = workspace_for<scalar_t>(o);
    const scalar_t* st = stats.data_ptr<scalar_t>();
    const auto p = make_problem<scalar_t>(o, temperature);
    check_cuda(cuda::contrastive_backward<scalar_t>(p, g.data_ptr<scalar_t>(), st, st + 2 * o.batch,
                                                    gs.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(),
                                                    gv.data_ptr<scalar_t>(), ws.data_ptr(), s),
               "contrastive_backward");
  });
  // The kernels compute all three; one nobody asked for is returned as zeros, as on the CPU.
  for (int i = 0; i < 3; ++i)
    if (!output_mask[i]) (i == 0 ? gs : i == 1 ? ga : gv).zero_();
  return {gs.to(o.input_dtype), ga.to(o.input_dtype), gv.to(o.input_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward_cuda);
  m.impl("contrastive_backward", &contrastive_backward_cuda);
}

}  // namespace brcd::ops
