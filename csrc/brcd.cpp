// The brcd op library: schemas (TORCH_LIBRARY) and the pybind11 module with the build information.
// Device implementations live in ops/*_cpu.cpp and ops/*_cuda.cpp, autograd in ops/*_autograd.cpp, fake kernels
// in brcd/ops.py.
#include <torch/extension.h>

#include <omp.h>

#include "cpu/hamming.h"

TORCH_LIBRARY(brcd, m) {
  m.def("pack_codes(Tensor codes) -> Tensor");
  m.def("hamming_distance(Tensor query_packed, Tensor db_packed) -> Tensor");
  m.def("hamming_topk(Tensor query_packed, Tensor db_packed, int k) -> (Tensor, Tensor)");
  m.def("hamming_range_search(Tensor query_packed, Tensor db_packed, int radius) -> (Tensor, Tensor, Tensor)");
  m.def("average_precision(Tensor query_packed, Tensor db_packed, Tensor query_labels, Tensor db_labels, int k) -> Tensor");
  m.def(
      "distance_histograms(Tensor query_packed, Tensor db_packed, Tensor query_labels, Tensor db_labels) -> "
      "(Tensor, Tensor)");
  m.def(
      "contrastive_forward(Tensor student, Tensor teacher_anchor, Tensor teacher_view, float temperature, "
      "Tensor alpha, Tensor? bit_mask, Tensor? row_groups, Tensor? col_groups) -> (Tensor, Tensor)");
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor student, Tensor teacher_anchor, Tensor teacher_view, "
      "float temperature, Tensor alpha, Tensor? bit_mask, Tensor? row_groups, Tensor? col_groups, "
      "Tensor row_stats, bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)");
}

namespace {
py::dict build_info() {
  py::dict info;
  info["version"] = BRCD_VERSION;
#ifdef BRCD_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["simd"] = brcd::cpu::simd_level_name(brcd::cpu::simd_level());
  info["openmp"] = true;
  info["openmp_threads"] = omp_get_max_threads();
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "brcd kernels: the ops are registered under torch.ops.brcd";
  m.def("build_info", &build_info, "What this build of brcd._C was compiled with and chose at run time.");
}
