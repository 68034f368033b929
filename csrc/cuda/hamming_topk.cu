// Exact Hamming top-k on tensor cores, in one pass over the database (codes of up to 256 bits, k up to a few
// thousand). No torch headers.
//
// 1. A strided sample of the database gives each query a distance bound that at least k codes very likely meet.
// 2. The scan computes every distance as an int8 matrix product of ±1 codes (mma.sync m16n8k32: Hamming distance =
//    (bits - dot) / 2, exact) and appends the codes within the bound to a per-query candidate buffer.
// 3. One block per query sorts its candidates (distance, then index) in shared memory and writes the first k.
// A query whose bound turned out too tight (fewer than k candidates) or too loose (more than the buffer holds) is
// handed to the two-pass kernels, which are exact for any input; the result is the same either way.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "cuda/hamming_device.h"
#include "cuda/hamming_two_pass.h"
#include "cuda/launchers.h"

namespace brcd::cuda {
namespace {

constexpr int kScanWarps = 8;
constexpr int kScanThreads = kScanWarps * 32;
constexpr int kSelectThreads = 512;
constexpr int kMaxWords = 4;                      // 256 bits: the int8 operands stay in registers
constexpr int64_t kSampleTarget = 16384;          // sampled codes per query for the bound
constexpr size_t kBufferBudget = size_t(256) << 20;  // candidate keys of one chunk of queries

// Four bits (the low nibble of x) as four int8 lanes of +1 (bit set) or -1.
__device__ __forceinline__ uint32_t expand4(uint32_t x) {
  const uint32_t spread = ((x & 0xFu) * 0x00204081u) & 0x01010101u;  // bit i -> byte i, no carries
  return ~(spread * 0xFEu);                                          // 1 -> 0x01, 0 -> 0xFF
}

// c += A (16 x 32, row major) * B (32 x 8, column major), int8 in, int32 out.
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host never launches the scan below compute capability 8.0
#endif
}

struct ScanArgs {
  const uint64_t* q;
  int64_t nq;
  const uint64_t* db;
  int64_t n;
  int64_t split_len;  // database codes per blockIdx.y, a multiple of 8
  const int* bound;   // [nq] largest distance collected
  int64_t* buf;       // [nq, cap] candidate keys distance * n + index
  int cap;
  int* counts;        // [nq] candidates found (may pass cap: the query then overflowed)
};

// Appends the candidates of one thread's accumulators (bit 4 * mt + e of `hits`: element e of query tile mt) and
// returns the bits of rows whose buffer overflowed (that query goes to the two-pass kernels: stop appending). The
// distance is recounted from the codes (a rare path: it keeps the accumulators out of indexed local memory).
template <int W>
__device__ __forceinline__ unsigned append_hits(const ScanArgs& args, unsigned hits, int64_t row0, int64_t col,
                                                int64_t end) {
  unsigned stop = 0;
  while (hits) {
    const int bit = __ffs(hits) - 1;
    hits &= hits - 1;
    const int mt = bit >> 2, e = bit & 3;
    const int64_t row = row0 + mt * 16 + 8 * (e >> 1), code = col + (e & 1);
    if (code >= end) continue;  // a column past this split's end (another split's code, or none)
    int d = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) d += __popcll(args.q[row * W + w] ^ __ldg(args.db + code * W + w));
    const int slot = atomicAdd(args.counts + row, 1);
    if (slot < args.cap) {
      args.buf[row * args.cap + slot] = static_cast<int64_t>(d) * args.n + code;
    } else {
      stop |= 3u << (bit & ~1);
    }
  }
  return stop;
}

// Fragment layouts of m16n8k32 (PTX ISA), lane = 4 * g + t:
//   A: a0 = row g, k 4t..4t+3; a1 = row g + 8, same k; a2 = row g, k 16+4t..; a3 = row g + 8, k 16+4t..
//   B: b0 = k 4t..4t+3 of column g; b1 = k 16+4t.. of column g
//   C: c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g + 8, same columns
// A k-step covers 32 bits of a code: bits 32s..32s+31 for step s. Rows are queries, columns database codes.
template <int W, int MT>
__global__ void __launch_bounds__(kScanThreads) scan_kernel(ScanArgs args) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q0 = (static_cast<int64_t>(blockIdx.x) * kScanWarps + warp) * (16 * MT);
  if (q0 >= args.nq) return;
  uint32_t a[MT][2 * W][4];
  int min_dot[MT][2];  // a code is a candidate of the row when its dot product reaches this
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = q0 + mt * 16 + g + 8 * h;
      const bool valid = row < args.nq;
      uint64_t words[W];
