// Runtime choice of the contrastive-loss build for this processor.
#include "cpu/contrastive.h"

#include "cpu/hamming.h"

namespace brcd::cpu {

#define BRCD_DECLARE_ISA(isa)                                                                             \
  namespace isa {                                                                                         \
  template <class T>                                                                                      \
  T forward(const ContrastiveProblem<T>& p, T* lse, T* pos);                                              \
  template <class T>                                                                                      \
  void backward(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos, T* g_student,    \
                T* g_anchor, T* g_view);                                                                  \
  }
BRCD_DECLARE_ISA(avx512)
BRCD_DECLARE_ISA(avx2)
BRCD_DECLARE_ISA(scalar)
#undef BRCD_DECLARE_ISA

namespace {
// The loss needs AVX-512F, not VPOPCNTDQ; the Hamming level is a lower bound of what this processor has.
bool has_avx512f() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && simd_level() == SimdLevel::kAvx512Vpopcnt;
#else
  return false;
#endif
}
bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         static_cast<int>(simd_level()) >= static_cast<int>(SimdLevel::kAvx2);
#else
  return false;
#endif
}
}  // namespace

template <class T>
T contrastive_forward(const ContrastiveProblem<T>& p, T* lse, T* pos) {
  static const bool avx512 = has_avx512f(), avx2_ok = has_avx2();
  if (avx512) return avx512::forward(p, lse, pos);
  if (avx2_ok) return avx2::forward(p, lse, pos);
  return scalar::forward(p, lse, pos);
}

template <class T>
void contrastive_backward(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos,
                          T* grad_student, T* grad_teacher_anchor, T* grad_teacher_view) {
  static const bool avx512 = has_avx512f(), avx2_ok = has_avx2();
  if (avx512) return avx512::backward(p, grad_loss, lse, pos, grad_student, grad_teacher_anchor, grad_teacher_view);
  if (avx2_ok) return avx2::backward(p, grad_loss, lse, pos, grad_student, grad_teacher_anchor, grad_teacher_view);
  return scalar::backward(p, grad_loss, lse, pos, grad_student, grad_teacher_anchor, grad_teacher_view);
}

template float contrastive_forward<float>(const ContrastiveProblem<float>&, float*, float*);
template double contrastive_forward<double>(const ContrastiveProblem<double>&, double*, double*);
template void contrastive_backward<float>(const ContrastiveProblem<float>&, float, const float*, const float*,
                                          float*, float*, float*);
template void contrastive_backward<double>(const ContrastiveProblem<double>&, double, const double*,
                                           const double*, double*, double*, double*);

}  // namespace brcd::cpu
