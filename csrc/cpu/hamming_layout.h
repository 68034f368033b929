// Internal layout shared by the CPU Hamming translation units.
//
// The database is re-laid in blocks of 8 codes, word-major inside a block (block b, word w, lane l at
// data[(b * words + w) * 8 + l]), so one 512-bit load holds the same word of 8 codes whatever the code length.
#pragma once
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace brcd::cpu {

constexpr int kLanes = 8;

struct BlockedCodes {
  std::unique_ptr<uint64_t[]> data;  // blocks [first_block, first_block + its length)
  int64_t rows = 0;                  // of the whole database
  int64_t words = 0;
  int64_t blocks = 0;                // of the whole database
  int64_t first_block = 0;           // a chunk of the database holds the blocks from here
  const uint64_t* block(int64_t b) const { return data.get() + (b - first_block) * words * kLanes; }
};

// Database blocks per chunk (an even count, about 128 KiB): a chunk stays in L2 while every group of held queries
// passes over it, so the database streams from memory once per block of queries, not once per group.
inline int64_t chunk_blocks(int64_t words) {
  return std::max<int64_t>(16, ((128 << 10) / (words * kLanes * 8)) & ~int64_t{1});
}

// Queries as rows of `words` uint64 (zero padded).
struct QueryWords {
  std::vector<uint64_t> data;
  int64_t rows = 0;
  int64_t words = 0;
  const uint64_t* row(int64_t r) const { return data.data() + r * words; }
};

// A query's running top-k: a counting select over Hamming's small integer range.
// A candidate is accepted iff its distance is below `threshold`. The database is scanned in ascending index
// order, so a new candidate whose distance equals the k-th best so far ranks after all of them and is rejected.
class TopkState {
 public:
  // Only distances <= max_dist are considered. The result is exact when at least k codes qualify (finish() returns
  // k); with fewer, the caller scans again with max_dist = nbits.
  TopkState(int64_t k, int64_t nbits, int64_t max_dist);
  int64_t threshold() const { return threshold_; }
  // Offers n candidates in ascending index order; those closer than threshold() with an index below rows (a
  // scan's last block has lanes past the database) are accepted.
  void push_batch(const int32_t* dist, const int64_t* idx, int64_t n, int64_t rows);
  // Writes the best min(k, accepted) candidates sorted by (distance, index); returns how many.
  int64_t finish(int32_t* out_dist, int64_t* out_idx);
  // As finish, appending the results to dist and idx (sized to fit): a range search's hits, with k the database size.
  int64_t finish(std::vector<int32_t>& dist, std::vector<int64_t>& idx);

 private:
  void compact();
  int64_t k_;
  int64_t threshold_;
  int64_t at_or_below_;  // accepted candidates with distance <= threshold_
  std::vector<int64_t> count_;
  std::vector<int32_t> cand_dist_;  // the first size_ entries are the candidates
  std::vector<int64_t> cand_idx_;
  int64_t size_ = 0;
  int64_t capacity_;  // compact() when size_ reaches it
};

// Every code closer than a fixed bound, in ascending index order: the scan appends without a branch per hit, which
// pays where hits are dense (k a few percent of the database) and TopkState's branchy threshold updates stall.
// The buffers are not initialised (a scan reserves room for a whole chunk of the database up front), and a list is
// reset, not reallocated, for the next query.
struct Candidates {
  // A scan may append one key per code instead, index << kKeyDistBits | distance, in idx (one AVX-512 compress
  // where dist and idx take two); unpack_keys() then restores dist and idx.
  static constexpr int kKeyDistBits = 9;  // distances of codes of up to 4 words
  static bool keys_fit(int64_t words, int64_t rows) {
    return words <= 4 && rows <= (int64_t(1) << (31 - kKeyDistBits));
  }

  int32_t limit = 0;  // accept distances < limit
  int64_t size = 0;
  std::unique_ptr<int32_t[]> dist, idx;
  int64_t capacity = 0;
  bool keyed = false;  // idx holds keys

  void unpack_keys() {
    if (!keyed) return;
    for (int64_t r = 0; r < size; ++r) {
      dist[r] = idx[r] & ((1 << kKeyDistBits) - 1);
      idx[r] >>= kKeyDistBits;
    }
    keyed = false;
  }

  void reset(int32_t accept_below) {
    limit = accept_below;
    size = 0;
    keyed = false;
  }
  // Room for n entries, keeping the first `size`.
  void reserve(int64_t n) {
    if (n <= capacity) return;
    n = std::max(n, 2 * capacity);
    std::unique_ptr<int32_t[]> d(new int32_t[static_cast<size_t>(n)]), i(new int32_t[static_cast<size_t>(n)]);
    std::copy(dist.get(), dist.get() + size, d.get());
    std::copy(idx.get(), idx.get() + size, i.get());
    dist = std::move(d);
    idx = std::move(i);
    capacity = n;
  }
};

// Per-ISA scans, defined in hamming_<isa>.cpp. `states` has one entry per query in [q_begin, q_end); `distance`
// writes the distance of query qi to code j (of blocks [block_begin, block_end)) at
// out[(qi - q_begin) * out_stride + j - kLanes * block_begin].
struct ScanKernels {
  void (*topk)(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t block_begin,
               int64_t block_end, TopkState* states);
  void (*distance)(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end,
                   int64_t block_begin, int64_t block_end, int32_t* out, int64_t out_stride);
  // Appends every code with distance < cands[qi - q_begin].limit to that query's candidates.
  void (*collect)(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t block_begin,
                  int64_t block_end, Candidates* cands);
  // Optional (null where the ISA has none): `blocks` whole blocks of contiguous rows of `words` words (8 * words
  // bytes each, any alignment) into the blocked layout at out; false (nothing written) for a word count it does
  // not handle.
  bool (*relayout)(const uint8_t* rows, int64_t blocks, int64_t words, uint64_t* out) = nullptr;
};

namespace scalar { ScanKernels kernels(); }
namespace avx2 { ScanKernels kernels(); }
namespace avx512 { ScanKernels kernels(); }

}  // namespace brcd::cpu
