// CUDA kernels for packing, Hamming distance and exact top-k. No torch headers.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/launchers.h"

namespace brcd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryBlock = 8;
constexpr size_t kSharedBudget = 48 * 1024;

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__global__ void pack_bits_kernel(const uint8_t* bits, int64_t rows, int64_t nbits, int64_t stride, uint8_t* out) {
  const int64_t nbytes = (nbits + 7) / 8;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * nbytes) return;
  const int64_t r = i / nbytes, byte = i % nbytes;
  const uint8_t* src = bits + r * stride + byte * 8;
  const int64_t end = min64(8, nbits - byte * 8);
  uint8_t v = 0;
  for (int64_t b = 0; b < end; ++b) v |= static_cast<uint8_t>((src[b] != 0) << b);
  out[i] = v;
}

// Distance between query words in shared memory and a code held in registers (WC > 0) or read from memory.
template <int WC>
struct Code {
  uint64_t w[WC > 0 ? WC : 1];
  const uint64_t* ptr;
  __device__ void load(const uint64_t* db, int64_t idx, int64_t words) {
    ptr = db + idx * words;
    if constexpr (WC > 0) {
#pragma unroll
      for (int i = 0; i < WC; ++i) w[i] = ptr[i];
    }
  }
  __device__ int distance(const uint64_t* q, int64_t words) const {
    int d = 0;
    if constexpr (WC > 0) {
#pragma unroll
      for (int i = 0; i < WC; ++i) d += __popcll(w[i] ^ q[i]);
    } else {
      for (int64_t i = 0; i < words; ++i) d += __popcll(ptr[i] ^ q[i]);
    }
    return d;
  }
};

struct QueryBlock {
  int64_t first, count;
};

__device__ QueryBlock query_block(int64_t nq, int qb) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * qb;
  return {first, min64(qb, nq - first)};
}

__device__ void load_queries(uint64_t* sq, const uint64_t* q, QueryBlock blk, int64_t words) {
  for (int64_t i = threadIdx.x; i < blk.count * words; i += blockDim.x) sq[i] = q[blk.first * words + i];
}

template <int WC>
__global__ void distance_kernel(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int qb,
                                int32_t* out) {
  extern __shared__ uint64_t sq[];
  const QueryBlock blk = query_block(nq, qb);
  load_queries(sq, q, blk, words);
  __syncthreads();
  for (int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    Code<WC> c;
    c.load(db, j, words);
    for (int64_t i = 0; i < blk.count; ++i) out[(blk.first + i) * n + j] = c.distance(sq + i * words, words);
  }
}