#pragma unroll
      for (int w = 0; w < W; ++w) words[w] = valid ? args.q[row * W + w] : 0;
      min_dot[mt][h] = valid ? 64 * W - 2 * args.bound[row] : INT_MAX;
#pragma unroll
      for (int s = 0; s < 2 * W; ++s) {
        const uint32_t win = static_cast<uint32_t>(words[s >> 1] >> (32 * (s & 1)));
        // The identity shuffle keeps the compiler from recomputing the operands in the loop (it did: six times the
        // instructions per pair); a shuffle cannot be rematerialised.
        a[mt][s][h] = __shfl_sync(0xffffffffu, expand4(win >> (4 * t)), lane);
        a[mt][s][2 + h] = __shfl_sync(0xffffffffu, expand4(win >> (16 + 4 * t)), lane);
      }
    }
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * args.split_len;
  const int64_t end = min64(args.n, begin + args.split_len);
  unsigned stop = 0;  // accumulator bits of rows that overflowed
  uint64_t cur[W];
#pragma unroll
  for (int w = 0; w < W; ++w) cur[w] = begin + g < end ? __ldg(args.db + (begin + g) * W + w) : 0;
  for (int64_t base = begin; base < end; base += 8) {
    uint64_t next[W];  // the next 8 codes, loaded while these are compared
#pragma unroll
    for (int w = 0; w < W; ++w) next[w] = base + 8 + g < end ? __ldg(args.db + (base + 8 + g) * W + w) : 0;
    // Columns past the end get all-zero operands: dot 0, so they can only pass a bound of half the bits or more,
    // and append_hits drops them.
    const uint32_t live = base + g < end ? 0xFFFFFFFFu : 0u;
    int acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;
#pragma unroll
    for (int s = 0; s < 2 * W; ++s) {
      const uint32_t win = static_cast<uint32_t>(cur[s >> 1] >> (32 * (s & 1)));
      const uint32_t b0 = expand4(win >> (4 * t)) & live, b1 = expand4(win >> (16 + 4 * t)) & live;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_s8(acc[mt], a[mt][s], b0, b1);
    }
    bool any = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      any |= (acc[mt][0] >= min_dot[mt][0]) | (acc[mt][1] >= min_dot[mt][0]) | (acc[mt][2] >= min_dot[mt][1]) |
             (acc[mt][3] >= min_dot[mt][1]);
    if (any) {  // well under one pair in a hundred
      unsigned hits = 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) hits |= static_cast<unsigned>(acc[mt][e] >= min_dot[mt][e >> 1]) << (4 * mt + e);
      hits &= ~stop;
      if (hits) stop |= append_hits<W>(args, hits, q0 + g, base + 2 * t, end);
    }
#pragma unroll
    for (int w = 0; w < W; ++w) cur[w] = next[w];
  }
}

// Per query: the smallest distance whose sampled cumulative count reaches `need_sampled`.
__global__ void bound_kernel(const int* hist, int64_t nq, int bins, int64_t need_sampled, int* bound) {
  const int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (qi >= nq) return;
  int64_t cum = 0;
  int d = 0;
  for (; d < bins - 1; ++d) {
    cum += hist[qi * bins + d];
    if (cum >= need_sampled) break;
  }
  bound[qi] = d;
}

struct SelectArgs {
  const int64_t* buf;  // [nq, cap]
  int cap;
  int* counts;         // [nq]
  int64_t k, n;
  int32_t* dist;       // [nq, k]
  int64_t* index;      // [nq, k]
  int* failed;         // first pass: queries handed to the two-pass kernels are appended here
  int* failed_count;
  const int* list;     // second pass: the failed queries (one block each); null in the first pass
};

