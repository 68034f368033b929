// AVX-512 VPOPCNTDQ scan: 8 codes per 512-bit popcount.
// Standard headers before the target pragma (see contrastive_avx512.cpp).
#include "cpu/hamming_layout.h"

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vpopcntdq,popcnt")
// GCC 12's _mm512_cvtepi64_epi32 starts from an undefined vector and -Wmaybe-uninitialized flags it wherever it is
// inlined (a known false positive on its own intrinsic headers): silenced for the intrinsics only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "cpu/hamming_scan.h"

namespace brcd::cpu::avx512 {
namespace {

struct Words {
  using Vec = __m512i;
  static Vec broadcast(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
};

struct Isa {
  template <int WC>
  using Query = detail::BroadcastQuery<Words, WC>;
  template <int WC>
  static inline __m512i dist(const uint64_t* block, const Query<WC>& q, int64_t words) {
    const int64_t n = WC > 0 ? WC : words;
    __m512i acc = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(block), q.at(0)));
    for (int64_t w = 1; w < n; ++w) {
      const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(block + w * kLanes), q.at(w));
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
    }
    return acc;
  }
  using Dist = __m512i;  // 8 distances, one per 64-bit lane
  static inline unsigned lanes_below(Dist d, int64_t threshold) {
    return _mm512_cmplt_epi64_mask(d, _mm512_set1_epi64(threshold));
  }
  static inline void store(Dist d, int32_t* dist8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dist8), _mm512_cvtepi64_epi32(d));
  }
  // The lanes of `lanes` appended as distances and indices (first_index + lane): compressed in registers, then
  // plain stores of all 8 lanes (the caller has room for them).
  static inline int append(Dist d, unsigned lanes, int64_t first_index, int32_t* dist, int64_t* idx) {
    const __mmask8 m = static_cast<__mmask8>(lanes);
    const __m512i index = _mm512_add_epi64(_mm512_set1_epi64(first_index), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dist), _mm256_maskz_compress_epi32(m, _mm512_cvtepi64_epi32(d)));
    _mm512_storeu_si512(idx, _mm512_maskz_compress_epi64(m, index));
    return __builtin_popcount(lanes);
  }
  // Compress in registers, then plain stores of all 8 lanes (the memory form of vpcompressd is microcoded and slow
  // on some processors); the caller's buffer has room for them.
  template <int WC>
  static inline int collect(const uint64_t* block, const Query<WC>& q, int64_t words, int64_t threshold,
                            unsigned valid, int32_t first_index, int32_t* out_dist, int32_t* out_idx) {
    const __m512i d = dist<WC>(block, q, words);
    const __mmask8 m = _mm512_cmplt_epi64_mask(d, _mm512_set1_epi64(threshold)) & static_cast<__mmask8>(valid);
    const __m256i lanes = _mm256_add_epi32(_mm256_set1_epi32(first_index), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_dist),
                        _mm256_maskz_compress_epi32(m, _mm512_cvtepi64_epi32(d)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_idx), _mm256_maskz_compress_epi32(m, lanes));
    return __builtin_popcount(m);
  }
  // The distances of two consecutive blocks (16 codes) as dwords, their indices, and the lanes below threshold.
  template <int WC>
  static inline __mmask16 pair_below(const uint64_t* block, const Query<WC>& q, int64_t words, int64_t threshold,
                                     unsigned valid, int32_t first_index, __m512i& d, __m512i& lanes) {
    // The low dword of every qword of both blocks (distances fit in 32 bits) in one permute.
    const __m512i low_dwords = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    d = _mm512_permutex2var_epi32(dist<WC>(block, q, words), low_dwords, dist<WC>(block + words * kLanes, q, words));
    lanes = _mm512_add_epi32(_mm512_set1_epi32(first_index),
                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_cmplt_epi32_mask(d, _mm512_set1_epi32(static_cast<int32_t>(threshold))) &
           static_cast<__mmask16>(valid);
  }
  // Two consecutive blocks per compress: half the per-code overhead of collect. Writes 16 lanes.
  template <int WC>
  static inline int collect2(const uint64_t* block, const Query<WC>& q, int64_t words, int64_t threshold,
                             unsigned valid, int32_t first_index, int32_t* out_dist, int32_t* out_idx) {
    __m512i d, lanes;
    const __mmask16 m = pair_below<WC>(block, q, words, threshold, valid, first_index, d, lanes);
    _mm512_storeu_si512(out_dist, _mm512_maskz_compress_epi32(m, d));
    _mm512_storeu_si512(out_idx, _mm512_maskz_compress_epi32(m, lanes));
    return __builtin_popcount(m);
  }
  // collect2 with one compress: index << Candidates::kKeyDistBits | distance per code.
  template <int WC>
    requires(WC > 0)
  static inline int collect2_keys(const uint64_t* block, const Query<WC>& q, int64_t threshold, unsigned valid,
                                  int32_t first_index, int32_t* out_keys) {
    __m512i d, lanes;
    const __mmask16 m = pair_below<WC>(block, q, WC, threshold, valid, first_index, d, lanes);
    const __m512i keys = _mm512_or_si512(_mm512_slli_epi32(lanes, Candidates::kKeyDistBits), d);
    _mm512_storeu_si512(out_keys, _mm512_maskz_compress_epi32(m, keys));
    return __builtin_popcount(m);
  }
  // Whole blocks of contiguous rows of W words (W = 2 or 4) into the blocked layout: a block's 8 rows are 8W
  // consecutive words, transposed in registers (two rounds of two-source permutes for W = 4).
  template <int W>
  static void relayout_rows(const uint8_t* rows, int64_t blocks, uint64_t* out) {
    for (int64_t b = 0; b < blocks; ++b, rows += 64 * W, out += 8 * W) {
      if constexpr (W == 2) {
        const __m512i lo = _mm512_loadu_si512(rows), hi = _mm512_loadu_si512(rows + 64);
        _mm512_storeu_si512(out, _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), hi));
        _mm512_storeu_si512(out + 8, _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), hi));
      } else {
        static_assert(W == 4, "whole-block transposes for 2 and 4 words");
        // Rows 0-3 and 4-7 first: words 0 and 1 of four rows in one vector, words 2 and 3 in another.
        const __m512i w01 = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
        const __m512i w23 = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
        const __m512i r0 = _mm512_loadu_si512(rows), r1 = _mm512_loadu_si512(rows + 64);
        const __m512i r2 = _mm512_loadu_si512(rows + 128), r3 = _mm512_loadu_si512(rows + 192);
        const __m512i p01 = _mm512_permutex2var_epi64(r0, w01, r1), p23 = _mm512_permutex2var_epi64(r0, w23, r1);
        const __m512i q01 = _mm512_permutex2var_epi64(r2, w01, r3), q23 = _mm512_permutex2var_epi64(r2, w23, r3);
        const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
        const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
        _mm512_storeu_si512(out, _mm512_permutex2var_epi64(p01, first, q01));
        _mm512_storeu_si512(out + 8, _mm512_permutex2var_epi64(p01, second, q01));
        _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(p23, first, q23));
        _mm512_storeu_si512(out + 24, _mm512_permutex2var_epi64(p23, second, q23));
      }
    }
  }
};

}  // namespace

ScanKernels kernels() { return detail::make_kernels<Isa>(); }

}  // namespace brcd::cpu::avx512
