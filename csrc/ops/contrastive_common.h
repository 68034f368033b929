// Argument checks and operand preparation shared by the CPU and CUDA contrastive-loss ops.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "contrastive_problem.h"

namespace brcd::ops {

// The operands in the compute dtype (float32, or float64 for float64 inputs), contiguous, on the codes' device.
struct ContrastiveOperands {
  at::Tensor student, teacher_anchor, teacher_view;
  at::Tensor alpha;  // [B], or undefined: alpha_all for every sample (alpha was a CPU scalar)
  double alpha_all = 0;
  std::optional<at::Tensor> bit_mask, row_groups, col_groups;
  int64_t batch = 0, bits = 0;
  at::ScalarType input_dtype = at::kFloat;
  at::ScalarType compute_dtype = at::kFloat;
};

inline void check_code_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D tensor [batch, bits], got ", t.dim(), " dimensions");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

inline void check_groups(const std::optional<at::Tensor>& g, const char* name, int64_t n2, const at::Device& dev) {
  if (!g.has_value()) return;
  TORCH_CHECK_TYPE(g->scalar_type() == at::kLong, name, " must be int64, got ", g->scalar_type());
  TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == n2, name, " must have shape [2 * batch] = [", n2, "], got ",
                    g->sizes());
  TORCH_CHECK_VALUE(g->device() == dev, name, " is on ", g->device(), " but the codes are on ", dev);
}

inline ContrastiveOperands prepare_operands(const at::Tensor& student, const at::Tensor& teacher_anchor,
                                            const at::Tensor& teacher_view, double temperature,
                                            const at::Tensor& alpha, const std::optional<at::Tensor>& bit_mask,
                                            const std::optional<at::Tensor>& row_groups,
                                            const std::optional<at::Tensor>& col_groups) {
  check_code_tensor(student, "student");
  check_code_tensor(teacher_anchor, "teacher_anchor");
  check_code_tensor(teacher_view, "teacher_view");
  TORCH_CHECK_VALUE(teacher_anchor.sizes() == student.sizes(), "teacher_anchor has shape ", teacher_anchor.sizes(),
                    " but student has shape ", student.sizes());
  TORCH_CHECK_VALUE(teacher_view.sizes() == student.sizes(), "teacher_view has shape ", teacher_view.sizes(),
                    " but student has shape ", student.sizes());
  TORCH_CHECK_TYPE(teacher_anchor.scalar_type() == student.scalar_type() &&
                       teacher_view.scalar_type() == student.scalar_type(),
                   "student, teacher_anchor and teacher_view must share one dtype, got ", student.scalar_type(), ", ",
                   teacher_anchor.scalar_type(), " and ", teacher_view.scalar_type());
  const at::Device dev = student.device();
  TORCH_CHECK_VALUE(teacher_anchor.device() == dev, "teacher_anchor is on ", teacher_anchor.device(),
                    " but student is on ", dev);
  TORCH_CHECK_VALUE(teacher_view.device() == dev, "teacher_view is on ", teacher_view.device(),
                    " but student is on ", dev);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
  const int64_t B = student.size(0), K = student.size(1);
  TORCH_CHECK_VALUE(B >= 1 && K >= 1, "student must have at least one row and one bit, got shape ", student.sizes());

  ContrastiveOperands o;
  o.batch = B;
  o.bits = K;
  o.input_dtype = student.scalar_type();
  o.compute_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Tensors already in the compute dtype and contiguous are used as they are: at small batches each avoided
  // dispatcher call is a measurable share of the step.
  const auto cast = [&](const at::Tensor& t) {
    return t.scalar_type() == o.compute_dtype && t.is_contiguous() ? t : t.to(o.compute_dtype).contiguous();
  };
  o.student = cast(student);
  o.teacher_anchor = cast(teacher_anchor);
  o.teacher_view = cast(teacher_view);

  TORCH_CHECK_TYPE(at::isFloatingType(alpha.scalar_type()), "alpha must be a float or a floating-point tensor, got ",
                   alpha.scalar_type());
  TORCH_CHECK_VALUE(alpha.dim() == 0 || (alpha.dim() == 1 && alpha.size(0) == B),
                    "alpha must be a scalar or have shape [batch] = [", B, "], got ", alpha.sizes());
  if (alpha.dim() == 0 && alpha.is_cpu()) {
    // One value for every sample, read on the host: a CPU scalar may go with codes on any device (as in PyTorch's
    // own ops), and then nothing is copied to the device and nothing waits for it. (A scalar on the GPU is expanded
    // there instead: reading it here would synchronise, which a CUDA graph capture forbids.)
    o.alpha_all = alpha.item<double>();
    TORCH_CHECK_VALUE(o.alpha_all >= 0 && o.alpha_all <= 1, "alpha must lie in [0, 1], got ", o.alpha_all);
  } else {
    TORCH_CHECK_VALUE(alpha.device() == dev, "alpha is on ", alpha.device(), " but the codes are on ", dev);
    o.alpha = cast(alpha.dim() == 0 ? alpha.expand({B}) : alpha);
    if (dev.is_cpu()) {  // on CUDA the Python wrapper checks (a device sync); a loop here costs nothing
      AT_DISPATCH_FLOATING_TYPES(o.compute_dtype, "check_alpha", [&] {
        const scalar_t* a = o.alpha.data_ptr<scalar_t>();
        for (int64_t i = 0; i < B; ++i)
          TORCH_CHECK_VALUE(a[i] >= 0 && a[i] <= 1, "alpha must lie in [0, 1], got ", a[i], " at index ", i);
      });
    }
  }

  if (bit_mask.has_value()) {
    check_code_tensor(*bit_mask, "bit_mask");
    TORCH_CHECK_VALUE(bit_mask->sizes() == student.sizes(), "bit_mask must have the shape of student ",
                      student.sizes(), ", got ", bit_mask->sizes());
    TORCH_CHECK_VALUE(bit_mask->device() == dev, "bit_mask is on ", bit_mask->device(), " but the codes are on ", dev);
    o.bit_mask = cast(*bit_mask);
  }
  check_groups(row_groups, "row_groups", 2 * B, dev);
  check_groups(col_groups, "col_groups", 2 * B, dev);
  TORCH_CHECK_VALUE(row_groups.has_value() == col_groups.has_value(),
                    "row_groups and col_groups must be given together (or both None)");
  if (row_groups.has_value()) {
    o.row_groups = row_groups->is_contiguous() ? *row_groups : row_groups->contiguous();
    o.col_groups = col_groups->is_contiguous() ? *col_groups : col_groups->contiguous();
  }
  return o;
}

