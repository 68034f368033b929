// The two-pass exact top-k kernels (hamming_topk_two_pass.cu), as the tensor-core top-k calls them: for its
// sampled bound, and for the queries that bound could not serve. No torch headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace brcd::cuda {

// Per-query scratch of a two-pass run over `nq` queries (positions in the query list).
struct TwoPassScratch {
  int64_t* need;  // [nq] winners taken at the threshold distance
  int* hist;      // [nq, 64 * words + 1] distance histograms
  int* thr;       // [nq] threshold distances
  int* ties;      // [nq, splits] codes at the threshold per database split
};
size_t two_pass_scratch_bytes(int64_t nq, int64_t words);
TwoPassScratch two_pass_scratch(void* base, int64_t nq, int64_t words);  // base: 8-byte aligned

// hist[q, d] = how many of the codes db[0], db[stride], ..., db[(n_sampled - 1) * stride] lie at distance d of
// query q (zeroed first).
int sampled_histogram(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n_sampled, int64_t stride,
                      int64_t words, int* hist, cudaStream_t stream);

// For the queries list[0..count) (all of [0, count) when list is null): the k nearest codes, ties by index, appended
// as keys distance * n + index to out[query * out_stride + slots[query]++], in no particular order.
int two_pass_topk(const uint64_t* q, const int* list, int64_t count, const uint64_t* db, int64_t n, int64_t words,
                  int64_t k, const TwoPassScratch& scratch, int* slots, int64_t out_stride, int64_t* out,
                  cudaStream_t stream);

}  // namespace brcd::cuda
