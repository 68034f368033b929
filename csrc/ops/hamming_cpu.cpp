// CPU implementations of the Hamming ops: torch glue around csrc/cpu/hamming.h.
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cpu/hamming.h"
#include "ops/hamming_common.h"

namespace brcd::ops {
namespace {

cpu::PackedCodes view(const at::Tensor& packed) {
  return {packed.data_ptr<uint8_t>(), packed.size(0), packed.size(1), packed.stride(0)};
}

// Packs rows of `values` (a bit is value > 0) into out, row r at out + r * out_stride: the one place of the CPU ops
// that turns values of any dtype into bits, for codes and multi-hot labels alike.
void pack_rows(const at::Tensor& values, uint8_t* out, int64_t out_stride) {
  const at::Tensor v = values.stride(1) == 1 ? values : values.contiguous();  // rows of unit stride are read in place
  const int64_t n = v.size(0), nbits = v.size(1);
  if (n == 0) return;
  if (v.scalar_type() == at::kHalf) {
    cpu::pack_positive(static_cast<const cpu::HalfBits*>(v.const_data_ptr()), n, nbits, v.stride(0), out, out_stride);
  } else if (v.scalar_type() == at::kBFloat16) {
    cpu::pack_positive(static_cast<const cpu::BFloat16Bits*>(v.const_data_ptr()), n, nbits, v.stride(0), out,
                       out_stride);
  } else {
    AT_DISPATCH_ALL_TYPES_AND(at::kBool, v.scalar_type(), "pack_rows", [&] {
      cpu::pack_positive<scalar_t>(v.const_data_ptr<scalar_t>(), n, nbits, v.stride(0), out, out_stride);
    });
  }
}

at::Tensor pack_codes_cpu(const at::Tensor& codes) {
  check_codes(codes, "codes");
  const int64_t nbytes = (codes.size(1) + 7) / 8;
  at::Tensor out = at::empty({codes.size(0), nbytes}, codes.options().dtype(at::kByte));
  pack_rows(codes, out.data_ptr<uint8_t>(), nbytes);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> hamming_range_search_cpu(const at::Tensor& query_packed,
                                                                        const at::Tensor& db_packed, int64_t radius) {
  const at::Tensor q = check_packed(query_packed, "query_packed");
  const at::Tensor db = check_packed(db_packed, "db_packed");
  check_pair(q, db);
  check_radius(radius);
  TORCH_CHECK_VALUE(db.size(0) < std::numeric_limits<int32_t>::max(), "db_packed has ", db.size(0),
                    " codes; hamming_range_search handles fewer than 2^31");
  at::Tensor lims = at::empty({q.size(0) + 1}, q.options().dtype(at::kLong));
  at::Tensor dist, idx;
  cpu::hamming_range_search(view(q), view(db), radius, lims.data_ptr<int64_t>(), [&](int64_t total) {
    dist = at::empty({total}, q.options().dtype(at::kInt));
    idx = at::empty({total}, q.options().dtype(at::kLong));
    return cpu::RangeOutput{dist.data_ptr<int32_t>(), idx.data_ptr<int64_t>()};
  });
  return {lims, dist, idx};
}

// Class ids [n] as int64, or multi-hot labels [n, C] (an entry > 0 is a label) as bitsets of ceil(C / 64) words.
struct LabelStorage {
  at::Tensor ids;
  std::vector<uint64_t> bits;
  cpu::ItemLabels view;
};

LabelStorage item_labels(const at::Tensor& labels, int64_t rows, const char* name) {
  TORCH_CHECK_VALUE(labels.dim() == 1 || labels.dim() == 2, name,
                    " must be class ids [n] or multi-hot labels [n, C], got ", labels.dim(), " dimensions");
  TORCH_CHECK_VALUE(labels.size(0) == rows, name, " has ", labels.size(0), " rows but there are ", rows, " codes");
  TORCH_CHECK_VALUE(labels.device().is_cpu(), name, " must be on the CPU, got ", labels.device());
  LabelStorage s;
  if (labels.dim() == 1) {
    TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool, name,
                     ": 1-D labels must be integer class ids, got ", labels.scalar_type());
    s.ids = labels.to(at::kLong).contiguous();
    s.view.ids = s.ids.data_ptr<int64_t>();
    return s;
  }
  // Packed as codes are (a label is a bit > 0), each row padded to whole 64-bit words (zeros past the classes).
  TORCH_CHECK_TYPE(!labels.is_complex(), name, " must be real, got ", labels.scalar_type());
  const int64_t classes = labels.size(1), words = std::max<int64_t>(1, (classes + 63) / 64);
  s.bits.assign(static_cast<size_t>(rows * words), 0);
  if (classes > 0) pack_rows(labels, reinterpret_cast<uint8_t*>(s.bits.data()), words * 8);
  s.view.bits = s.bits.data();
  s.view.words = words;
  return s;
}

// Packed queries and database with their labels, checked: the inputs of the ops that rank by relevance.
struct LabelledCodes {
  at::Tensor q, db;
  LabelStorage ql, dl;
};

LabelledCodes labelled_codes(const at::Tensor& query_packed, const at::Tensor& db_packed,
                             const at::Tensor& query_labels, const at::Tensor& db_labels) {
  LabelledCodes c;
  c.q = check_packed(query_packed, "query_packed");
  c.db = check_packed(db_packed, "db_packed");
  check_pair(c.q, c.db);
  TORCH_CHECK_VALUE(query_labels.dim() == db_labels.dim() && (query_labels.dim() == 1 || query_labels.size(1) ==
                    db_labels.size(1)), "query_labels and db_labels must be of one kind: class ids [n] on both "
                    "sides, or multi-hot labels with the same number of classes");
  c.ql = item_labels(query_labels, c.q.size(0), "query_labels");
  c.dl = item_labels(db_labels, c.db.size(0), "db_labels");
  return c;
}

at::Tensor average_precision_cpu(const at::Tensor& query_packed, const at::Tensor& db_packed,
                                 const at::Tensor& query_labels, const at::Tensor& db_labels, int64_t k) {
  const LabelledCodes c = labelled_codes(query_packed, db_packed, query_labels, db_labels);
  check_k(k, c.db);
  TORCH_CHECK_VALUE(c.db.size(0) < std::numeric_limits<int32_t>::max(), "db_packed has ", c.db.size(0),
                    " codes; average_precision handles fewer than 2^31");
  at::Tensor out = at::empty({c.q.size(0)}, c.q.options().dtype(at::kDouble));
  cpu::average_precision(view(c.q), view(c.db), c.ql.view, c.dl.view, k, out.data_ptr<double>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> distance_histograms_cpu(const at::Tensor& query_packed, const at::Tensor& db_packed,
                                                           const at::Tensor& query_labels,
                                                           const at::Tensor& db_labels) {
  const LabelledCodes c = labelled_codes(query_packed, db_packed, query_labels, db_labels);
  at::Tensor all = at::empty({c.q.size(0), 8 * c.db.size(1) + 1}, c.q.options().dtype(at::kLong));
  at::Tensor rel = at::empty_like(all);
  cpu::distance_histograms(view(c.q), view(c.db), c.ql.view, c.dl.view, all.data_ptr<int64_t>(),
                           rel.data_ptr<int64_t>());
  return {all, rel};
}

}  // namespace

TORCH_LIBRARY_IMPL(brcd, CPU, m) {
  m.impl("average_precision", &average_precision_cpu);
  m.impl("distance_histograms", &distance_histograms_cpu);
  m.impl("pack_codes", &pack_codes_cpu);
  m.impl("hamming_distance", &hamming_distance_cpu);
  m.impl("hamming_topk", &hamming_topk_cpu);
  m.impl("hamming_range_search", &hamming_range_search_cpu);
}

}  // namespace brcd::ops