// The kernels' view of the prepared operands (host or device pointers, as the operands are).
template <class T>
ContrastiveProblem<T> make_problem(const ContrastiveOperands& o, double temperature) {
  ContrastiveProblem<T> p;
  p.batch = o.batch;
  p.bits = o.bits;
  p.temperature = static_cast<T>(temperature);
  p.student = o.student.data_ptr<T>();
  p.teacher_anchor = o.teacher_anchor.data_ptr<T>();
  p.teacher_view = o.teacher_view.data_ptr<T>();
  p.alpha = o.alpha.defined() ? o.alpha.data_ptr<T>() : nullptr;
  p.alpha_all = static_cast<T>(o.alpha_all);
  p.bit_mask = o.bit_mask ? o.bit_mask->data_ptr<T>() : nullptr;
  p.row_groups = o.row_groups ? o.row_groups->data_ptr<int64_t>() : nullptr;
  p.col_groups = o.col_groups ? o.col_groups->data_ptr<int64_t>() : nullptr;
  return p;
}

// The backward's own inputs: the forward's row statistics and a one-value gradient, on the codes' device.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                  const ContrastiveOperands& o) {
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == 2 && row_stats.size(1) == 2 * o.batch,
                    "row_stats must have shape [2, 2 * batch] (from contrastive_forward), got ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == o.compute_dtype, "row_stats must be ", o.compute_dtype, ", got ",
                   row_stats.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == o.student.device() && row_stats.device() == o.student.device(),
                    "grad_loss and row_stats must be on the codes' device ", o.student.device());
}

}  // namespace brcd::ops
