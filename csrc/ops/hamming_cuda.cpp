// CUDA implementations of the Hamming ops: torch glue around csrc/cuda/launchers.h.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "ops/hamming_common.h"

namespace brcd::ops {
namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "brcd CUDA kernel ", what, " failed: ", cuda::error_string(err));
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Codes as rows of whole uint64 words (zero padded): what the kernels read.
at::Tensor as_words(const at::Tensor& packed) {
  const int64_t pad = (8 - packed.size(1) % 8) % 8;
  at::Tensor out = pad ? at::constant_pad_nd(packed, {0, pad}, 0) : packed;
  return out.contiguous();
}

const uint64_t* words_ptr(const at::Tensor& t) { return reinterpret_cast<const uint64_t*>(t.data_ptr<uint8_t>()); }

at::Tensor pack_codes_cuda(const at::Tensor& codes) {
  check_codes(codes, "codes");
  TORCH_CHECK_VALUE(codes.is_cuda(), "codes must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor bits = positive_bits(codes);
  const int64_t n = bits.size(0), nbits = bits.size(1);
  at::Tensor out = at::empty({n, (nbits + 7) / 8}, codes.options().dtype(at::kByte));
  check_cuda(cuda::pack_bits(bits.data_ptr<uint8_t>(), n, nbits, bits.stride(0), out.data_ptr<uint8_t>(), stream()),
             "pack_bits");
  return out;
}

at::Tensor hamming_distance_cuda(const at::Tensor& query_packed, const at::Tensor& db_packed) {
  const at::Tensor q = check_packed(query_packed, "query_packed");
  const at::Tensor db = check_packed(db_packed, "db_packed");
  check_pair(q, db);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qw = as_words(q), dw = as_words(db);
  at::Tensor out = at::empty({q.size(0), db.size(0)}, q.options().dtype(at::kInt));
  check_cuda(cuda::hamming_distance(words_ptr(qw), q.size(0), words_ptr(dw), db.size(0), qw.size(1) / 8,
                                    out.data_ptr<int32_t>(), stream()),
             "hamming_distance");
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& query_packed, const at::Tensor& db_packed,
                                                     int64_t k) {
  const at::Tensor q = check_packed(query_packed, "query_packed");
  const at::Tensor db = check_packed(db_packed, "db_packed");
  check_pair(q, db);
  check_k(k, db);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qw = as_words(q), dw = as_words(db);
  const int64_t nq = q.size(0), n = db.size(0), words = qw.size(1) / 8;
  // The tensor-core path waits once for the GPU (to size its fallback), which a stream being captured into a CUDA
  // graph forbids: there the two-pass kernels, which never wait, serve every size.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  if (!capturing && cuda::hamming_topk_fast_supported(words, k)) {
    at::Tensor dist = at::empty({nq, k}, q.options().dtype(at::kInt));
    at::Tensor index = at::empty({nq, k}, q.options().dtype(at::kLong));
    const size_t ws_bytes = cuda::hamming_topk_fast_workspace(nq, words, k);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
    check_cuda(cuda::hamming_topk_fast(words_ptr(qw), nq, words_ptr(dw), n, words, k, dist.data_ptr<int32_t>(),
                                       index.data_ptr<int64_t>(), workspace.data_ptr(), stream()),
               "hamming_topk");
    return {dist, index};
  }
  at::Tensor keys = at::empty({nq, k}, q.options().dtype(at::kLong));
  const size_t ws_bytes = cuda::hamming_topk_workspace(nq, words);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  check_cuda(cuda::hamming_topk_keys(words_ptr(qw), nq, words_ptr(dw), n, words, k, keys.data_ptr<int64_t>(),
                                     workspace.data_ptr(), stream()),
             "hamming_topk");
  // keys = distance * n + index: one sort per row ranks by distance, then index.
  const at::Tensor sorted = std::get<0>(keys.sort(1));
  return {at::floor_divide(sorted, n).to(at::kInt), at::remainder(sorted, n)};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, CUDA, m) {
  m.impl("pack_codes", &pack_codes_cuda);
  m.impl("hamming_distance", &hamming_distance_cuda);
  m.impl("hamming_topk", &hamming_topk_cuda);
}

}  // namespace brcd::ops