// One block per query: sort its candidate keys (distance * n + index: by distance, then index) and write the first
// k. Bitonic sort in shared memory over the next power of two of the candidate count.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs args) {
  extern __shared__ int64_t keys[];
  const int64_t q = args.list ? args.list[blockIdx.x] : blockIdx.x;
  const int count = args.counts[q];
  if (!args.list && (count < args.k || count > args.cap)) {
    __syncthreads();  // every thread has read counts[q] before it is reset
    if (threadIdx.x == 0) {
      args.counts[q] = 0;
      args.failed[atomicAdd(args.failed_count, 1)] = static_cast<int>(q);
    }
    return;
  }
  int m = 1;
  while (m < count) m <<= 1;
  const int64_t* src = args.buf + q * args.cap;
  for (int i = threadIdx.x; i < m; i += blockDim.x) keys[i] = i < count ? src[i] : LLONG_MAX;
  for (int size = 2; size <= m; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < m / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const int64_t x = keys[lo], y = keys[hi];
        if ((x > y) == ascending) {
          keys[lo] = y;
          keys[hi] = x;
        }
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < args.k; i += blockDim.x) {
    const int64_t key = keys[i];
    args.dist[q * args.k + i] = static_cast<int32_t>(key / args.n);
    args.index[q * args.k + i] = key % args.n;
  }
}

// The layout of one chunk's workspace.
struct FastScratch {
  int64_t* buf;
  int* bound;
  int* counts;
  int* failed;
  int* failed_count;
  TwoPassScratch two_pass;
};

int64_t pow2_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

int64_t max_capacity() {
  // The select kernel sorts up to `cap` keys of 8 bytes in shared memory.
  const int64_t by_smem = device_facts().max_smem_optin / 8;
  int64_t cap = 1;
  while (cap * 2 <= by_smem) cap <<= 1;
  return cap;
}

int64_t capacity_for(int64_t k) { return pow2_at_least(std::max<int64_t>(1024, 8 * k)); }

int64_t chunk_queries(int64_t nq, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>(nq, static_cast<int64_t>(kBufferBudget) / (cap * 8)));
}

size_t align16(size_t x) { return (x + 15) / 16 * 16; }

size_t fast_scratch_bytes(int64_t chunk, int64_t cap, int64_t words) {
  return align16(sizeof(int64_t) * chunk * cap) + 3 * align16(sizeof(int) * chunk) + 16 +
         two_pass_scratch_bytes(chunk, words);
}

FastScratch fast_scratch(void* base, int64_t chunk, int64_t cap, int64_t words) {
  FastScratch s;
  char* p = static_cast<char*>(base);
  s.buf = reinterpret_cast<int64_t*>(p);
  p += align16(sizeof(int64_t) * chunk * cap);
  s.bound = reinterpret_cast<int*>(p);
  p += align16(sizeof(int) * chunk);
  s.counts = reinterpret_cast<int*>(p);
  p += align16(sizeof(int) * chunk);
  s.failed = reinterpret_cast<int*>(p);
  p += align16(sizeof(int) * chunk);
  s.failed_count = reinterpret_cast<int*>(p);
  p += 16;
  s.two_pass = two_pass_scratch(p, chunk, words);
  return s;
}

template <int W>
int launch_scan(const ScanArgs& base_args, cudaStream_t stream) {
  constexpr int MT = W <= 2 ? 4 : 2;  // query tiles of 16 per warp: the operands of W words stay in registers
  constexpr int64_t per_block = kScanWarps * 16 * MT;
  const int64_t qblocks = (base_args.nq + per_block - 1) / per_block;
  const int64_t n = base_args.n, want = 4LL * device_facts().sm_count;
  int64_t splits = std::max<int64_t>(1, (want + qblocks - 1) / qblocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, n / 2048));  // at least 2048 codes per split
  splits = std::min<int64_t>(splits, 65535);
  ScanArgs args = base_args;
  args.split_len = ((n + splits - 1) / splits + 7) / 8 * 8;
  splits = (n + args.split_len - 1) / args.split_len;
  scan_kernel<W, MT><<<dim3(static_cast<unsigned>(qblocks), static_cast<unsigned>(splits)), kScanThreads, 0,
                       stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

