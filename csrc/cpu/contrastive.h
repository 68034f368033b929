// The fused BRCD / NT-Xent contrastive loss on the CPU (semantics: shared/spec/contrastive-loss.md).
// Plain C++; the 2B x 2B similarity matrix is never stored: tiles are recomputed in the backward pass.
#pragma once
#include <cstdint>

#include "contrastive_problem.h"

namespace brcd::cpu {

// Returns the loss. Saves per row a (2B rows) the log-sum-exp `lse[a]` and the positive logit `pos[a]`.
template <class T>
T contrastive_forward(const ContrastiveProblem<T>& p, T* lse, T* pos);

// Gradients of grad_loss * loss; any output pointer may be null when that gradient is not needed.
template <class T>
void contrastive_backward(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos,
                          T* grad_student, T* grad_teacher_anchor, T* grad_teacher_view);

}  // namespace brcd::cpu