// Pass 1: per query, the histogram of distances over this block's database split. Each warp counts into its own
// copy of the shared histogram when they fit (far fewer conflicting atomics), summed into global memory at the end.
template <int WC>
__global__ void histogram_kernel(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int qb,
                                 int bins, int copies, int* hist) {
  extern __shared__ uint64_t smem[];
  uint64_t* sq = smem;
  int* sh = reinterpret_cast<int*>(smem + qb * words);
  const QueryBlock blk = query_block(nq, qb);
  load_queries(sq, q, blk, words);
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
    c.load(db, j, words);
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

// Per query: threshold t = smallest distance whose cumulative count reaches k; need = winners taken at t.
__global__ void threshold_kernel(const int* hist, int64_t nq, int bins, int64_t k, int* thr, int64_t* need) {
  const int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (qi >= nq) return;
  int64_t cum = 0;
  for (int d = 0; d < bins; ++d) {
    const int64_t c = hist[qi * bins + d];
    if (cum + c >= k) {
      thr[qi] = d;
      need[qi] = k - cum;
      return;
    }
    cum += c;
  }
  thr[qi] = bins;  // unreachable for 1 <= k <= n
  need[qi] = 0;
}

// Pass 2a (several splits only): how many codes at the threshold distance each split holds.
template <int WC>
__global__ void tie_count_kernel(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int qb,
                                 const int* thr, int* ties) {
  extern __shared__ uint64_t sq[];
  const QueryBlock blk = query_block(nq, qb);
  load_queries(sq, q, blk, words);
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

__global__ void tie_prefix_kernel(int* ties, int64_t nq, int splits) {
  const int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (qi >= nq) return;
  int run = 0;
  for (int s = 0; s < splits; ++s) {
    const int c = ties[qi * splits + s];
    ties[qi * splits + s] = run;
    run += c;
  }
}

// Pass 2b: collect every code below the threshold and the first `need` (in index order) at it.
template <int WC>
__global__ void collect_kernel(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int qb,
                               const int* thr, const int64_t* need, const int* ties_before, int* slots, int64_t k,
                               int64_t* keys) {
  extern __shared__ uint64_t smem[];
  uint64_t* sq = smem;
  int* warp_ties = reinterpret_cast<int*>(smem + qb * words);  // [qb][kWarps]
  int* seen = warp_ties + qb * kWarps;                          // [qb] ties passed so far, in index order
  const QueryBlock blk = query_block(nq, qb);
  load_queries(sq, q, blk, words);
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
        const int slot = atomicAdd(slots + blk.first + i, 1);
        keys[(blk.first + i) * k + slot] = static_cast<int64_t>(d[i]) * n + j;
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

int sm_count() {
  static int count = [] {
    int dev = 0, c = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev);
    return c > 0 ? c : 1;
  }();
  return count;
}

// Database splits: enough blocks to fill the device when queries are few.
int splits_for(int64_t query_blocks, int64_t n) {
  const int64_t want_blocks = 4LL * sm_count();
  if (query_blocks >= want_blocks) return 1;
  const int64_t by_size = max64(1, n / (8 * kThreads));
  return static_cast<int>(min64(min64((want_blocks + query_blocks - 1) / query_blocks, by_size), 65535));
}

template <int WC>
int topk_impl(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k, int64_t* keys,
              void* workspace, cudaStream_t stream) {
  const int bins = static_cast<int>(words * 64 + 1);
  // Histogram copies in shared memory: one per warp if 4 or more queries still fit a block, else one, else none
  // (global atomics, for very long codes).
  int copies = kWarps;
  int qb_hist = query_block_for(words, bins * copies);
  if (qb_hist < 4) {
    copies = 1;
    qb_hist = query_block_for(words, bins);
  }
  if (static_cast<size_t>(qb_hist) * (words * 8 + bins * 4 * copies) > kSharedBudget) copies = 0;
  const int qb = query_block_for(words, 0);
  const int64_t qblocks_hist = (nq + qb_hist - 1) / qb_hist, qblocks = (nq + qb - 1) / qb;
  const int splits_hist = splits_for(qblocks_hist, n), splits = splits_for(qblocks, n);

  char* ws = static_cast<char*>(workspace);
  int* hist = reinterpret_cast<int*>(ws);
  ws += sizeof(int) * nq * bins;
  int* thr = reinterpret_cast<int*>(ws);
  ws += sizeof(int) * nq;
  int* slots = reinterpret_cast<int*>(ws);
  ws += sizeof(int) * nq;
  int64_t* need = reinterpret_cast<int64_t*>((reinterpret_cast<uintptr_t>(ws) + 7) & ~uintptr_t(7));
  int* ties = reinterpret_cast<int*>(need + nq);

  cudaMemsetAsync(hist, 0, sizeof(int) * nq * bins, stream);
  cudaMemsetAsync(slots, 0, sizeof(int) * nq, stream);
  const size_t hist_smem = qb_hist * words * 8 + static_cast<size_t>(qb_hist) * bins * 4 * copies;
  histogram_kernel<WC><<<dim3(qblocks_hist, splits_hist), kThreads, hist_smem, stream>>>(
      q, nq, db, n, words, qb_hist, bins, copies, hist);
  threshold_kernel<<<(nq + 255) / 256, 256, 0, stream>>>(hist, nq, bins, k, thr, need);
  const int* ties_before = nullptr;
  if (splits > 1) {
    cudaMemsetAsync(ties, 0, sizeof(int) * nq * splits, stream);
    tie_count_kernel<WC><<<dim3(qblocks, splits), kThreads, qb * words * 8, stream>>>(q, nq, db, n, words, qb, thr,
                                                                                      ties);
    tie_prefix_kernel<<<(nq + 255) / 256, 256, 0, stream>>>(ties, nq, splits);
    ties_before = ties;
  }
  const size_t collect_smem = qb * words * 8 + (qb * kWarps + qb) * sizeof(int);
  collect_kernel<WC><<<dim3(qblocks, splits), kThreads, collect_smem, stream>>>(q, nq, db, n, words, qb, thr, need,
                                                                                ties_before, slots, k, keys);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int pack_bits(const uint8_t* bits, int64_t rows, int64_t nbits, int64_t bits_stride, uint8_t* out, void* stream) {
  const int64_t total = rows * ((nbits + 7) / 8);
  if (total == 0) return 0;
  pack_bits_kernel<<<(total + 255) / 256, 256, 0, static_cast<cudaStream_t>(stream)>>>(bits, rows, nbits,
                                                                                       bits_stride, out);
  return static_cast<int>(cudaGetLastError());
}

int hamming_distance(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int32_t* out,
                     void* stream) {
  if (nq == 0 || n == 0) return 0;
  const int qb = query_block_for(words, 0);
  const int64_t qblocks = (nq + qb - 1) / qb;
  const int64_t tiles = min64((n + kThreads - 1) / kThreads, 65535);
  const dim3 grid(static_cast<unsigned>(qblocks), static_cast<unsigned>(tiles));
  const size_t smem = qb * words * 8;
  auto s = static_cast<cudaStream_t>(stream);
  switch (words) {
    case 1: distance_kernel<1><<<grid, kThreads, smem, s>>>(q, nq, db, n, words, qb, out); break;
    case 2: distance_kernel<2><<<grid, kThreads, smem, s>>>(q, nq, db, n, words, qb, out); break;
    case 4: distance_kernel<4><<<grid, kThreads, smem, s>>>(q, nq, db, n, words, qb, out); break;
    default: distance_kernel<0><<<grid, kThreads, smem, s>>>(q, nq, db, n, words, qb, out); break;
  }
  return static_cast<int>(cudaGetLastError());
}

size_t hamming_topk_workspace(int64_t nq, int64_t n, int64_t words) {
  const int64_t bins = words * 64 + 1;
  const int qb = query_block_for(words, 0);
  const int splits = splits_for((nq + qb - 1) / qb, n);
  return sizeof(int) * nq * bins + 2 * sizeof(int) * nq + 8 + sizeof(int64_t) * nq + sizeof(int) * nq * splits;
}

int hamming_topk_keys(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                      int64_t* keys, void* workspace, void* stream) {
  if (nq == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (words) {
    case 1: return topk_impl<1>(q, nq, db, n, words, k, keys, workspace, s);
    case 2: return topk_impl<2>(q, nq, db, n, words, k, keys, workspace, s);
    case 4: return topk_impl<4>(q, nq, db, n, words, k, keys, workspace, s);
    default: return topk_impl<0>(q, nq, db, n, words, k, keys, workspace, s);
  }
}

}  // namespace brcd::cuda
