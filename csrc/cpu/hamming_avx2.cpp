// AVX2 scan: per-byte popcount through a nibble lookup table (vpshufb), summed per word with vpsadbw.
// Standard headers before the target pragma (see contrastive_avx512.cpp).
#include "cpu/hamming_layout.h"

#pragma GCC target("avx2,popcnt")
#include <immintrin.h>

#include "cpu/hamming_scan.h"

namespace brcd::cpu::avx2 {
namespace {

inline __m256i popcount_words(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low_nibble = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low_nibble);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibble);
  const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
  return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
}

struct Words {
  using Vec = __m256i;
  static Vec broadcast(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
};

struct Isa {
  template <int WC>
  using Query = detail::BroadcastQuery<Words, WC>;
  struct Dist {
    __m256i lo, hi;  // lanes 0-3 and 4-7
  };
  template <int WC>
  static inline Dist dist(const uint64_t* block, const Query<WC>& q, int64_t words) {
    const int64_t n = WC > 0 ? WC : words;
    Dist d{_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t w = 0; w < n; ++w) {
      const __m256i qv = q.at(w);
      const __m256i* p = reinterpret_cast<const __m256i*>(block + w * kLanes);
      d.lo = _mm256_add_epi64(d.lo, popcount_words(_mm256_xor_si256(_mm256_loadu_si256(p), qv)));
      d.hi = _mm256_add_epi64(d.hi, popcount_words(_mm256_xor_si256(_mm256_loadu_si256(p + 1), qv)));
    }
    return d;
  }
  static inline unsigned lanes_below(const Dist& d, int64_t threshold) {
    const __m256i t = _mm256_set1_epi64x(threshold);
    return static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(t, d.lo)))) |
           static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(t, d.hi)))) << 4;
  }
  static inline void store(const Dist& d, int32_t* dist8) {
    alignas(32) int64_t tmp[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), d.lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4), d.hi);
    for (int l = 0; l < kLanes; ++l) dist8[l] = static_cast<int32_t>(tmp[l]);
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::avx2
