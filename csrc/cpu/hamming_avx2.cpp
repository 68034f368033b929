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

struct Isa {
  template <int WC>
  static inline void dist(const uint64_t* block, const uint64_t* q, int64_t words, __m256i& lo, __m256i& hi) {
    const int64_t n = WC > 0 ? WC : words;
    lo = _mm256_setzero_si256();
    hi = _mm256_setzero_si256();
    for (int64_t w = 0; w < n; ++w) {
      const __m256i qv = _mm256_set1_epi64x(static_cast<long long>(q[w]));
      const __m256i* p = reinterpret_cast<const __m256i*>(block + w * kLanes);
      lo = _mm256_add_epi64(lo, popcount_words(_mm256_xor_si256(_mm256_loadu_si256(p), qv)));
      hi = _mm256_add_epi64(hi, popcount_words(_mm256_xor_si256(_mm256_loadu_si256(p + 1), qv)));
    }
  }
  static inline void store(__m256i lo, __m256i hi, int32_t* dist8) {
    alignas(32) int64_t tmp[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4), hi);
    for (int l = 0; l < kLanes; ++l) dist8[l] = static_cast<int32_t>(tmp[l]);
  }
  template <int WC>
  static inline unsigned below(const uint64_t* block, const uint64_t* q, int64_t words, int64_t threshold,
                               int32_t* dist8) {
    __m256i lo, hi;
    dist<WC>(block, q, words, lo, hi);
    const __m256i t = _mm256_set1_epi64x(threshold);
    const unsigned m = static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(t, lo)))) |
                       static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(t, hi))))
                           << 4;
    if (m) store(lo, hi, dist8);
    return m;
  }
  template <int WC>
  static inline void all(const uint64_t* block, const uint64_t* q, int64_t words, int32_t* dist8) {
    __m256i lo, hi;
    dist<WC>(block, q, words, lo, hi);
    store(lo, hi, dist8);
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::avx2