int scan(const ScanArgs& args, int64_t words, cudaStream_t stream) {
  switch (words) {
    case 1: return launch_scan<1>(args, stream);
    case 2: return launch_scan<2>(args, stream);
    case 3: return launch_scan<3>(args, stream);
    default: return launch_scan<4>(args, stream);
  }
}

// The sampled codes per query that put the bound, with good odds, at or past the true k-th distance: the expected
// count at the k-th distance plus two standard deviations and a few (all of them when every code is sampled).
int64_t sampled_need(int64_t k, int64_t stride, int64_t sampled) {
  if (stride == 1) return k;
  const double expected = static_cast<double>(k) / static_cast<double>(stride);
  const int64_t need = static_cast<int64_t>(std::ceil(expected + 2.0 * std::sqrt(expected) + 3.0));
  return std::min(need, sampled);
}

int topk_chunk(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k, int64_t cap,
               int32_t* dist, int64_t* index, const FastScratch& ws, cudaStream_t stream) {
  const int bins = static_cast<int>(words * 64 + 1);
  const int64_t stride = std::max<int64_t>(1, n / kSampleTarget);
  const int64_t sampled = (n + stride - 1) / stride;
  if (int err = sampled_histogram(q, nq, db, sampled, stride, words, ws.two_pass.hist, stream)) return err;
  bound_kernel<<<static_cast<unsigned>((nq + 255) / 256), 256, 0, stream>>>(ws.two_pass.hist, nq, bins,
                                                                            sampled_need(k, stride, sampled),
                                                                            ws.bound);
  cudaMemsetAsync(ws.counts, 0, sizeof(int) * nq, stream);
  cudaMemsetAsync(ws.failed_count, 0, sizeof(int), stream);
  const ScanArgs scan_args{q, nq, db, n, 0, ws.bound, ws.buf, static_cast<int>(cap), ws.counts};
  if (int err = scan(scan_args, words, stream)) return err;

  const size_t smem = sizeof(int64_t) * cap;
  if (cudaError_t e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)))
    return static_cast<int>(e);
  SelectArgs sel{ws.buf, static_cast<int>(cap), ws.counts, k, n, dist, index, ws.failed, ws.failed_count, nullptr};
  select_kernel<<<static_cast<unsigned>(nq), kSelectThreads, smem, stream>>>(sel);
  if (cudaError_t e = cudaGetLastError()) return static_cast<int>(e);

  // The few queries the bound could not serve: exact two-pass kernels into the same buffer rows, then the same
  // sort. One small copy to the host sizes those launches.
  int failed = 0;
  if (cudaError_t e = cudaMemcpyAsync(&failed, ws.failed_count, sizeof(int), cudaMemcpyDeviceToHost, stream))
    return static_cast<int>(e);
  if (cudaError_t e = cudaStreamSynchronize(stream)) return static_cast<int>(e);
  if (failed == 0) return 0;
  if (int err = two_pass_topk(q, ws.failed, failed, db, n, words, k, ws.two_pass, ws.counts, cap, ws.buf, stream))
    return err;
  sel.list = ws.failed;
  select_kernel<<<static_cast<unsigned>(failed), kSelectThreads, smem, stream>>>(sel);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

bool hamming_topk_fast_supported(int64_t words, int64_t k) {
  const DeviceFacts f = device_facts();
  return f.major >= 8 && words >= 1 && words <= kMaxWords && capacity_for(k) <= max_capacity();
}

size_t hamming_topk_fast_workspace(int64_t nq, int64_t words, int64_t k) {
  const int64_t cap = capacity_for(k);
  return fast_scratch_bytes(chunk_queries(nq, cap), cap, words);
}

int hamming_topk_fast(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                      int32_t* dist, int64_t* index, void* workspace, void* stream) {
  if (nq == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t cap = capacity_for(k), chunk = chunk_queries(nq, cap);
  const FastScratch ws = fast_scratch(workspace, chunk, cap, words);
  for (int64_t first = 0; first < nq; first += chunk) {
    const int64_t count = std::min(chunk, nq - first);
    if (int err = topk_chunk(q + first * words, count, db, n, words, k, cap, dist + first * k, index + first * k, ws,
                             s))
      return err;
  }
  return 0;
}

}  // namespace brcd::cuda
