// Host entry points of the brcd CUDA kernels. Plain C++: no torch and no CUDA headers, so other hashing projects
// can lift the kernels without our torch glue. Each returns a cudaError_t value (0 = success); `stream` is a
// cudaStream_t; every pointer is a device pointer; workspaces are allocated by the caller.
#pragma once
#include <cstddef>
#include <cstdint>

#include "contrastive_problem.h"

namespace brcd::cuda {

const char* error_string(int code);

// bits: rows x nbits bytes (0/1), row stride bits_stride; out: rows x ceil(nbits / 8).
int pack_bits(const uint8_t* bits, int64_t rows, int64_t nbits, int64_t bits_stride, uint8_t* out, void* stream);

// Codes are rows of `words` uint64 (zero padded), contiguous. out: nq x n.
int hamming_distance(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int32_t* out,
                     void* stream);

// Exact top-k without the nq x n distance matrix, ties by ascending index.
//
// Tensor-core path (hamming_topk.cu), where hamming_topk_fast_supported(): codes of 1 to 4 words, k up to a few
// thousand, compute capability 8.0 or later. Writes dist [nq, k] and index [nq, k], sorted. Synchronises `stream`
// once per chunk of queries (to size the exact fallback for the queries its sampled bound could not serve).
bool hamming_topk_fast_supported(int64_t words, int64_t k);
size_t hamming_topk_fast_workspace(int64_t nq, int64_t words, int64_t k);
int hamming_topk_fast(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                      int32_t* dist, int64_t* index, void* workspace, void* stream);

// Two-pass path (hamming_topk_two_pass.cu), for any width and any k: a histogram pass finds each query's k-th
// distance, a second pass collects the k winners. keys[q * k + j] = distance * n + index, in no particular order:
// sort each row to rank them.
size_t hamming_topk_workspace(int64_t nq, int64_t words);
int hamming_topk_keys(const uint64_t* q, int64_t nq, const uint64_t* db, int64_t n, int64_t words, int64_t k,
                      int64_t* keys, void* workspace, void* stream);

// The fused contrastive loss (shared/spec/contrastive-loss.md). `loss` and `grad_loss` are device scalars;
// lse and pos ([2B] each) are saved by the forward for the backward.
template <class T>
size_t contrastive_workspace(int64_t batch, int64_t bits);
template <class T>
int contrastive_forward(const ContrastiveProblem<T>& p, T* loss, T* lse, T* pos, void* workspace, void* stream);
template <class T>
int contrastive_backward(const ContrastiveProblem<T>& p, const T* grad_loss, const T* lse, const T* pos,
                         T* grad_student, T* grad_teacher_anchor, T* grad_teacher_view, void* workspace,
                         void* stream);

}  // namespace brcd::cuda
