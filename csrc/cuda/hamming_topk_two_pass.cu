// Exact Hamming top-k in two passes over the database (any code width, any k): a distance histogram per query
// gives its k-th distance, a second pass collects the winners. The tensor-core path (hamming_topk.cu) hands back
// to these kernels the queries its sampled bound could not serve. No torch headers.
#include <cuda_runtime.h>

#include "cuda/hamming_device.h"
#include "cuda/hamming_two_pass.h"

namespace brcd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryBlock = 8;
constexpr size_t kSharedBudget = 48 * 1024;

// The queries of a launch at positions [0, size): query(pos) = list[pos], or pos itself without a list. Per-query
// scratch (histograms, thresholds, tie counts) is indexed by position, outputs by query.
struct QuerySet {
  const int* list;
  int64_t size;
  __device__ int64_t query(int64_t pos) const { return list ? list[pos] : pos; }
};

struct QueryBlock {
  int64_t first, count;  // positions
};

__device__ QueryBlock query_block(const QuerySet& set, int qb) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * qb;
  return {first, min64(qb, set.size - first)};
}

__device__ void load_queries(uint64_t* sq, const uint64_t* q, const QuerySet& set, QueryBlock blk, int64_t words) {
  for (int64_t i = threadIdx.x; i < blk.count * words; i += blockDim.x)
    sq[i] = q[set.query(blk.first + i / words) * words + i % words];
}

// Pass 1: per query, the histogram of distances over this block's share of the database codes
// db[0], db[stride], db[2 * stride], ... (n of them; stride > 1 samples). Each warp counts into its own copy of the
// shared histogram when they fit (far fewer conflicting atomics), summed into global memory at the end.
template <int WC>
__global__ void histogram_kernel(const uint64_t* q, QuerySet set, const uint64_t* db, int64_t n, int64_t stride,
                                 int64_t words, int qb, int bins, int copies, int* hist) {
  extern __shared__ uint64_t smem[];
  uint64_t* sq = smem;
  int* sh = reinterpret_cast<int*>(smem + qb * words);
  const QueryBlock blk = query_block(set, qb);
  if (blk.count <= 0) return;
  load_queries(sq, q, set, blk, words);
  const bool shared_hist = copies > 0;
  const int per_copy = qb * bins;
  int* h = shared_hist ? sh + (threadIdx.x / 32) % copies * per_copy : hist + blk.first * bins;
  if (shared_hist)
    for (int i = threadIdx.x; i < copies * per_copy; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  const int64_t split_len = (n + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * split_len, end = min64(n, begin + split_len);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    Code<WC> c;
    c.load(db, j * stride, words);
    for (int64_t i = 0; i < blk.count; ++i) atomicAdd(h + i * bins + c.distance(sq + i * words, words), 1);
  }
  if (!shared_hist) return;
  __syncthreads();
  for (int i = threadIdx.x; i < blk.count * bins; i += blockDim.x) {
    int total = 0;
    for (int c = 0; c < copies; ++c) total += sh[c * per_copy + i];
    if (total) atomicAdd(hist + blk.first * bins + i, total);
  }
}

// Per position: threshold t = smallest distance whose cumulative count reaches k; need = winners taken at t.
__global__ void threshold_kernel(const int* hist, int64_t size, int bins, int64_t k, int* thr, int64_t* need) {
  const int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pos >= size) return;
  int64_t cum = 0;
  for (int d = 0; d < bins; ++d) {
    const int64_t c = hist[pos * bins + d];
    if (cum + c >= k) {
      thr[pos] = d;
      need[pos] = k - cum;
      return;
    }
    cum += c;
  }
  thr[pos] = bins;  // unreachable for 1 <= k <= n
  need[pos] = 0;
}

// Pass 2a (several splits only): how many codes at the threshold distance each split holds.
template <int WC>
__global__ void tie_count_kernel(const uint64_t* q, QuerySet set, const uint64_t* db, int64_t n, int64_t words,
                                 int qb, const int* thr, int* ties) {
  extern __shared__ uint64_t sq[];
  const QueryBlock blk = query_block(set, qb);
  if (blk.count <= 0) return;
  load_queries(sq, q, set, blk, words);
  __syncthreads();
  const int64_t split_len = (n + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * split_len, end = min64(n, begin + split_len);
  for (int64_t i = 0; i < blk.count; ++i) {
    int local = 0;
    const int t = thr[blk.first + i];
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      Code<WC> c;
      c.load(db, j, words);
      local += c.distance(sq + i * words, words) == t;
    }
    for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(0xffffffffu, local, off);
    if ((threadIdx.x & 31) == 0 && local) atomicAdd(ties + (blk.first + i) * gridDim.y + blockIdx.y, local);
  }
}

__global__ void tie_prefix_kernel(int* ties, int64_t size, int splits) {
  const int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pos >= size) return;
  int run = 0;
  for (int s = 0; s < splits; ++s) {
    const int c = ties[pos * splits + s];
    ties[pos * splits + s] = run;
    run += c;
  }
}

