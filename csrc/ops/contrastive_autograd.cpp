// Autograd of brcd::contrastive_forward, in C++ for every device: the forward saves the codes and the O(B) row
// statistics, the backward calls brcd::contrastive_backward. A Python autograd.Function costs more than the whole
// loss at small batches (tens of microseconds per step); this one costs a few.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace brcd::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& student, const at::Tensor& teacher_anchor,
                                                const at::Tensor& teacher_view, double temperature,
                                                const at::Tensor& alpha, const std::optional<at::Tensor>& bit_mask,
                                                const std::optional<at::Tensor>& row_groups,
                                                const std::optional<at::Tensor>& col_groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("brcd::contrastive_forward", "")
                             .typed<decltype(call_forward)>();
  return op.call(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher_anchor,
    const at::Tensor& teacher_view, double temperature, const at::Tensor& alpha,
    const std::optional<at::Tensor>& bit_mask, const std::optional<at::Tensor>& row_groups,
    const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats, std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("brcd::contrastive_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_loss, student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups,
                 col_groups, row_stats, output_mask);
}

class ContrastiveLoss : public torch::autograd::Function<ContrastiveLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher_anchor,
                               const at::Tensor& teacher_view, double temperature, const at::Tensor& alpha,
                               const std::optional<at::Tensor>& bit_mask,
                               const std::optional<at::Tensor>& row_groups,
                               const std::optional<at::Tensor>& col_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, stats] =
        call_forward(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups, col_groups);
    ctx->save_for_backward({student, teacher_anchor, teacher_view, alpha, bit_mask.value_or(at::Tensor()),
                            row_groups.value_or(at::Tensor()), col_groups.value_or(at::Tensor()), stats});
    ctx->saved_data["temperature"] = temperature;
    ctx->mark_non_differentiable({stats});
    // The statistics never get a gradient: without this, every backward would first fill a zero tensor for them.
    ctx->set_materialize_grads(false);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);  // no gradient reached the loss: none for the inputs
    const auto saved = ctx->get_saved_variables();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    // Without create_graph (grad mode off here) the gradients need no history: the call goes straight to the
    // kernel. With it, the backward op's own autograd kernel (below) records a node that refuses a second
    // derivative.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    // Only the gradients autograd will use: in distillation the teacher's codes need none, and the products that
    // only feed them are skipped.
    const std::array<bool, 3> wanted = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [gs, ga, gv] = call_backward(grads[0], saved[0], saved[1], saved[2], temperature, saved[3], maybe(saved[4]),
                                      maybe(saved[5]), maybe(saved[6]), saved[7], wanted);
    // One gradient per forward input: the three code tensors, then none for temperature, alpha, mask and groups.
    return {gs, ga, gv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// contrastive_backward under autograd (create_graph=True): the gradients it returns carry a node whose own
// backward raises. The second derivative of the loss is not implemented, and the default fallback would warn and
// then treat it as zero.
class ContrastiveLossBackward : public torch::autograd::Function<ContrastiveLossBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_loss, const at::Tensor& student,
                               const at::Tensor& teacher_anchor, const at::Tensor& teacher_view, double temperature,
                               const at::Tensor& alpha, const std::optional<at::Tensor>& bit_mask,
                               const std::optional<at::Tensor>& row_groups,
                               const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats,
                               std::array<bool, 3> output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gs, ga, gv] = call_backward(grad_loss, student, teacher_anchor, teacher_view, temperature, alpha, bit_mask,
                                      row_groups, col_groups, row_stats, output_mask);
    return {gs, ga, gv};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "brcd_loss / ntxent_loss have no second derivative: differentiating their gradients "
                                "(create_graph=True, then backward through the gradients) is not supported");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_autograd(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher_anchor,
    const at::Tensor& teacher_view, double temperature, const at::Tensor& alpha,
    const std::optional<at::Tensor>& bit_mask, const std::optional<at::Tensor>& row_groups,
    const std::optional<at::Tensor>& col_groups, const at::Tensor& row_stats, std::array<bool, 3> output_mask) {
  auto out = ContrastiveLossBackward::apply(grad_loss, student, teacher_anchor, teacher_view, temperature, alpha,
                                            bit_mask, row_groups, col_groups, row_stats, output_mask);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward_autograd(
    const at::Tensor& student, const at::Tensor& teacher_anchor, const at::Tensor& teacher_view, double temperature,
    const at::Tensor& alpha, const std::optional<at::Tensor>& bit_mask, const std::optional<at::Tensor>& row_groups,
    const std::optional<at::Tensor>& col_groups) {
  auto out = ContrastiveLoss::apply(student, teacher_anchor, teacher_view, temperature, alpha, bit_mask, row_groups,
                                    col_groups);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, Autograd, m) {
  m.impl("contrastive_forward", &contrastive_forward_autograd);
  m.impl("contrastive_backward", &contrastive_backward_autograd);
}

}  // namespace brcd::ops
