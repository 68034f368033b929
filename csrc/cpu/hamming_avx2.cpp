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
  // Whole blocks of contiguous rows of W words (W = 2 or 4) into the blocked layout: 4 x 4 transposes of 64-bit words
  // in registers (in-lane unpacks, then a cross-lane permute).
  static inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store4(uint64_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  template <int W>
  static void relayout_rows(const uint8_t* rows, int64_t blocks, uint64_t* out) {
    for (int64_t b = 0; b < blocks; ++b, rows += 64 * W, out += 8 * W) {
      for (int half = 0; half < 2; ++half) {  // rows 0-3, then rows 4-7
        const uint8_t* r = rows + half * 32 * W;
        uint64_t* o = out + 4 * half;
        if constexpr (W == 2) {
          const __m256i a = load32(r), c = load32(r + 32);  // rows 0, 1 and rows 2, 3 of the half
          store4(o, _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(a, c), _MM_SHUFFLE(3, 1, 2, 0)));
          store4(o + 8, _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(a, c), _MM_SHUFFLE(3, 1, 2, 0)));
        } else {
          static_assert(W == 4, "whole-block transposes for 2 and 4 words");
          const __m256i r0 = load32(r), r1 = load32(r + 32), r2 = load32(r + 64), r3 = load32(r + 96);
          const __m256i t0 = _mm256_unpacklo_epi64(r0, r1), t1 = _mm256_unpackhi_epi64(r0, r1);
          const __m256i t2 = _mm256_unpacklo_epi64(r2, r3), t3 = _mm256_unpackhi_epi64(r2, r3);
          store4(o, _mm256_permute2x128_si256(t0, t2, 0x20));
          store4(o + 8, _mm256_permute2x128_si256(t1, t3, 0x20));
          store4(o + 16, _mm256_permute2x128_si256(t0, t2, 0x31));
          store4(o + 24, _mm256_permute2x128_si256(t1, t3, 0x31));
        }
      }
    }
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::avx2
