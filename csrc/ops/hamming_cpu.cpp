// CPU implementations of the Hamming ops: torch glue around csrc/cpu/hamming.h.
#include <torch/library.h>

#include "cpu/hamming.h"
#include "ops/hamming_common.h"

namespace brcd::ops {
namespace {

cpu::PackedCodes view(const at::Tensor& packed) {
  return {packed.data_ptr<uint8_t>(), packed.size(0), packed.size(1), packed.stride(0)};
}

at::Tensor pack_codes_cpu(const at::Tensor& codes) {
  check_codes(codes, "codes");
  const at::Tensor bits = positive_bits(codes);
  const int64_t n = bits.size(0), nbits = bits.size(1);
  at::Tensor out = at::empty({n, (nbits + 7) / 8}, codes.options().dtype(at::kByte));
  if (n > 0) cpu::pack_bits(bits.data_ptr<uint8_t>(), n, nbits, bits.stride(0), out.data_ptr<uint8_t>());
  return out;
}

at::Tensor hamming_distance_cpu(const at::Tensor& query_packed, const at::Tensor& db_packed) {
  const at::Tensor q = check_packed(query_packed, "query_packed");
  const at::Tensor db = check_packed(db_packed, "db_packed");
  check_pair(q, db);
  at::Tensor out = at::empty({q.size(0), db.size(0)}, q.options().dtype(at::kInt));
  cpu::hamming_distance(view(q), view(db), out.data_ptr<int32_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& query_packed, const at::Tensor& db_packed,
                                                    int64_t k) {
  const at::Tensor q = check_packed(query_packed, "query_packed");
  const at::Tensor db = check_packed(db_packed, "db_packed");
  check_pair(q, db);
  check_k(k, db);
  at::Tensor dist = at::empty({q.size(0), k}, q.options().dtype(at::kInt));
  at::Tensor idx = at::empty({q.size(0), k}, q.options().dtype(at::kLong));
  cpu::hamming_topk(view(q), view(db), k, dist.data_ptr<int32_t>(), idx.data_ptr<int64_t>());
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, CPU, m) {
  m.impl("pack_codes", &pack_codes_cpu);
  m.impl("hamming_distance", &hamming_distance_cpu);
  m.impl("hamming_topk", &hamming_topk_cpu);
}

}  // namespace brcd::ops
