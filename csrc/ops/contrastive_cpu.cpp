// CPU implementations of the contrastive-loss ops: torch glue around csrc/cpu/contrastive.h.
#include <torch/library.h>

#include <cstring>

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
    const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats, std::array<bool, 3> output_mask) {
  const ContrastiveOperands o =
      prepare_operands(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
  check_backward_inputs(grad_loss, row_stats, o);
  const at::Tensor stats = row_stats.is_contiguous() ? row_stats : row_stats.contiguous();
  // A gradient nobody asked for is not computed (its share of the products is skipped): zeros, written here (a
  // zero_ would be one more dispatcher call per step).
  const auto output = [&](bool wanted) {
    at::Tensor t = at::empty_like(o.student);
    if (!wanted) std::memset(t.data_ptr(), 0, t.nbytes());
    return t;
  };
  at::Tensor gs = output(output_mask[0]), ga = output(output_mask[1]), gv = output(output_mask[2]);
  AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "contrastive_backward_cpu", [&] {
    const auto p = make_problem<scalar_t>(o, temperature);
    // Read in place where it is already the compute dtype (item() is a dispatcher call, at B = 64 a share of the step).
    const scalar_t g = grad_loss.scalar_type() == o.compute_dtype ? *grad_loss.const_data_ptr<scalar_t>()
                                                                  : static_cast<scalar_t>(grad_loss.item<double>());
    const scalar_t* s = stats.data_ptr<scalar_t>();
    const auto out = [&](const at::Tensor& t, bool wanted) { return wanted ? t.data_ptr<scalar_t>() : nullptr; };
    cpu::contrastive_backward<scalar_t>(p, g, s, s + 2 * o.batch, out(gs, output_mask[0]), out(ga, output_mask[1]),
                                        out(gv, output_mask[2]));
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
