// Portable scan, for processors without AVX2 (and as the reference path of the SIMD ones).
#include "cpu/hamming_scan.h"

namespace brcd::cpu::scalar {
namespace {

struct Isa {
  template <int WC>
  static inline void all(const uint64_t* block, const uint64_t* q, int64_t words, int32_t* dist8) {
    const int64_t n = WC > 0 ? WC : words;
    for (int l = 0; l < kLanes; ++l) {
      int32_t d = 0;
      for (int64_t w = 0; w < n; ++w) d += __builtin_popcountll(block[w * kLanes + l] ^ q[w]);
      dist8[l] = d;
    }
  }
  template <int WC>
  static inline unsigned below(const uint64_t* block, const uint64_t* q, int64_t words, int64_t threshold,
                               int32_t* dist8) {
    all<WC>(block, q, words, dist8);
    unsigned m = 0;
    for (int l = 0; l < kLanes; ++l) m |= static_cast<unsigned>(dist8[l] < threshold) << l;
    return m;
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::scalar
