// Hamming-distance kernels for the CPU. Plain C++ (no torch headers) so other projects can lift them.
//
// Codes are packed bytes, bit j of a code at byte j/8, position j%8 (numpy.packbits(..., bitorder="little")).
// Padding bits beyond nbits are zero in every code, so distances need no bit count.
#pragma once
#include <cstdint>
#include <functional>

namespace brcd::cpu {

struct PackedCodes {
  const uint8_t* data;
  int64_t rows;
  int64_t bytes_per_row;
  int64_t row_stride;  // in bytes
};

enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512Vpopcnt = 2 };

// The best level this processor supports; BRCD_SIMD=scalar|avx2|avx512 caps it (for tests and benchmarks).
SimdLevel simd_level();
const char* simd_level_name(SimdLevel level);

// IEEE half and bfloat16 codes, as their bit patterns (this header holds no torch types).
struct HalfBits {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

// Bit j of packed row r is 1 where codes[r * stride + j] > 0 (a NaN gives 0): numpy.packbits(codes > 0, axis=1,
// bitorder="little"). Row r's ceil(nbits / 8) bytes go to out + r * out_stride (out_stride >= ceil(nbits / 8); bytes
// past them are left as they are). T: float, double, HalfBits, BFloat16Bits, bool and the integer types.
template <class T>
void pack_positive(const T* codes, int64_t rows, int64_t nbits, int64_t stride, uint8_t* out, int64_t out_stride);

// out: queries.rows x db.rows, contiguous.
void hamming_distance(const PackedCodes& queries, const PackedCodes& db, int32_t* out);

// Exact top-k: ascending distance, ties broken by the smaller database index. 1 <= k <= db.rows.
// out_dist and out_idx: queries.rows x k, contiguous.
void hamming_topk(const PackedCodes& queries, const PackedCodes& db, int64_t k, int32_t* out_dist,
                  int64_t* out_idx);

// Where a range search writes its results, once their number is known.
struct RangeOutput {
  int32_t* dist;
  int64_t* idx;
};

// Every database code within Hamming distance `radius` (>= 0) of each query, sorted by (distance, index): query
// qi's results are entries lims[qi] .. lims[qi + 1] - 1 of the outputs (faiss's RangeSearchResult layout). lims:
// queries.rows + 1 entries. The number of results is known only after the scan: allocate(total) is called once,
// outside any parallel region, and returns where to write them. db.rows < 2^31.
void hamming_range_search(const PackedCodes& queries, const PackedCodes& db, int64_t radius, int64_t* lims,
                          const std::function<RangeOutput(int64_t total)>& allocate);

// Labels of the items of a ranking: class ids (relevant when equal) or label bitsets of `words` uint64 per item
// (relevant when they share a bit). Exactly one of ids and bits is set.
struct ItemLabels {
  const int64_t* ids = nullptr;
  const uint64_t* bits = nullptr;
  int64_t words = 0;
};

// AP@k of every query (shared/spec/contrastive-loss.md): the database ranked by ascending distance, ties to the
// smaller index; AP = mean over the relevant items of the top k of (their rank among the relevant) / (their
// position); 0 where none is relevant. Computed from the codes closer than the k-th distance, without sorting.
// 1 <= k <= db.rows < 2^31.
void average_precision(const PackedCodes& queries, const PackedCodes& db, const ItemLabels& query_labels,
                       const ItemLabels& db_labels, int64_t k, double* out);

// Per query, how many database codes lie at each Hamming distance 0..8 * bytes_per_row (all_counts) and how many
// of those are relevant (rel_counts): the histograms behind precision-recall curves and precision within a radius.
// Both queries.rows x (8 * bytes_per_row + 1), contiguous.
void distance_histograms(const PackedCodes& queries, const PackedCodes& db, const ItemLabels& query_labels,
                         const ItemLabels& db_labels, int64_t* all_counts, int64_t* rel_counts);

}  // namespace brcd::cpu
