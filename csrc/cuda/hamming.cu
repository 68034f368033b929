// CUDA kernels for packing and the Hamming distance matrix (top-k: hamming_topk.cu). No torch headers.
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

#include "cuda/hamming_device.h"
#include "cuda/launchers.h"

namespace brcd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxQueryBlock = 8;
constexpr size_t kSharedBudget = 48 * 1024;

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

int query_block_for(int64_t words) {
  int qb = kMaxQueryBlock;
  while (qb > 1 && static_cast<size_t>(qb) * words * 8 > kSharedBudget) qb /= 2;
  return qb;
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

DeviceFacts device_facts() {
  int dev = 0;
  cudaGetDevice(&dev);
  static std::mutex mu;
  static std::unordered_map<int, DeviceFacts> cache;
  const std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(dev); it != cache.end()) return it->second;
  DeviceFacts f;
  cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&f.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev);
  if (f.sm_count < 1) f.sm_count = 1;
  cache[dev] = f;
  return f;
}

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
  const int qb = query_block_for(words);
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

}  // namespace brcd::cuda