// Pass 2b: collect every code below the threshold and the first `need` (in index order) at it, as keys
// distance * n + index appended to out[query * out_stride + slot] (slots[query] counts them).
template <int WC>
__global__ void collect_kernel(const uint64_t* q, QuerySet set, const uint64_t* db, int64_t n, int64_t words, int qb,
                               const int* thr, const int64_t* need, const int* ties_before, int* slots,
                               int64_t out_stride, int64_t* out) {
  extern __shared__ uint64_t smem[];
  uint64_t* sq = smem;
  int* warp_ties = reinterpret_cast<int*>(smem + qb * words);  // [qb][kWarps]
  int* seen = warp_ties + qb * kWarps;                          // [qb] ties passed so far, in index order
  const QueryBlock blk = query_block(set, qb);
  if (blk.count <= 0) return;
  load_queries(sq, q, set, blk, words);
  for (int i = threadIdx.x; i < blk.count; i += blockDim.x)
    seen[i] = ties_before ? ties_before[(blk.first + i) * gridDim.y + blockIdx.y] : 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_before = (1u << lane) - 1u;
  const int64_t split_len = (n + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * split_len, end = min64(n, begin + split_len);
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool valid = j < end;
    Code<WC> c;
    if (valid) c.load(db, j, words);
    int d[kMaxQueryBlock];
    unsigned ballot[kMaxQueryBlock];
    for (int i = 0; i < qb; ++i) {
      const bool live = valid && i < blk.count;
      d[i] = live ? c.distance(sq + i * words, words) : -1;
      ballot[i] = __ballot_sync(0xffffffffu, live && d[i] == thr[blk.first + i]);
      if (lane == 0) warp_ties[i * kWarps + warp] = __popc(ballot[i]);
    }
    __syncthreads();
    for (int i = 0; i < blk.count; ++i) {
      const int t = thr[blk.first + i];
      if (d[i] < 0 || d[i] > t) continue;
      bool take = d[i] < t;
      if (!take) {
        int rank = seen[i] + __popc(ballot[i] & lanes_before);
        for (int w = 0; w < warp; ++w) rank += warp_ties[i * kWarps + w];
        take = rank < need[blk.first + i];
      }
      if (take) {
        const int64_t query = set.query(blk.first + i);
        const int slot = atomicAdd(slots + query, 1);
        out[query * out_stride + slot] = static_cast<int64_t>(d[i]) * n + j;
      }
    }
    __syncthreads();
    if (threadIdx.x < blk.count) {
      int total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_ties[threadIdx.x * kWarps + w];
      seen[threadIdx.x] += total;
    }
    __syncthreads();
  }
}

int query_block_for(int64_t words, int bins) {
  int qb = kMaxQueryBlock;
  while (qb > 1 && static_cast<size_t>(qb) * (words * 8 + bins * 4) > kSharedBudget) qb /= 2;
  return qb;
}

// Database splits: enough blocks to fill the device when queries are few.
int splits_for(int64_t query_blocks, int64_t n) {
  const int64_t want_blocks = 4LL * device_facts().sm_count;
  if (query_blocks >= want_blocks) return 1;
  const int64_t by_size = max64(1, n / (8 * kThreads));
  return static_cast<int>(min64(min64((want_blocks + query_blocks - 1) / query_blocks, by_size), 65535));
}

// Histogram copies in shared memory: one per warp if 4 or more queries still fit a block, else one, else none
// (global atomics, for very long codes).
struct HistogramShape {
  int qb, copies;
  size_t smem;
};

HistogramShape histogram_shape(int64_t words, int bins) {
  int copies = kWarps;
  int qb = query_block_for(words, bins * copies);
  if (qb < 4) {
    copies = 1;
    qb = query_block_for(words, bins);
  }
  if (static_cast<size_t>(qb) * (words * 8 + bins * 4 * copies) > kSharedBudget) copies = 0;
  return {qb, copies, static_cast<size_t>(qb) * words * 8 + static_cast<size_t>(qb) * bins * 4 * copies};
}

template <int WC>
int histogram_impl(const uint64_t* q, QuerySet set, const uint64_t* db, int64_t n, int64_t stride, int64_t words,
                   int* hist, cudaStream_t stream) {
  const int bins = static_cast<int>(words * 64 + 1);
  const HistogramShape shape = histogram_shape(words, bins);
  const int64_t qblocks = (set.size + shape.qb - 1) / shape.qb;
  const int splits = splits_for(qblocks, n);
  cudaMemsetAsync(hist, 0, sizeof(int) * set.size * bins, stream);
  histogram_kernel<WC><<<dim3(static_cast<unsigned>(qblocks), splits), kThreads, shape.smem, stream>>>(
      q, set, db, n, stride, words, shape.qb, bins, shape.copies, hist);
  return static_cast<int>(cudaGetLastError());
}

