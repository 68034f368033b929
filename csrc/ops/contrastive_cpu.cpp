// CPU implementations of the contrastive-loss ops: torch glue around csrc/cpu/contrastive.h.
#include <torch/library.h>

#include "cpu/contrastive.h"
#include "ops/contrastive_common.h"

namespace brcd::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cpu(const at::Tensor& student, const at::Tensor& teacher_anchor,
                                                           const at::Tensor& teacher_view, double temperature,
                                                           const at::Tensor& alpha,
                                                           const std::optional<at::Tensor>& bit_mask,
                                                           const std::optional<at::Tensor>& row_groups,
                                                           const std::optional<at::Tensor>& col_groups) {
  const ContrastiveOperands o =
      prepare_operands(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
  at::Tensor stats = at::empty({2, 2 * o.batch}, o.student.options());
  at::Tensor loss = at::empty({}, o.student.options());
  AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "contrastive_forward_cpu", [&] {
    const auto p = make_problem<scalar_t>(o, temperature);
    scalar_t* s = stats.data_ptr<scalar_t>();
    *loss.data_ptr<scalar_t>() = cpu::contrastive_forward<scalar_t>(p, s, s + 2 * o.batch);  // no fill_ dispatch
  });
  return {o.input_dtype == o.compute_dtype ? loss : loss.to(o.input_dtype), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher_anchor,
    const at::Tensor& teacher_view, double temperature, const at::Tensor& alpha,
    const std::optional<at::Tensor>& bit_mask, const std::optional<at::Tensor>& row_groups,
    const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats) {
  const ContrastiveOperands o =
      prepare_operands(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
  check_backward_inputs(grad_loss, row_stats, o);
  const at::Tensor stats = row_stats.is_contiguous() ? row_stats : row_stats.contiguous();
  at::Tensor gs = at::empty_like(o.student), ga = at::empty_like(o.student), gv = at::empty_like(o.student);
  AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "contrastive_backward_cpu", [&] {
    const auto p = make_problem<scalar_t>(o, temperature);
    // Read in place where it is already the compute dtype (item() is a dispatcher call, at B = 64 a share of the step).
    const scalar_t g = grad_loss.scalar_type() == o.compute_dtype ? *grad_loss.const_data_ptr<scalar_t>()
                                                                  : static_cast<scalar_t>(grad_loss.item<double>());
    const scalar_t* s = stats.data_ptr<scalar_t>();
    cpu::contrastive_backward<scalar_t>(p, g, s, s + 2 * o.batch, gs.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(),
                                        gv.data_ptr<scalar_t>());
  });
  if (o.input_dtype == o.compute_dtype) return {gs, ga, gv};
  return {gs.to(o.input_dtype), ga.to(o.input_dtype), gv.to(o.input_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward_cpu);
  m.impl("contrastive_backward", &contrastive_backward_cpu);
}

}  // namespace brcd::ops
