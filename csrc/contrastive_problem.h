// The description of one contrastive-loss evaluation, shared by the CPU and CUDA kernels (plain C++).
// Semantics: shared/spec/contrastive-loss.md. Pointers are host pointers for the CPU kernels and device pointers
// for the CUDA ones; every tensor is contiguous.
#pragma once
#include <cstdint>

namespace brcd {

template <class T>
struct ContrastiveProblem {
  int64_t batch = 0;  // B
  int64_t bits = 0;   // K
  T temperature = T(0.3);
  const T* student = nullptr;           // [B, K]
  const T* teacher_anchor = nullptr;    // [B, K]
  const T* teacher_view = nullptr;      // [B, K]
  const T* alpha = nullptr;             // [B], or null: alpha_all for every sample
  T alpha_all = T(0);
  const T* bit_mask = nullptr;          // [B, K] or null (all ones)
  const int64_t* row_groups = nullptr;  // [2B] or null
  const int64_t* col_groups = nullptr;  // [2B] or null
};

// (Host and device: the CUDA kernels read it too; the header stays free of CUDA's own headers.)
#ifdef __CUDACC__
#define BRCD_HOST_DEVICE __host__ __device__
#else
#define BRCD_HOST_DEVICE
#endif

// alpha of sample k.
template <class T>
BRCD_HOST_DEVICE inline T alpha_of(const ContrastiveProblem<T>& p, int64_t k) {
  return p.alpha != nullptr ? p.alpha[k] : p.alpha_all;
}

}  // namespace brcd
