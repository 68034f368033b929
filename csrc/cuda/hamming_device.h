// Device helpers shared by the Hamming kernels (distance, two-pass top-k, tensor-core top-k). No torch headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace brcd::cuda {

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Distance between query words in shared memory and a code held in registers (WC > 0) or read from memory.
template <int WC>
struct Code {
  uint64_t w[WC > 0 ? WC : 1];
  const uint64_t* ptr;
  __device__ void load(const uint64_t* db, int64_t idx, int64_t words) {
    ptr = db + idx * words;
    if constexpr (WC > 0) {
#pragma unroll
      for (int i = 0; i < WC; ++i) w[i] = ptr[i];
    }
  }
  __device__ int distance(const uint64_t* q, int64_t words) const {
    int d = 0;
    if constexpr (WC > 0) {
#pragma unroll
      for (int i = 0; i < WC; ++i) d += __popcll(w[i] ^ q[i]);
    } else {
      for (int64_t i = 0; i < words; ++i) d += __popcll(ptr[i] ^ q[i]);
    }
    return d;
  }
};

// The current device's multiprocessors and shared memory a block may opt into (cached per device).
struct DeviceFacts {
  int sm_count = 1;
  int max_smem_optin = 48 * 1024;
  int major = 0;
};
DeviceFacts device_facts();

}  // namespace brcd::cuda
