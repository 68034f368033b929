// Argument checks and output allocation shared by the CPU and CUDA Hamming ops. Errors name the argument and
// surface in Python as ValueError / TypeError.
#pragma once
#include <ATen/ATen.h>

namespace brcd::ops {

inline void check_codes(const at::Tensor& codes, const char* name) {
  TORCH_CHECK_VALUE(codes.dim() == 2, name, " must be a 2-D tensor [n, nbits], got ", codes.dim(), " dimensions");
  TORCH_CHECK_VALUE(codes.size(1) >= 1, name, " must have at least one bit (column)");
  TORCH_CHECK_TYPE(!codes.is_complex(), name, " must be real (float, integer or bool), got ", codes.scalar_type());
}

// 0/1 bytes of codes > 0, contiguous: what the packing kernels read.
inline at::Tensor positive_bits(const at::Tensor& codes) {
  if (codes.scalar_type() == at::kBool) return codes.to(at::kByte).contiguous();
  return codes.gt(0).to(at::kByte).contiguous();
}

inline at::Tensor check_packed(const at::Tensor& packed, const char* name) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, name, " must be packed codes of dtype uint8 (see pack_codes), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, name, " must be a 2-D tensor [n, nbytes], got ", packed.dim(), " dimensions");
  TORCH_CHECK_VALUE(packed.size(1) >= 1, name, " must have at least one byte per code");
  return packed.contiguous();
}

inline void check_pair(const at::Tensor& q, const at::Tensor& db) {
  TORCH_CHECK_VALUE(q.device() == db.device(), "query_packed is on ", q.device(), " but db_packed is on ", db.device());
  TORCH_CHECK_VALUE(q.size(1) == db.size(1), "query_packed has ", q.size(1), " bytes per code but db_packed has ",
                    db.size(1), ": the codes must have the same number of bits");
  TORCH_CHECK_VALUE(db.size(0) >= 1, "db_packed is empty: the database needs at least one code");
}

inline void check_k(int64_t k, const at::Tensor& db) {
  TORCH_CHECK_VALUE(k >= 1 && k <= db.size(0), "k must be between 1 and the database size ", db.size(0), ", got ", k);
}

inline void check_radius(int64_t radius) {
  TORCH_CHECK_VALUE(radius >= 0, "radius must be a non-negative Hamming distance, got ", radius);
}

}  // namespace brcd::ops
