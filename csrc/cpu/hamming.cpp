// Drivers of the CPU Hamming kernels: layout, threading over queries and database shards, the runtime SIMD choice
// and the counting top-k select.
#include "cpu/hamming.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>

#include "cpu/hamming_layout.h"

namespace brcd::cpu {

// ---------------------------------------------------------------- SIMD choice
namespace {
SimdLevel detect_simd() {
  SimdLevel best = SimdLevel::kScalar;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = SimdLevel::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) best = SimdLevel::kAvx512Vpopcnt;
#endif
  const char* cap = std::getenv("BRCD_SIMD");
  if (cap != nullptr) {
    const std::string c(cap);
    SimdLevel asked = best;
    if (c == "scalar") asked = SimdLevel::kScalar;
    if (c == "avx2") asked = SimdLevel::kAvx2;
    if (c == "avx512") asked = SimdLevel::kAvx512Vpopcnt;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
}

const ScanKernels& kernels() {
  static const ScanKernels k = [] {
    switch (simd_level()) {
#if defined(__x86_64__) || defined(__i386__)
      case SimdLevel::kAvx512Vpopcnt: return avx512::kernels();
      case SimdLevel::kAvx2: return avx2::kernels();
#endif
      default: return scalar::kernels();
    }
  }();
  return k;
}
}  // namespace

SimdLevel simd_level() {
  static const SimdLevel level = detect_simd();
  return level;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512Vpopcnt: return "avx512_vpopcntdq";
    case SimdLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// ---------------------------------------------------------------- packing and layout
namespace {
template <class T>
inline bool positive(T x) {
  return x > T(0);
}
// Above +0 and at most +inf: one unsigned compare of the bits (-0, negatives and NaNs wrap past +inf's pattern).
inline bool positive(HalfBits x) { return static_cast<uint16_t>(x.bits - 1) < 0x7c00; }
inline bool positive(BFloat16Bits x) { return static_cast<uint16_t>(x.bits - 1) < 0x7f80; }
}  // namespace

template <class T>
void pack_positive(const T* codes, int64_t rows, int64_t nbits, int64_t stride, uint8_t* out, int64_t out_stride) {
  const int64_t nbytes = (nbits + 7) / 8, whole = nbits / 8;
  // One pass over the codes, eight compares per byte (the compiler turns them into vector compares and a mask):
  // comparing into a byte tensor first, then packing it, read and wrote the data three times.
#pragma omp parallel for schedule(static) if (rows * nbits > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = codes + r * stride;
    uint8_t* dst = out + r * out_stride;
    for (int64_t byte = 0; byte < whole; ++byte) {
      const T* x = src + byte * 8;
      unsigned v = 0;
#pragma GCC unroll 8
      for (int b = 0; b < 8; ++b) v |= static_cast<unsigned>(positive(x[b])) << b;
      dst[byte] = static_cast<uint8_t>(v);
    }
    if (whole < nbytes) {  // the last, partial byte
      unsigned v = 0;
      for (int64_t j = whole * 8; j < nbits; ++j) v |= static_cast<unsigned>(positive(src[j])) << (j - whole * 8);
      dst[whole] = static_cast<uint8_t>(v);
    }
  }
}

template void pack_positive<float>(const float*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<double>(const double*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<HalfBits>(const HalfBits*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<BFloat16Bits>(const BFloat16Bits*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<bool>(const bool*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<uint8_t>(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<int8_t>(const int8_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<int16_t>(const int16_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<int32_t>(const int32_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t);
template void pack_positive<int64_t>(const int64_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t);

namespace {
int64_t words_for(int64_t bytes) { return std::max<int64_t>(1, (bytes + 7) / 8); }

uint64_t load_word(const uint8_t* row, int64_t bytes, int64_t w) {
  uint64_t v = 0;
  const int64_t begin = w * 8;
  if (begin + 8 <= bytes) {
    std::memcpy(&v, row + begin, 8);  // a whole word: one load (little-endian: byte j -> bits 8j..8j+7)
  } else if (begin < bytes) {
    std::memcpy(&v, row + begin, static_cast<size_t>(bytes - begin));
  }
  return v;
}

// Writes blocks [b0, b1) of the database in the blocked layout at out (zero past the last code).
void relayout_blocks(const PackedCodes& db, int64_t words, int64_t b0, int64_t b1, uint64_t* out) {
  // Rows of whole words, one after another: one word per row is the blocked layout already (a copy), and the
  // ISA's transpose takes every whole block of wider rows.
  if (db.bytes_per_row == words * 8 && db.row_stride == db.bytes_per_row) {
    const int64_t whole = std::max<int64_t>(0, std::min(b1, db.rows / kLanes) - b0);
    const uint8_t* rows = db.data + b0 * kLanes * db.row_stride;
    const auto transpose = kernels().relayout;
    bool done = false;
    if (whole > 0 && words == 1) {
      std::memcpy(out, rows, static_cast<size_t>(whole * kLanes * 8));
      done = true;
    } else if (whole > 0 && transpose != nullptr) {
      done = transpose(rows, whole, words, out);
    }
    if (done) {
      out += whole * words * kLanes;
      b0 += whole;
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    uint64_t* blk = out + (b - b0) * words * kLanes;
    const int64_t r0 = b * kLanes, live = std::min<int64_t>(kLanes, db.rows - r0);
    for (int64_t l = 0; l < live; ++l) {
      const uint8_t* row = db.data + (r0 + l) * db.row_stride;
      for (int64_t w = 0; w < words; ++w) blk[w * kLanes + l] = load_word(row, db.bytes_per_row, w);
    }
    for (int64_t l = live; l < kLanes; ++l)
      for (int64_t w = 0; w < words; ++w) blk[w * kLanes + l] = 0;
  }
}

BlockedCodes blocked_shape(const PackedCodes& db) {
  BlockedCodes out;
  out.rows = db.rows;
  out.words = words_for(db.bytes_per_row);
  out.blocks = (db.rows + kLanes - 1) / kLanes;
  return out;
}

BlockedCodes to_blocked(const PackedCodes& db) {
  BlockedCodes out = blocked_shape(db);
  // Every entry is written below: no zero fill of the whole buffer first.
  out.data.reset(new uint64_t[static_cast<size_t>(out.blocks * out.words * kLanes)]);
  const int64_t per_task = 1024;
#pragma omp parallel for schedule(static) if (db.rows > (1 << 15))
  for (int64_t b = 0; b < out.blocks; b += per_task)
    relayout_blocks(db, out.words, b, std::min(out.blocks, b + per_task), out.data.get() + b * out.words * kLanes);
  return out;
}

QueryWords to_words(const PackedCodes& q) {
  QueryWords out;
  out.rows = q.rows;
  out.words = words_for(q.bytes_per_row);
  out.data.assign(static_cast<size_t>(q.rows * out.words), 0);
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t w = 0; w < out.words; ++w)
      out.data[r * out.words + w] = load_word(q.data + r * q.row_stride, q.bytes_per_row, w);
  return out;
}

constexpr int64_t kQueryBlock = 8;
// Queries per task of the one-shard threshold scan: each chunk of the database in L2 then serves up to 32 queries
// (the database streams from memory a quarter as often), while every thread still gets several tasks.
int64_t scan_query_block(int64_t queries) {
  const int64_t per_thread = queries / (8 * omp_get_max_threads());
  return std::clamp<int64_t>(per_thread / kQueryBlock * kQueryBlock, kQueryBlock, 4 * kQueryBlock);
}
// Codes sampled per query to guess a starting threshold (at most 1/8 of the database).
constexpr int64_t kSampleBlocks = 512;
// The fewest sampled codes a guessed bound stands on.
constexpr double kMinSampled = 4;
// Smallest database shard worth a thread of its own (in blocks of 8 codes).
constexpr int64_t kMinShardBlocks = 4096;

// Database shards for tasks of (query block, shard): about four tasks per thread where the query blocks alone are
// fewer, 1 where they suffice (or the database is too small to split).
int64_t shard_count(int64_t query_blocks, int64_t db_blocks) {
  const int64_t threads = omp_get_max_threads();
  if (query_blocks >= 4 * threads) return 1;
  const int64_t wanted = (4 * threads + query_blocks - 1) / query_blocks;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, db_blocks / kMinShardBlocks));
}
}  // namespace

// ---------------------------------------------------------------- top-k state
TopkState::TopkState(int64_t k, int64_t nbits, int64_t max_dist)
    : k_(k), threshold_(std::min(max_dist, nbits) + 1), at_or_below_(0), count_(static_cast<size_t>(nbits + 2), 0) {
  capacity_ = std::max<int64_t>(2 * k, 64);
}

void TopkState::push_batch(const int32_t* dist, const int64_t* idx, int64_t n, int64_t rows) {
  if (size_ + n > static_cast<int64_t>(cand_dist_.size())) {
    const size_t grown = static_cast<size_t>(std::max(size_ + n, std::min(2 * size_ + 64, capacity_ + n)));
    cand_dist_.resize(grown);
    cand_idx_.resize(grown);
  }
  // Branch-free: every candidate is written and kept or not by advancing the end. The threshold stays fixed for
  // the batch (accepting a few more than needed is harmless: compact() drops them).
  const int64_t below = threshold_;
  int32_t* cd = cand_dist_.data();
  int64_t* ci = cand_idx_.data();
  int64_t* count = count_.data();
  int64_t end = size_;
  for (int64_t r = 0; r < n; ++r) {
    const int32_t d = dist[r];
    const int64_t keep = (d < below) & (idx[r] < rows);
    cd[end] = d;
    ci[end] = idx[r];
    end += keep;
    count[d] += keep;
  }
  at_or_below_ += end - size_;
  size_ = end;
  // Lower the threshold while the candidates strictly below it already number k.
  while (at_or_below_ - count_[threshold_] >= k_) {
    at_or_below_ -= count_[threshold_];
    --threshold_;
  }
  if (size_ >= capacity_) compact();
}

void TopkState::compact() {
  // Keep every candidate below the threshold, and the earliest (smallest-index) ones at it, up to k in all.
  const int64_t below = at_or_below_ - count_[threshold_];
  int64_t room_at = k_ - below;
  int64_t w = 0;
  const int64_t t = threshold_;
  for (int64_t r = 0; r < size_; ++r) {  // branch-free: which candidates stay is data, not a pattern
    const int32_t d = cand_dist_[r];
    const int64_t at = d == t;
    const int64_t keep = (d < t) | (at & (room_at > 0));
    room_at -= at & keep;
    cand_dist_[w] = d;
    cand_idx_[w] = cand_idx_[r];
    w += keep;
  }
  size_ = w;
  const int64_t kept_at = std::min<int64_t>(count_[threshold_], k_ - below);  // threshold_ <= nbits + 1: in range
  count_[threshold_] = kept_at;
  at_or_below_ = below + kept_at;
}

namespace {
// The first min(size, k) of index-ordered (distance, index) pairs by distance, ties kept in index order: a stable
// counting sort over the distances 0 .. bins - 1. Returns how many it wrote.
template <class Index>
int64_t counting_select(const int32_t* dist, const Index* idx, int64_t size, int64_t k, int64_t bins,
                        int32_t* out_dist, int64_t* out_idx) {
  std::vector<int64_t> start(static_cast<size_t>(bins + 1), 0);
  for (int64_t r = 0; r < size; ++r) ++start[dist[r] + 1];
  for (int64_t d = 0; d < bins; ++d) start[d + 1] += start[d];
  const int64_t n = std::min(size, k);
  for (int64_t r = 0; r < size; ++r) {
    const int64_t pos = start[dist[r]]++;
    if (pos < n) {
      out_dist[pos] = dist[r];
      out_idx[pos] = idx[r];
    }
  }
  return n;
}
}  // namespace

int64_t TopkState::finish(int32_t* out_dist, int64_t* out_idx) {
  compact();
  // The buffer is in ascending index order, so equal distances stay index-ordered.
  return counting_select(cand_dist_.data(), cand_idx_.data(), size_, k_,
                         static_cast<int64_t>(count_.size()), out_dist, out_idx);
}

int64_t TopkState::finish(std::vector<int32_t>& dist, std::vector<int64_t>& idx) {
  compact();
  const size_t at = dist.size(), n = static_cast<size_t>(std::min(size_, k_));
  dist.resize(at + n);
  idx.resize(at + n);
  return finish(dist.data() + at, idx.data() + at);
}

// ---------------------------------------------------------------- entry points
void hamming_distance(const PackedCodes& queries, const PackedCodes& db, int32_t* out) {
  if (queries.rows == 0 || db.rows == 0) return;
  const BlockedCodes blocked = to_blocked(db);
  const QueryWords q = to_words(queries);
  const ScanKernels& kern = kernels();
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
  const int64_t shards = shard_count(qblocks, blocked.blocks);
  const int64_t shard_len = (blocked.blocks + shards - 1) / shards;
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t qb = 0; qb < qblocks; ++qb) {
    for (int64_t s = 0; s < shards; ++s) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
      const int64_t b0 = s * shard_len, b1 = std::min(blocked.blocks, b0 + shard_len);
      if (b0 < b1) kern.distance(blocked, q, q0, q1, b0, b1, out + q0 * blocked.rows + b0 * kLanes, blocked.rows);
    }
  }
}

namespace {
// A starting threshold per query from an evenly strided sample of the database: the smallest distance whose
// sampled count, scaled to the whole database, reaches twice k. The scan then pushes few candidates beyond the
// final k; it stays exact because a query left with fewer than k qualifying codes is scanned again in full.
class SampledThresholds {
 public:
  // margin: how many times k codes the bound should admit (the threshold state tightens a loose bound as it
  // scans; a candidate list keeps whatever it admits, so it wants a tight one).
  SampledThresholds(const BlockedCodes& db, const QueryWords& q, const ScanKernels& kern, int64_t k,
                    double margin = 2.0) {
    const int64_t sample_blocks = std::min(kSampleBlocks, db.blocks / 16);
    if (sample_blocks < 16) return;  // small databases: not worth it
    BlockedCodes sample;
    sample.words = db.words;
    sample.blocks = sample_blocks;
    sample.rows = sample_blocks * kLanes;
    sample.data.reset(new uint64_t[static_cast<size_t>(sample_blocks * db.words * kLanes)]);
    const int64_t stride = db.blocks / sample_blocks;
    for (int64_t s = 0; s < sample_blocks; ++s)
      std::copy(db.block(s * stride), db.block(s * stride) + db.words * kLanes,
                sample.data.get() + s * db.words * kLanes);
    const int64_t bins = db.words * 64 + 1;
    // margin * k codes expected at or below the threshold; a sampled count of `need` stands for need * n / sample.
    // At least kMinSampled sampled codes: a bound from the one or two nearest sampled codes is too often too
    // tight for small k, and a query left short is rescanned alone.
    const double need = std::max<double>(
        kMinSampled, margin * static_cast<double>(k) * static_cast<double>(sample.rows) / static_cast<double>(db.rows));
    max_dist_.assign(static_cast<size_t>(q.rows), -1);
    const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
    {
      std::vector<int32_t> dist(static_cast<size_t>(kQueryBlock * sample.rows));
      // Four interleaved histograms: neighbouring codes often share a distance, and one counter would make each
      // increment wait for the last. (The sample's rows are whole blocks of 8, so a multiple of 4.)
      std::vector<int64_t> hist(static_cast<size_t>(4 * bins));
#pragma omp for schedule(dynamic)
      for (int64_t qb = 0; qb < qblocks; ++qb) {
        const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
        kern.distance(sample, q, q0, q1, 0, sample.blocks, dist.data(), sample.rows);
        for (int64_t qi = q0; qi < q1; ++qi) {
          std::fill(hist.begin(), hist.end(), 0);
          const int32_t* row = dist.data() + (qi - q0) * sample.rows;
          for (int64_t j = 0; j < sample.rows; j += 4)
            for (int64_t u = 0; u < 4; ++u) ++hist[u * bins + row[j + u]];
          int64_t cum = 0, d = 0;
          for (; d < bins - 1; ++d) {
            cum += hist[d] + hist[bins + d] + hist[2 * bins + d] + hist[3 * bins + d];
            if (static_cast<double>(cum) >= need) break;
          }
          max_dist_[qi] = d;
        }
      }
    }
  }
  // The guessed bound for query qi, or nbits (no bound) where none was guessed.
  int64_t max_dist(int64_t qi, int64_t nbits) const {
    return max_dist_.empty() || max_dist_[qi] < 0 ? nbits : max_dist_[qi];
  }

 private:
  std::vector<int64_t> max_dist_;
};

// Where k is a few percent of the database, hits are dense: the branch-free candidate scan beats the threshold state.
bool dense_hits(int64_t k, int64_t n) {
  return k * 64 >= n && n < std::numeric_limits<int32_t>::max();
}

// A tight bound for candidate lists: about 1.25 k codes expected below it.
constexpr double kCandidateMargin = 1.25;

// Every code of queries [q0, q1) closer than its guessed bound, in index order. A query with fewer than k of them
// is scanned again with a looser bound (up to none at all), so each list ends up holding the query's whole top k.
void collect_candidates(const BlockedCodes& db, const QueryWords& q, const ScanKernels& kern,
                        const SampledThresholds& guess, int64_t k, int64_t q0, int64_t q1,
                        std::vector<Candidates>& cands) {
  const int64_t nbits = db.words * 64;
  cands.resize(static_cast<size_t>(q1 - q0));
  for (int64_t qi = q0; qi < q1; ++qi) cands[qi - q0].reset(static_cast<int32_t>(guess.max_dist(qi, nbits) + 1));
  kern.collect(db, q, q0, q1, 0, db.blocks, cands.data());
  const int32_t step = static_cast<int32_t>(std::max<int64_t>(1, nbits / 32));
  for (int64_t qi = q0; qi < q1; ++qi) {
    Candidates& c = cands[qi - q0];
    while (c.size < k) {
      c.limit = static_cast<int32_t>(std::min<int64_t>(nbits + 1, c.limit + step));
      c.size = 0;
      kern.collect(db, q, qi, qi + 1, 0, db.blocks, &c);
    }
    c.unpack_keys();
  }
}

// per_query(candidates, qi, scratch) for every query, in parallel over blocks of queries, with each query's
// index-ordered candidates; Scratch holds a thread's reusable buffers.
template <class Scratch, class PerQuery>
void for_each_query_candidates(const BlockedCodes& db, const QueryWords& q, const ScanKernels& kern, int64_t k,
                               PerQuery&& per_query) {
  const SampledThresholds guess(db, q, kern, k, kCandidateMargin);
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    std::vector<Candidates> cands;
    Scratch scratch;
#pragma omp for schedule(dynamic)
    for (int64_t qb = 0; qb < qblocks; ++qb) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
      collect_candidates(db, q, kern, guess, k, q0, q1, cands);
      for (int64_t qi = q0; qi < q1; ++qi) per_query(cands[qi - q0], qi, scratch);
    }
  }
}

// Counting select over whole distance rows, for k a sizeable share of n (where the threshold scan would accept a
// large fraction of the database): distances of a block of queries, a histogram, then one pass in index order that
// drops each winner straight into its sorted place (offset of its distance + arrivals so far).
void topk_by_histogram(const BlockedCodes& db, const QueryWords& q, const ScanKernels& kern, int64_t k,
                       int32_t* out_dist, int64_t* out_idx) {
  const int64_t n = db.rows, bins = db.words * 64 + 1;
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    std::vector<int32_t> dist(static_cast<size_t>(kQueryBlock * n));
    std::vector<int64_t> start(static_cast<size_t>(bins + 1));
#pragma omp for schedule(dynamic)
    for (int64_t qb = 0; qb < qblocks; ++qb) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
      kern.distance(db, q, q0, q1, 0, db.blocks, dist.data(), n);
      for (int64_t qi = q0; qi < q1; ++qi) {
        const int32_t* row = dist.data() + (qi - q0) * n;
        std::fill(start.begin(), start.end(), 0);
        for (int64_t j = 0; j < n; ++j) ++start[row[j] + 1];
        for (int64_t d = 0; d < bins; ++d) start[d + 1] += start[d];  // start[d]: codes closer than d
        int64_t t = 0;
        while (start[t + 1] < k) ++t;  // the k-th distance
        int64_t room_at_t = k - start[t];
        int32_t* od = out_dist + qi * k;
        int64_t* oi = out_idx + qi * k;
        for (int64_t j = 0; j < n; ++j) {
          const int32_t d = row[j];
          if (d > t || (d == t && room_at_t == 0)) continue;
          if (d == t) --room_at_t;
          const int64_t pos = start[d]++;
          od[pos] = d;
          oi[pos] = j;
        }
      }
    }
  }
}
// Few queries over a large database: each thread task takes a shard of the database and every query, re-lays the
// shard in the blocked layout one cache-sized chunk at a time (the whole database never needs a second copy, which
// costs more than the scan itself for a handful of queries), keeps each query's top k of the shard, and the
// shards' winners are merged afterwards in shard order.
void topk_few_queries(const PackedCodes& db, const QueryWords& q, const ScanKernels& kern, int64_t k, int64_t shards,
                      int32_t* out_dist, int64_t* out_idx) {
  const BlockedCodes shape = blocked_shape(db);
  const int64_t nbits = shape.words * 64;  // an upper bound on any distance
  const int64_t shard_len = (shape.blocks + shards - 1) / shards;
  const int64_t chunk = chunk_blocks(shape.words);
  std::vector<int32_t> part_dist(static_cast<size_t>(q.rows * shards * k));
  std::vector<int64_t> part_idx(part_dist.size());
  std::vector<int64_t> part_count(static_cast<size_t>(q.rows * shards), 0);
#pragma omp parallel for schedule(dynamic)
  for (int64_t s = 0; s < shards; ++s) {
    const int64_t b0 = s * shard_len, b1 = std::min(shape.blocks, b0 + shard_len);
    if (b0 >= b1) continue;
    BlockedCodes part = blocked_shape(db);
    part.data.reset(new uint64_t[static_cast<size_t>(chunk * part.words * kLanes)]);
    std::vector<TopkState> states(static_cast<size_t>(q.rows), TopkState(k, nbits, nbits));
    for (int64_t c0 = b0; c0 < b1; c0 += chunk) {
      const int64_t c1 = std::min(b1, c0 + chunk);
      relayout_blocks(db, part.words, c0, c1, part.data.get());
      part.first_block = c0;
      kern.topk(part, q, 0, q.rows, c0, c1, states.data());
    }
    for (int64_t qi = 0; qi < q.rows; ++qi) {
      const size_t slot = static_cast<size_t>(qi * shards + s);
      part_count[slot] = states[qi].finish(part_dist.data() + slot * k, part_idx.data() + slot * k);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t qi = 0; qi < q.rows; ++qi) {
    // The shards' winners fed to one more select in shard order: equal distances then arrive in index order,
    // which is all the select needs for its ties.
    TopkState merged(k, nbits, nbits);
    for (int64_t s = 0; s < shards; ++s) {
      const size_t slot = static_cast<size_t>(qi * shards + s);
      merged.push_batch(part_dist.data() + slot * k, part_idx.data() + slot * k, part_count[slot],
                        std::numeric_limits<int64_t>::max());
    }
    merged.finish(out_dist + qi * k, out_idx + qi * k);
  }
}
}  // namespace

void hamming_topk(const PackedCodes& queries, const PackedCodes& db, int64_t k, int32_t* out_dist,
                  int64_t* out_idx) {
  if (queries.rows == 0) return;
  const QueryWords q = to_words(queries);
  const ScanKernels& kern = kernels();
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
  const int64_t db_blocks = blocked_shape(db).blocks;
  // Where k is a quarter of the database or more, the threshold scan would accept most of it.
  const bool by_histogram = k * 4 >= db.rows && q.rows >= omp_get_max_threads();
  // Too few query blocks to share the threads: shards of the database, each one task over every query.
  if (!by_histogram && shard_count(qblocks, db_blocks) > 1)
    return topk_few_queries(db, q, kern, k, shard_count(1, db_blocks), out_dist, out_idx);
  const BlockedCodes blocked = to_blocked(db);
  if (by_histogram) {
    topk_by_histogram(blocked, q, kern, k, out_dist, out_idx);
    return;
  }
  const int64_t nbits = blocked.words * 64;  // an upper bound on any distance

  if (dense_hits(k, blocked.rows)) {
    struct NoScratch {};
    for_each_query_candidates<NoScratch>(blocked, q, kern, k, [&](const Candidates& c, int64_t qi, NoScratch&) {
      counting_select(c.dist.get(), c.idx.get(), c.size, k, nbits + 2, out_dist + qi * k, out_idx + qi * k);
    });
    return;
  }

  const SampledThresholds guess(blocked, q, kern, k);
  const int64_t per_task = scan_query_block(q.rows);
#pragma omp parallel for schedule(dynamic)
  for (int64_t q0 = 0; q0 < q.rows; q0 += per_task) {
    const int64_t q1 = std::min(q.rows, q0 + per_task);
    std::vector<TopkState> states;
    states.reserve(static_cast<size_t>(q1 - q0));
    for (int64_t qi = q0; qi < q1; ++qi) states.emplace_back(k, nbits, guess.max_dist(qi, nbits));
    kern.topk(blocked, q, q0, q1, 0, blocked.blocks, states.data());
    for (int64_t qi = q0; qi < q1; ++qi) {
      if (states[qi - q0].finish(out_dist + qi * k, out_idx + qi * k) == k) continue;
      TopkState again(k, nbits, nbits);  // the guess was too tight for this query: scan everything
      kern.topk(blocked, q, qi, qi + 1, 0, blocked.blocks, &again);
      again.finish(out_dist + qi * k, out_idx + qi * k);
    }
  }
}

// ---------------------------------------------------------------- range search
namespace {
// A query's hits in one shard of the database: in index order, or sorted by distance and in index order among equal
// distances, chunk after chunk; either way a stable sort by distance puts them in (distance, index) order.
struct Hits {
  std::vector<int32_t> dist;
  std::vector<int64_t> idx;
};

// The share of query-code pairs closer than `limit`, from up to 64 evenly strided queries and 4096 evenly strided
// codes.
double sampled_hit_share(const PackedCodes& db, const QueryWords& q, const ScanKernels& kern, int32_t limit) {
  const int64_t rows = std::min<int64_t>(db.rows, 4096), step = db.rows / rows;
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * db.bytes_per_row));
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(bytes.data() + r * db.bytes_per_row, db.data + r * step * db.row_stride,
                static_cast<size_t>(db.bytes_per_row));
  const BlockedCodes sample = to_blocked({bytes.data(), rows, db.bytes_per_row, db.bytes_per_row});
  QueryWords some;
  some.words = q.words;
  some.rows = std::min<int64_t>(q.rows, 64);
  const int64_t qstep = q.rows / some.rows;
  for (int64_t r = 0; r < some.rows; ++r)
    some.data.insert(some.data.end(), q.row(r * qstep), q.row(r * qstep) + q.words);
  std::vector<int32_t> dist(static_cast<size_t>(some.rows * rows));
  kern.distance(sample, some, 0, some.rows, 0, sample.blocks, dist.data(), rows);
  const auto hits = std::count_if(dist.begin(), dist.end(), [&](int32_t d) { return d < limit; });
  return static_cast<double>(hits) / static_cast<double>(dist.size());
}

// Above this share of the database per query, hits are dense enough for the branch-free candidate lists to beat the
// threshold scan, whose branchy bookkeeping per hit stalls (1M uniformly random 64-bit codes, 200 queries, on the
// 2-core EPYC: 9.2 against 13.9 ms at 0.08 %, even at 0.4 %, 41 against 19 ms at 1.6 %).
constexpr double kDenseHitShare = 0.004;

// Appends to hits[(qi - q0) * stride] every code of blocks [b0, b1) of db closer than `limit` to query qi, for the
// queries [q0, q1).
void scan_hits(const BlockedCodes& db, const QueryWords& q, const ScanKernels& kern, int32_t limit, bool dense,
               int64_t q0, int64_t q1, int64_t b0, int64_t b1, Hits* hits, int64_t stride) {
  if (dense) {
    std::vector<Candidates> cands(static_cast<size_t>(q1 - q0));
    for (Candidates& c : cands) c.reset(limit);
    kern.collect(db, q, q0, q1, b0, b1, cands.data());
    for (int64_t qi = q0; qi < q1; ++qi) {
      Candidates& c = cands[qi - q0];
      c.unpack_keys();
      Hits& h = hits[(qi - q0) * stride];
      h.dist.insert(h.dist.end(), c.dist.get(), c.dist.get() + c.size);
      h.idx.insert(h.idx.end(), c.idx.get(), c.idx.get() + c.size);
    }
    return;
  }
  // The top-k scan with k = every code: its threshold never tightens below the radius, and it visits the codes
  // of a block only where the block has a hit.
  std::vector<TopkState> states;
  states.reserve(static_cast<size_t>(q1 - q0));
  for (int64_t qi = q0; qi < q1; ++qi) states.emplace_back(db.rows, db.words * 64, limit - 1);
  kern.topk(db, q, q0, q1, b0, b1, states.data());
  for (int64_t qi = q0; qi < q1; ++qi) {
    Hits& h = hits[(qi - q0) * stride];
    states[qi - q0].finish(h.dist, h.idx);
  }
}

// Runs task(t) for t in [0, tasks) on the OpenMP threads and rethrows the first exception a task threw: the number
// of hits is the caller's to bound (a radius near nbits returns the whole database per query), and a failed
// allocation must reach Python as an exception, not terminate the process from inside a parallel region.
template <class Task>
void parallel_tasks(int64_t tasks, Task&& task) {
  std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < tasks; ++t) {
    try {
      task(t);
    } catch (...) {
#pragma omp critical(brcd_parallel_tasks_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}
}  // namespace

void hamming_range_search(const PackedCodes& queries, const PackedCodes& db, int64_t radius, int64_t* lims,
                          const std::function<RangeOutput(int64_t total)>& allocate) {
  lims[0] = 0;
  if (queries.rows == 0) {
    allocate(0);
    return;
  }
  const QueryWords q = to_words(queries);
  const ScanKernels& kern = kernels();
  const BlockedCodes shape = blocked_shape(db);
  const int32_t limit = static_cast<int32_t>(std::min(radius, shape.words * 64) + 1);  // accept d < limit
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
  const int64_t shards = shard_count(qblocks, shape.blocks);
  const bool dense = sampled_hit_share(db, q, kern, limit) > kDenseHitShare;
  // hits[qi * shards + s]: query qi's hits in shard s.
  std::vector<Hits> hits(static_cast<size_t>(q.rows * shards));
  if (shards == 1) {
    const BlockedCodes blocked = to_blocked(db);
    parallel_tasks(qblocks, [&](int64_t qb) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
      scan_hits(blocked, q, kern, limit, dense, q0, q1, 0, blocked.blocks, hits.data() + q0, 1);
    });
  } else {
    // Few queries over a large database: each task scans a shard for every query, re-laying it one cache-sized chunk
    // at a time (for a handful of queries a whole re-laid copy of the database costs more than the scan).
    const int64_t shard_len = (shape.blocks + shards - 1) / shards, chunk = chunk_blocks(shape.words);
    parallel_tasks(shards, [&](int64_t s) {
      const int64_t b0 = s * shard_len, b1 = std::min(shape.blocks, b0 + shard_len);
      BlockedCodes part = blocked_shape(db);
      part.data.reset(new uint64_t[static_cast<size_t>(chunk * part.words * kLanes)]);
      for (int64_t c0 = b0; c0 < b1; c0 += chunk) {
        const int64_t c1 = std::min(b1, c0 + chunk);
        relayout_blocks(db, part.words, c0, c1, part.data.get());
        part.first_block = c0;
        scan_hits(part, q, kern, limit, dense, 0, q.rows, c0, c1, hits.data() + s, shards);
      }
    });
  }
  for (int64_t qi = 0; qi < q.rows; ++qi) {
    int64_t n = 0;
    for (int64_t s = 0; s < shards; ++s)
      n += static_cast<int64_t>(hits[static_cast<size_t>(qi * shards + s)].idx.size());
    lims[qi + 1] = lims[qi] + n;
  }
  const RangeOutput out = allocate(lims[q.rows]);
  // Per query, a stable counting sort by distance of its hits, shard after shard: ties end in index order.
#pragma omp parallel
  {
    std::vector<int64_t> start(static_cast<size_t>(limit) + 1);
#pragma omp for schedule(dynamic, 16)
    for (int64_t qi = 0; qi < q.rows; ++qi) {
      std::fill(start.begin(), start.end(), 0);
      for (int64_t s = 0; s < shards; ++s)
        for (const int32_t d : hits[static_cast<size_t>(qi * shards + s)].dist) ++start[d + 1];
      start[0] = lims[qi];
      for (int32_t d = 0; d < limit; ++d) start[d + 1] += start[d];  // start[d]: where distance d begins
      for (int64_t s = 0; s < shards; ++s) {
        const Hits& h = hits[static_cast<size_t>(qi * shards + s)];
        for (size_t r = 0; r < h.dist.size(); ++r) {
          const int64_t pos = start[h.dist[r]]++;
          out.dist[pos] = h.dist[r];
          out.idx[pos] = h.idx[r];
        }
      }
    }
  }
}

// ---------------------------------------------------------------- average precision
namespace {
bool relevant(const ItemLabels& ql, int64_t qi, const ItemLabels& dl, int64_t j) {
  if (ql.ids != nullptr) return ql.ids[qi] == dl.ids[j];
  const uint64_t* a = ql.bits + qi * ql.words;
  const uint64_t* b = dl.bits + j * dl.words;
  for (int64_t w = 0; w < ql.words; ++w)
    if (a[w] & b[w]) return true;
  return false;
}

// AP@k from a query's index-ordered candidates (all codes closer than some bound, at least k of them). A stable
// counting sort drops the relevance of each code of the top k into its ranked place (the codes closer than its
// distance, plus those at it met before); only the first (k - closer than t) codes at the k-th distance t are in
// the top k. AP is then one pass over the k ranked flags. inv_position[p] = 1 / p.
double candidates_ap(const Candidates& c, const ItemLabels& ql, int64_t qi, const ItemLabels& dl, int64_t k,
                     int64_t nbits, const std::vector<double>& inv_position, const uint64_t* members,
                     int64_t member_classes, int64_t member_words, std::vector<uint8_t>& rel,
                     std::vector<uint8_t>& ranked, std::vector<int64_t>& start) {
  const int64_t bins = nbits + 2;
  rel.resize(static_cast<size_t>(c.size));
  uint8_t* flag = rel.data();
  if (members != nullptr) {  // class ids with the database's members of each class as bitsets
    const int64_t id = ql.ids[qi];
    if (id < 0 || id >= member_classes) {
      std::fill(flag, flag + c.size, 0);
    } else {
      const uint64_t* set = members + id * member_words;
      for (int64_t r = 0; r < c.size; ++r) flag[r] = (set[c.idx[r] >> 6] >> (c.idx[r] & 63)) & 1;
    }
  } else if (ql.ids != nullptr) {
    const int64_t id = ql.ids[qi];
    for (int64_t r = 0; r < c.size; ++r) flag[r] = dl.ids[c.idx[r]] == id;
  } else {
    for (int64_t r = 0; r < c.size; ++r) flag[r] = relevant(ql, qi, dl, c.idx[r]);
  }
  // The candidates in kParts consecutive parts with their own counters: within a distance every code of a part
  // ranks before every code of the next, so the parts scatter independently, and their chains of increments
  // (neighbours often share a distance) run side by side.
  constexpr int kParts = 4;
  const int64_t part = (c.size + kParts - 1) / kParts;
  const int64_t stride = bins + 1;
  start.assign(static_cast<size_t>((kParts + 1) * stride), 0);
  int64_t* next = start.data();                // per part: its counts, then its next free place per distance
  int64_t* closer = next + kParts * stride;    // candidates closer than d
  for (int p = 0; p < kParts; ++p)
    for (int64_t r = p * part; r < std::min(c.size, (p + 1) * part); ++r) ++next[p * stride + c.dist[r]];
  for (int64_t d = 0; d < bins; ++d) {
    int64_t n = 0;
    for (int p = 0; p < kParts; ++p) n += next[p * stride + d];
    closer[d + 1] = closer[d] + n;
  }
  int64_t t = 0;  // the k-th distance
  while (closer[t + 1] < k) ++t;
  // Room at distance t: the first (k - closer than t) codes there, in index order, so part by part.
  int64_t room[kParts];
  int64_t left = k - closer[t];
  for (int p = 0; p < kParts; ++p) {
    room[p] = left;
    left = std::max<int64_t>(0, left - next[p * stride + t]);
  }
  for (int64_t d = 0; d < bins; ++d) {
    int64_t at = closer[d];
    for (int p = 0; p < kParts; ++p) {
      const int64_t n = next[p * stride + d];
      next[p * stride + d] = at;
      at += n;
    }
  }
  ranked.assign(static_cast<size_t>(k + 1), 0);  // slot k: the codes beyond the top k
  // Integer arithmetic for the selections: a code beyond the top k is an unpredictable branch otherwise.
  for (int64_t i = 0; i < part; ++i) {
    for (int p = 0; p < kParts; ++p) {
      const int64_t r = p * part + i;
      if (r >= c.size) break;
      const int64_t d = c.dist[r];
      const int64_t at = d == t;
      const int64_t keep = static_cast<int64_t>(d < t) | (at & static_cast<int64_t>(room[p] > 0));
      room[p] -= at & keep;
      int64_t& slot = next[p * stride + d];
      ranked[keep ? slot : k] = flag[r];
      slot += keep;
    }
  }
  double sum = 0;
  int64_t hits = 0;
  for (int64_t i = 0; i < k; ++i) {
    hits += ranked[i];
    sum += static_cast<double>(ranked[i] * hits) * inv_position[i + 1];  // no branch on the relevance
  }
  return hits > 0 ? sum / static_cast<double>(hits) : 0.0;
}
}  // namespace

void average_precision(const PackedCodes& queries, const PackedCodes& db, const ItemLabels& query_labels,
                       const ItemLabels& db_labels, int64_t k, double* out) {
  if (queries.rows == 0) return;
  const BlockedCodes blocked = to_blocked(db);
  const QueryWords q = to_words(queries);
  const ScanKernels& kern = kernels();
  const int64_t nbits = blocked.words * 64;
  std::vector<double> inv_position(static_cast<size_t>(k + 1), 0.0);
  for (int64_t p = 1; p <= k; ++p) inv_position[p] = 1.0 / static_cast<double>(p);
  // Class ids: the database's members of each class as a bitset (n / 8 bytes each, cache-resident where the ids
  // are not), when the ids are small and the sets fit in 64 MiB.
  std::vector<uint64_t> members;
  int64_t member_classes = 0;
  const int64_t member_words = (blocked.rows + 63) / 64;
  if (db_labels.ids != nullptr) {
    const auto [lo, hi] = std::minmax_element(db_labels.ids, db_labels.ids + blocked.rows);
    if (*lo >= 0 && *hi < 4096 && (*hi + 1) * member_words <= (int64_t(64) << 20) / 8) {
      member_classes = *hi + 1;
      members.assign(static_cast<size_t>(member_classes * member_words), 0);
      for (int64_t j = 0; j < blocked.rows; ++j)
        members[db_labels.ids[j] * member_words + (j >> 6)] |= uint64_t(1) << (j & 63);
    }
  }
  const uint64_t* member_sets = members.empty() ? nullptr : members.data();
  struct Scratch {
    std::vector<uint8_t> rel, ranked;
    std::vector<int64_t> counts;
  };
  for_each_query_candidates<Scratch>(blocked, q, kern, k, [&](const Candidates& c, int64_t qi, Scratch& w) {
    out[qi] = candidates_ap(c, query_labels, qi, db_labels, k, nbits, inv_position, member_sets, member_classes,
                            member_words, w.rel, w.ranked, w.counts);
  });
}

void distance_histograms(const PackedCodes& queries, const PackedCodes& db, const ItemLabels& query_labels,
                         const ItemLabels& db_labels, int64_t* all_counts, int64_t* rel_counts) {
  const int64_t width = 8 * db.bytes_per_row + 1;
  std::fill(all_counts, all_counts + queries.rows * width, int64_t{0});
  std::fill(rel_counts, rel_counts + queries.rows * width, int64_t{0});
  if (queries.rows == 0 || db.rows == 0) return;
  const BlockedCodes blocked = to_blocked(db);
  const QueryWords q = to_words(queries);
  const ScanKernels& kern = kernels();
  // A block of queries against one cache-sized chunk of the database at a time: distances into a small buffer,
  // then counted, so the q x n distances never exist at once.
  const int64_t step = chunk_blocks(blocked.words), cols = step * kLanes;
  const int64_t qblocks = (q.rows + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    std::vector<int32_t> dist(static_cast<size_t>(kQueryBlock * cols));
#pragma omp for schedule(dynamic)
    for (int64_t qb = 0; qb < qblocks; ++qb) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(q.rows, q0 + kQueryBlock);
      for (int64_t b0 = 0; b0 < blocked.blocks; b0 += step) {
        const int64_t b1 = std::min(blocked.blocks, b0 + step);
        const int64_t j0 = b0 * kLanes, live = std::min(blocked.rows, b1 * kLanes) - j0;
        kern.distance(blocked, q, q0, q1, b0, b1, dist.data(), cols);
        for (int64_t qi = q0; qi < q1; ++qi) {
          const int32_t* row = dist.data() + (qi - q0) * cols;
          int64_t* all = all_counts + qi * width;
          int64_t* hit = rel_counts + qi * width;
          for (int64_t j = 0; j < live; ++j) {
            ++all[row[j]];
            hit[row[j]] += relevant(query_labels, qi, db_labels, j0 + j);
          }
        }
      }
    }
  }
}

}  // namespace brcd::cpu
