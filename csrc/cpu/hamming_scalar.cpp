// Portable scan, for processors without AVX2 (and as the reference path of the SIMD ones).
#include "cpu/hamming_scan.h"

namespace brcd::cpu::scalar {
namespace {

struct Isa {
  template <int WC>
  struct Query {
    const uint64_t* row = nullptr;
    Query() = default;
    Query(const uint64_t* r, int64_t) : row(r) {}
  };
  struct Dist {
    int32_t lane[kLanes];
  };
  template <int WC>
  static inline Dist dist(const uint64_t* block, const Query<WC>& query, int64_t words) {
    const int64_t n = WC > 0 ? WC : words;
    Dist d;
    for (int l = 0; l < kLanes; ++l) {
      d.lane[l] = 0;
      for (int64_t w = 0; w < n; ++w) d.lane[l] += __builtin_popcountll(block[w * kLanes + l] ^ query.row[w]);
    }
    return d;
  }
  static inline unsigned lanes_below(const Dist& d, int64_t threshold) {
    unsigned m = 0;
    for (int l = 0; l < kLanes; ++l) m |= static_cast<unsigned>(d.lane[l] < threshold) << l;
    return m;
  }
  static inline void store(const Dist& d, int32_t* dist8) {
    for (int l = 0; l < kLanes; ++l) dist8[l] = d.lane[l];
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::scalar