template <int WC>
int two_pass_impl(const uint64_t* q, QuerySet set, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                  const TwoPassScratch& ws, int* slots, int64_t out_stride, int64_t* out, cudaStream_t stream) {
  if (set.size == 0) return 0;
  const int bins = static_cast<int>(words * 64 + 1);
  if (int err = histogram_impl<WC>(q, set, db, n, 1, words, ws.hist, stream)) return err;
  threshold_kernel<<<static_cast<unsigned>((set.size + 255) / 256), 256, 0, stream>>>(ws.hist, set.size, bins, k,
                                                                                        ws.thr, ws.need);
  const int qb = query_block_for(words, 0);
  const int64_t qblocks = (set.size + qb - 1) / qb;
  const int splits = splits_for(qblocks, n);
  const int* ties_before = nullptr;
  if (splits > 1) {
    cudaMemsetAsync(ws.ties, 0, sizeof(int) * set.size * splits, stream);
    tie_count_kernel<WC><<<dim3(static_cast<unsigned>(qblocks), splits), kThreads, qb * words * 8, stream>>>(
        q, set, db, n, words, qb, ws.thr, ws.ties);
    tie_prefix_kernel<<<static_cast<unsigned>((set.size + 255) / 256), 256, 0, stream>>>(ws.ties, set.size, splits);
    ties_before = ws.ties;
  }
  const size_t collect_smem = qb * words * 8 + (qb * kWarps + qb) * sizeof(int);
  collect_kernel<WC><<<dim3(static_cast<unsigned>(qblocks), splits), kThreads, collect_smem, stream>>>(
      q, set, db, n, words, qb, ws.thr, ws.need, ties_before, slots, out_stride, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

size_t two_pass_scratch_bytes(int64_t nq, int64_t words) {
  const int64_t bins = words * 64 + 1;
  // Tie counts: positions x splits, and splits_for() gives fewer queries more splits; this bounds the product.
  const int64_t ties = nq + static_cast<int64_t>(query_block_for(words, 0)) * (4LL * device_facts().sm_count + 1);
  return sizeof(int64_t) * nq + sizeof(int) * (nq * bins + nq + ties) + 16;
}

TwoPassScratch two_pass_scratch(void* base, int64_t nq, int64_t words) {
  TwoPassScratch s;
  const int64_t bins = words * 64 + 1;
  char* p = static_cast<char*>(base);
  s.need = reinterpret_cast<int64_t*>(p);  // first: 8-byte aligned as the workspace is
  p += sizeof(int64_t) * nq;
  s.hist = reinterpret_cast<int*>(p);
  p += sizeof(int) * nq * bins;
  s.thr = reinterpret_cast<int*>(p);
  p += sizeof(int) * nq;
  s.ties = reinterpret_cast<int*>(p);
  return s;
}

int sampled_histogram(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n_sampled, int64_t stride,
                      int64_t words, int* hist, cudaStream_t stream) {
  const QuerySet set{nullptr, nq};
  switch (words) {
    case 1: return histogram_impl<1>(q, set, db, n_sampled, stride, words, hist, stream);
    case 2: return histogram_impl<2>(q, set, db, n_sampled, stride, words, hist, stream);
    case 4: return histogram_impl<4>(q, set, db, n_sampled, stride, words, hist, stream);
    default: return histogram_impl<0>(q, set, db, n_sampled, stride, words, hist, stream);
  }
}

int two_pass_topk(const uint64_t* q, const int* list, int64_t count, const uint64_t* db, int64_t n, int64_t words,
                  int64_t k, const TwoPassScratch& scratch, int* slots, int64_t out_stride, int64_t* out,
                  cudaStream_t stream) {
  const QuerySet set{list, count};
  switch (words) {
    case 1: return two_pass_impl<1>(q, set, db, n, words, k, scratch, slots, out_stride, out, stream);
    case 2: return two_pass_impl<2>(q, set, db, n, words, k, scratch, slots, out_stride, out, stream);
    case 4: return two_pass_impl<4>(q, set, db, n, words, k, scratch, slots, out_stride, out, stream);
    default: return two_pass_impl<0>(q, set, db, n, words, k, scratch, slots, out_stride, out, stream);
  }
}

namespace {
size_t slots_bytes(int64_t nq) { return (sizeof(int) * nq + 15) / 16 * 16; }
}  // namespace

size_t hamming_topk_workspace(int64_t nq, int64_t words) {
  return slots_bytes(nq) + two_pass_scratch_bytes(nq, words);
}

int hamming_topk_keys(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                      int64_t* keys, void* workspace, void* stream) {
  if (nq == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  int* slots = static_cast<int*>(workspace);
  const TwoPassScratch scratch =
      two_pass_scratch(static_cast<char*>(workspace) + slots_bytes(nq), nq, words);
  cudaMemsetAsync(slots, 0, sizeof(int) * nq, s);
  return two_pass_topk(q, nullptr, nq, db, n, words, k, scratch, slots, k, keys, s);
}

}  // namespace brcd::cuda
