// ISA-generic body of the CPU contrastive loss. Included by contrastive_<isa>.cpp, each compiled for its own
// instruction set, which defines BRCD_ISA (the namespace) and BRCD_TILE_ROWS (rows of a tile kept in registers).
#pragma once
#include "cpu/contrastive_prelude.h"

namespace brcd::cpu::BRCD_ISA {

using brcd::ContrastiveProblem;

constexpr int kRows = BRCD_TILE_ROWS;  // rows of a tile
constexpr int kCols = 256;             // columns of a tile
constexpr int kGroupTiles = 16;        // row tiles sharing each column tile while it is in cache
template <class T>
constexpr int kVec = 64 / static_cast<int>(sizeof(T));  // elements in a 64-byte vector
constexpr double kEps = 1e-8;

// exp(x) with a branch-free polynomial so the column loops vectorise; 0 below the type's range, so masked
// logits (-inf) vanish. Relative error near the type's epsilon (degree 7 for float, 13 for double).
template <class T>
inline T fast_exp(T x) {
  constexpr bool is_float = sizeof(T) == 4;
  constexpr T lo = is_float ? T(-87.3) : T(-708.3);
  constexpr T hi = is_float ? T(88.7) : T(709.7);
  const T xc = x < lo ? lo : (x > hi ? hi : x);
  const T n = std::nearbyint(xc * T(1.4426950408889634));
  const T r = (xc - n * T(0.693145751953125)) - n * T(1.4286068203094172321e-6);
  T p;
  if constexpr (is_float) {
    p = T(1.0 / 5040);
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = T(1.0 / 6227020800.0);
    p = p * r + T(1.0 / 479001600.0);
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120.0);
    p = p * r + T(1.0 / 24.0);
    p = p * r + T(1.0 / 6.0);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  }
  // Scale by 2^n through the exponent bits.
  using I = std::conditional_t<is_float, int32_t, int64_t>;
  constexpr int mant = is_float ? 23 : 52;
  constexpr I bias = is_float ? 127 : 1023;
  const I bits = (static_cast<I>(n) + bias) << mant;
  T scale;
  std::memcpy(&scale, &bits, sizeof(T));
  const T out = p * scale;
  return x < lo ? T(0) : (x != x ? x : out);
}

// out[v] = exp(x[v] - shift) for one vector of kVec elements: the fixed-shift path's exponentials, where x - shift
// is at most about 0, or -inf (an excluded entry), or NaN. The AVX-512 build scales by 2^n with vscalef, which also
// takes very negative arguments to 0 and lets NaN through: 14 instructions a vector, where GCC's vectorisation of
// fast_exp takes 29 (clamps and selects as compares, mask operations and blends, the exponent's integer arithmetic).
// Both compute the same reduction and polynomial, and a scale by a power of two is exact: the two agree bit for bit
// wherever the result is a normal number.
template <class T>
inline void exp_shifted_line(const T* x, T shift, T* out) {
#if defined(BRCD_VSCALEF)
  if constexpr (sizeof(T) == 4) {
    // -200 (or -inf) gives 2^-289 scaled: 0. A finite floor keeps -inf out of the reduction (it would make NaN).
    __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x), _mm512_set1_ps(shift));
    v = _mm512_max_ps(_mm512_set1_ps(-200.0f), v);  // the second operand is returned where one is NaN: NaN stays
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172321e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    _mm512_storeu_ps(out, _mm512_scalef_ps(p, n));
  } else {
    __m512d v = _mm512_sub_pd(_mm512_loadu_pd(x), _mm512_set1_pd(shift));
    v = _mm512_max_pd(_mm512_set1_pd(-1500.0), v);  // 2^-2164 scaled: 0
    const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(v, _mm512_set1_pd(1.4426950408889634)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(0.693145751953125), v);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.4286068203094172321e-6), r);
    __m512d p = _mm512_set1_pd(1.0 / 6227020800.0);
    for (const double c : {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                           1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0})
      p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
    _mm512_storeu_pd(out, _mm512_scalef_pd(p, n));
  }
#else
#pragma omp simd
  for (int v = 0; v < kVec<T>; ++v) out[v] = fast_exp(x[v] - shift);
#endif
}

// Cache-line aligned storage: the micro-kernels' vector loads and stores then never split a line (at B = 64 a
// misaligned buffer cost about 10 % of the kernels, measured).
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t{64}); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
};

template <class T>
using AlignedVector = std::vector<T, LineAligned<T>>;

// A cache-line aligned buffer whose storage comes from, and goes back to, a slot of this thread: the loss's O(B*K)
// buffers are reused from call to call, and are not zeroed unless asked (zeroing half a MiB that is about to be
// overwritten cost more than the rows' normalisation at B = 1024). Storage over kKeepBytes is freed on return
// instead, where a fresh allocation's cost is small against the O(B^2) work.
template <class T, int Slot>
class PooledBuffer {
 public:
  static constexpr size_t kKeepBytes = size_t(16) << 20;
  PooledBuffer() : storage_(std::exchange(slot(), Storage{})) {}
  PooledBuffer(PooledBuffer&& other) noexcept : storage_(std::exchange(other.storage_, Storage{})) {}
  PooledBuffer& operator=(PooledBuffer&&) = delete;
  ~PooledBuffer() {
    Storage& s = slot();
    if (storage_.capacity > s.capacity && storage_.capacity * sizeof(T) <= kKeepBytes) std::swap(s, storage_);
    storage_.release();
  }
  // Room for n elements; their values are undefined.
  void reserve(size_t n) {
    if (n <= storage_.capacity) return;
    storage_.release();
    storage_.ptr = LineAligned<T>().allocate(n);
    storage_.capacity = n;
  }
  void assign(size_t n, T value) {
    reserve(n);
    std::fill(storage_.ptr, storage_.ptr + n, value);
  }
  T* data() { return storage_.ptr; }
  const T* data() const { return storage_.ptr; }

 private:
  struct Storage {
    T* ptr = nullptr;
    size_t capacity = 0;
    void release() {
      if (ptr != nullptr) LineAligned<T>().deallocate(ptr, capacity);
      ptr = nullptr;
      capacity = 0;
    }
  };
  // Frees what it holds when the thread ends.
  struct Slot_ : Storage {
    ~Slot_() { this->release(); }
  };
  static Storage& slot() {
    thread_local Slot_ storage;
    return storage;
  }
  Storage storage_;
};

// A kVec x kVec tile transposed in registers: dst[i * ds + j] = src[j * ss + i]. log2(kVec) rounds of two-source
// shuffles, each swapping half-blocks between row pairs (the GCC vector extension lowers them for every ISA); a
// scalar transpose stores one element at a time to a different cache line, and cost 5 % of the step at B = 64.
// The 64-byte vectors are only ever passed by reference: by value, the scalar and AVX2 builds would warn of an
// ABI that differs without AVX-512 (-Wpsabi), although nothing here crosses a translation unit.
typedef float FloatLine __attribute__((vector_size(64)));
typedef double DoubleLine __attribute__((vector_size(64)));
template <class T>
struct LineOf;
template <>
struct LineOf<float> {
  using type = FloatLine;
};
template <>
struct LineOf<double> {
  using type = DoubleLine;
};

// Rows a and b exchange their S-element half-blocks: a keeps its even half-blocks and takes b's even ones into
// its odd places; b takes a's odd ones into its even places and keeps its odd ones.
template <int V, int S, class L, size_t... J>
inline void swap_half_blocks(L& a, L& b, std::index_sequence<J...>) {
  const L lo = __builtin_shufflevector(a, b, ((J & S) == 0 ? int(J) : int(V + J - S))...);
  const L hi = __builtin_shufflevector(a, b, ((J & S) == 0 ? int(J + S) : int(V + J))...);
  a = lo;
  b = hi;
}
template <int V, int S, class L>
inline void transpose_rounds(L (&r)[V]) {
  if constexpr (S >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < V; ++i)
      if ((i & S) == 0) swap_half_blocks<V, S>(r[i], r[i + S], std::make_index_sequence<V>{});
    transpose_rounds<V, S / 2>(r);
  }
}
template <class T>
inline void transpose_tile(const T* src, int64_t ss, T* dst, int64_t ds) {
  constexpr int V = kVec<T>;
  using L = typename LineOf<T>::type;
  L r[V];
  for (int i = 0; i < V; ++i) std::memcpy(&r[i], src + i * ss, sizeof(L));
  transpose_rounds<V, V / 2>(r);
  for (int i = 0; i < V; ++i) std::memcpy(dst + i * ds, &r[i], sizeof(L));
}

// The individual term's facts of sample k: cos(S_k, Ta_k) and the raw norms |S_k|, |Ta_k| (for its gradient).
template <class T>
struct Individual {
  T cos = 0, student_norm = 0, anchor_norm = 0;
};

// The prepared operands: Zn = rows of [M*S ; M*Tv] scaled to unit norm (max(|z|, eps)), padded with zero rows to
// whole tiles, and its transpose for the column-vectorised products.
template <class T>
struct Prepared {
  int64_t batch, bits, n2, rows_pad, cols_pad;
  T inv_tau;
  AlignedVector<T> zn;    // [rows_pad, K]
  AlignedVector<T> zt;    // [K, cols_pad]
  std::vector<T> norm;    // [2B] |z| (unclamped)
  std::vector<Individual<T>> ind;  // [B]
  // Groups renumbered 0..G-1 (int32 compares vectorise twice as wide), -1 where none; padded columns have -1.
  std::vector<int32_t> gr, gc;  // [cols_pad]
  bool has_groups = false;
  // Log-sum-exp shift: cosines are at most 1, so every logit is at most 1/tau and a fixed shift of 1/tau cannot
  // overflow; it is used while exp(-2/tau) stays a normal number, else the rows track their running maximum.
  bool fixed_shift = true;
};

// Rows times bits from which the O(B*K) loops (row preparation, the gradient chain) are worth a thread team.
constexpr int64_t kRowWorkForThreads = 16384;

// Runs body() in an OpenMP team where `parallel`, else on this thread outside any parallel region (its worksharing
// loops then run whole, their barriers free). A parallel region with a false if-clause still makes libgomp set up a
// team of one and wake the pool (a futex call), which at B = 64 is a measurable share of the step.
template <class F>
inline void in_team(bool parallel, F&& body) {
  if (parallel) {
#pragma omp parallel
    body();
  } else {
    body();
  }
}

// Renumbers the group ids that occur (>= 0) densely from 0, keeping -1 for "none".
inline void renumber_groups(const int64_t* row_groups, const int64_t* col_groups, int64_t n2, std::vector<int32_t>& gr,
                            std::vector<int32_t>& gc) {
  std::vector<int64_t> ids;
  ids.reserve(static_cast<size_t>(2 * n2));
  for (int64_t i = 0; i < n2; ++i) {
    if (row_groups[i] >= 0) ids.push_back(row_groups[i]);
    if (col_groups[i] >= 0) ids.push_back(col_groups[i]);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const auto id = [&](int64_t g) {
    return g < 0 ? -1 : static_cast<int32_t>(std::lower_bound(ids.begin(), ids.end(), g) - ids.begin());
  };
  for (int64_t i = 0; i < n2; ++i) {
    gr[i] = id(row_groups[i]);
    gc[i] = id(col_groups[i]);
  }
}

// Row a of Z = [M*S ; M*Tv] is sample a mod B; its positive partner is the same sample's other row. (A branch,
// not %: an integer division per row was a measurable share of the small tiles.)
inline int64_t sample_of(int64_t a, int64_t B) { return a < B ? a : a - B; }
inline int64_t partner_of(int64_t a, int64_t B) { return a < B ? a + B : a - B; }

template <class T>
T clamp_norm(T n) { return n > T(kEps) ? n : T(kEps); }

// The sum of a vector of partial sums, halving it in place: a tree of log2(V) vector adds where a serial sum is a
// chain of V dependent adds.
template <class T, int V>
inline T horizontal_sum(T (&part)[V]) {
#pragma GCC unroll 8
  for (int w = V / 2; w > 0; w /= 2)
#pragma omp simd
    for (int v = 0; v < w; ++v) part[v] += part[v + w];
  return part[0];
}

template <class T, int V>
inline T horizontal_max(T (&part)[V]) {
#pragma GCC unroll 8
  for (int w = V / 2; w > 0; w /= 2)
#pragma omp simd
    for (int v = 0; v < w; ++v) part[v] = part[v + w] > part[v] ? part[v + w] : part[v];
  return part[0];
}

// sum_d x[d] * y[d] with a vector of partial sums. GCC leaves a plain reduction loop scalar and latency bound (and
// does so with `omp simd reduction` inside the parallel regions here): 64 dependent FMAs at K = 64.
template <class T>
T dot(const T* x, const T* y, int64_t n) {
  constexpr int V = kVec<T>;
  T part[V] = {};
  int64_t d = 0;
  for (; d + V <= n; d += V)
#pragma omp simd
    for (int v = 0; v < V; ++v) part[v] += x[d + v] * y[d + v];
  T tail = 0;
  for (; d < n; ++d) tail += x[d] * y[d];
  return horizontal_sum(part) + tail;
}

// Rows of Z = [M*S ; M*Tv] scaled to unit norm (max(|z|, eps)) into zn (row stride ld; entries past K untouched),
// their norms |z| (unclamped), and the individual term's cosines and norms.
template <class T>
void normalise_rows(const ContrastiveProblem<T>& p, T* zn, int64_t ld, T* norm, Individual<T>* ind) {
  const int64_t B = p.batch, K = p.bits;
  in_team(B * K >= kRowWorkForThreads, [&] {
#pragma omp for schedule(static)
  for (int64_t a = 0; a < 2 * B; ++a) {
    const int64_t k = sample_of(a, B);
    const T* src = (a < B ? p.student : p.teacher_view) + k * K;
    T* z = zn + a * ld;
    if (p.bit_mask != nullptr) {
      const T* m = p.bit_mask + k * K;
#pragma omp simd
      for (int64_t d = 0; d < K; ++d) z[d] = m[d] * src[d];
    } else {
      std::copy(src, src + K, z);
    }
    const T n = std::sqrt(dot(z, z, K));
    norm[a] = n;
    const T inv = T(1) / clamp_norm(n);
#pragma omp simd
    for (int64_t d = 0; d < K; ++d) z[d] *= inv;
    if (a < B) {  // the three sums of the cosine in one pass
      const T* t = p.teacher_anchor + k * K;
      constexpr int V = kVec<T>;
      T st[V] = {}, ss[V] = {}, tt[V] = {};
      int64_t d = 0;
      for (; d + V <= K; d += V) {
#pragma omp simd
        for (int v = 0; v < V; ++v) {
          st[v] += src[d + v] * t[d + v];
          ss[v] += src[d + v] * src[d + v];
          tt[v] += t[d + v] * t[d + v];
        }
      }
      for (; d < K; ++d) {  // the bits past the last whole vector, into the first partial sums
        st[0] += src[d] * t[d];
        ss[0] += src[d] * src[d];
        tt[0] += t[d] * t[d];
      }
      Individual<T>& in = ind[k];
      in.student_norm = std::sqrt(horizontal_sum(ss));
      in.anchor_norm = std::sqrt(horizontal_sum(tt));
      in.cos = horizontal_sum(st) / (clamp_norm(in.student_norm) * clamp_norm(in.anchor_norm));
    }
  }
  });
}

// The fixed log-sum-exp shift 1/tau: cosines are at most 1, so no logit exceeds it, and it is usable while
// exp(-2/tau), the smallest term it can produce, stays a normal number.
template <class T>
bool fixed_shift_fits(T inv_tau) {
  return T(2) * inv_tau < (sizeof(T) == 4 ? T(80) : T(700));
}

template <class T>
Prepared<T> prepare(const ContrastiveProblem<T>& p) {
  Prepared<T> q;
  const int64_t B = p.batch, K = p.bits;
  q.batch = B;
  q.bits = K;
  q.n2 = 2 * B;
  q.rows_pad = (q.n2 + kRows - 1) / kRows * kRows;
  q.cols_pad = (q.n2 + kCols - 1) / kCols * kCols;
  q.inv_tau = T(1) / p.temperature;
  q.zn.assign(static_cast<size_t>(q.rows_pad * K), T(0));
  q.zt.assign(static_cast<size_t>(K * q.cols_pad), T(0));
  q.norm.assign(static_cast<size_t>(q.n2), T(0));
  q.ind.assign(static_cast<size_t>(B), Individual<T>{});
  q.gr.assign(static_cast<size_t>(q.cols_pad), -1);
  q.gc.assign(static_cast<size_t>(q.cols_pad), -1);
  q.has_groups = p.row_groups != nullptr && p.col_groups != nullptr;
  if (q.has_groups) renumber_groups(p.row_groups, p.col_groups, q.n2, q.gr, q.gc);
  q.fixed_shift = fixed_shift_fits(q.inv_tau);
  normalise_rows(p, q.zn.data(), K, q.norm.data(), q.ind.data());
  for (int64_t a = 0; a < q.n2; ++a)
    for (int64_t d = 0; d < K; ++d) q.zt[d * q.cols_pad + a] = q.zn[a * K + d];
  return q;
}

// Columns of the tile starting at b0 that hold data, rounded up to whole vectors (the rest is never touched).
template <class T>
inline int tile_cols(const Prepared<T>& q, int64_t b0) {
  constexpr int V = kVec<T>;
  const int64_t live = std::min<int64_t>(kCols, q.n2 - b0);
  return static_cast<int>((live + V - 1) / V * V);
}

// The register-blocked product behind every similarity and gradient tile of both paths:
// acc[r][v] = sum over t < steps of a[r * a_row + t * a_step] * b[t * b_step + v], R rows of broadcast coefficients
// against W columns of vectors.
template <class T, int R, int W>
inline void micro_product(const T* a, int64_t a_row, int64_t a_step, const T* b, int64_t b_step, int64_t steps,
                          T (&acc)[R][W]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int v = 0; v < W; ++v) acc[r][v] = T(0);
  for (int64_t t = 0; t < steps; ++t) {
    const T* bt = b + t * b_step;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T c = a[r * a_row + t * a_step];
#pragma omp simd
      for (int v = 0; v < W; ++v) acc[r][v] += c * bt[v];
    }
  }
}

// s[r * kCols + j] = <Zn[a0 + r], Zn[b0 + j]> / tau for the tile's rows and its first `cols` columns.
template <class T>
inline void similarity_tile(const Prepared<T>& q, int64_t a0, int64_t b0, int cols, T* s) {
  constexpr int V = kVec<T>;
  const int64_t K = q.bits;
  for (int j0 = 0; j0 < cols; j0 += V) {
    T acc[kRows][V];
    micro_product<T, kRows, V>(q.zn.data() + a0 * K, K, 1, q.zt.data() + b0 + j0, q.cols_pad, K, acc);
    for (int r = 0; r < kRows; ++r)
#pragma omp simd
      for (int v = 0; v < V; ++v) s[r * kCols + j0 + v] = acc[r][v] * q.inv_tau;
  }
}

// g[r * K + d] += sum_j coef[r * kCols + j] * Zn[b0 + j][d] for a whole tile of rows: the backward's second
// product, register-blocked like similarity_tile (one vector of Zn_b, broadcast coefficients).
template <class T>
inline void accumulate_rows(const Prepared<T>& q, int64_t b0, int64_t jn, const T* coef, T* g) {
  constexpr int V = kVec<T>;
  const int64_t K = q.bits;
  int64_t d0 = 0;
  for (; d0 + V <= K; d0 += V) {
    T acc[kRows][V];
    micro_product<T, kRows, V>(coef, kCols, 1, q.zn.data() + b0 * K + d0, K, jn, acc);
    for (int r = 0; r < kRows; ++r)
#pragma omp simd
      for (int v = 0; v < V; ++v) g[r * K + d0 + v] += acc[r][v];
  }
  for (; d0 < K; ++d0) {  // the bits past the last whole vector
    for (int r = 0; r < kRows; ++r) {
      T acc = 0;
      for (int64_t j = 0; j < jn; ++j) acc += coef[r * kCols + j] * q.zn[(b0 + j) * K + d0];
      g[r * K + d0] += acc;
    }
  }
}

// Row a's negatives: not itself, not its positive partner, not a padding column, not dropped by the groups.
template <class T>
inline void mask_invalid_row(const Prepared<T>& q, int64_t a, int64_t b0, int cols, T* srow) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int32_t ga = q.gr[a];
  if (q.has_groups && ga >= 0) {
    const int32_t* gc = q.gc.data() + b0;
#pragma omp simd
    for (int j = 0; j < cols; ++j) srow[j] = gc[j] == ga ? ninf : srow[j];
  }
  const int64_t partner = partner_of(a, q.batch);
  if (a >= b0 && a < b0 + kCols) srow[a - b0] = ninf;
  if (partner >= b0 && partner < b0 + kCols) srow[partner - b0] = ninf;
  for (int64_t j = q.n2 - b0; j < cols; ++j) srow[j] = ninf;  // padding columns
}

// Small batches run on the calling thread: waking a team costs more than the whole product.
template <class T>
bool worth_threads(const Prepared<T>& q) {
  return q.n2 * q.n2 * q.bits >= (int64_t(1) << 22);
}

// P_a from the normalised rows zn (row stride ld).
template <class T>
T positive_logit(const ContrastiveProblem<T>& p, const T* zn, int64_t ld, const Individual<T>* ind, T inv_tau,
                 int64_t a) {
  const int64_t B = p.batch, k = sample_of(a, B), partner = partner_of(a, B);
  const T al = alpha_of(p, k);
  return al * ind[k].cos * inv_tau + (T(1) - al) * dot(zn + a * ld, zn + partner * ld, p.bits) * inv_tau;
}

// l_a = log(1 + sum_b exp(s_ab - P_a)) from neg_sum = sum_b exp(s_ab - shift): exactly 0 when every negative is
// dropped; NaN anywhere in the row (or the positive) reaches the loss.
template <class T>
T row_loss(T pa, T shift, double neg_sum) {
  const double pos_term = std::exp(static_cast<double>(pa) - static_cast<double>(shift));
  const double l = pos_term > 1e-300 ? std::log1p(neg_sum / pos_term)
                                     : std::log(pos_term + neg_sum) + shift - pa;
  const bool bad = pa != pa || neg_sum != neg_sum;
  return bad ? std::numeric_limits<T>::quiet_NaN() : static_cast<T>(l);
}

// The general path: row tiles against column tiles, a running maximum where the fixed shift does not fit.
template <class T>
T forward_general(const ContrastiveProblem<T>& p, T* lse, T* pos) {
  const Prepared<T> q = prepare(p);
  const int64_t row_tiles = q.rows_pad / kRows;
  const int64_t groups = (row_tiles + kGroupTiles - 1) / kGroupTiles;
  double total = 0;
  in_team(worth_threads(q), [&] {
    AlignedVector<T> s(static_cast<size_t>(kRows * kCols));
    // Per row of the group: the sum of exp(logit - shift) over the negatives, and the shift (1/tau, or the
    // running maximum).
    std::vector<T> shift(static_cast<size_t>(kGroupTiles * kRows)), pa(shift.size());
    std::vector<double> neg_sum(shift.size());
#pragma omp for schedule(dynamic) reduction(+ : total)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t t0 = grp * kGroupTiles, t1 = std::min(row_tiles, t0 + kGroupTiles);
      const int64_t g0 = t0 * kRows;  // first row of the group
      for (int64_t a = g0; a < t1 * kRows; ++a) {
        pa[a - g0] = a < q.n2 ? positive_logit(p, q.zn.data(), q.bits, q.ind.data(), q.inv_tau, a) : T(0);
        shift[a - g0] = q.fixed_shift ? q.inv_tau : pa[a - g0];
        neg_sum[a - g0] = 0.0;
      }
      // Column tiles outside, row tiles inside: a column tile is reused from cache by the whole group.
      for (int64_t b0 = 0; b0 < q.n2; b0 += kCols) {
        const int cols = tile_cols(q, b0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t a0 = t * kRows;
          similarity_tile(q, a0, b0, cols, s.data());
          for (int r = 0; r < kRows && a0 + r < q.n2; ++r) {
            const int64_t i = a0 + r - g0;
            T* srow = s.data() + r * kCols;
            mask_invalid_row(q, a0 + r, b0, cols, srow);
            // Vector partials and trees, not `omp simd reduction` (serial partial sums); cols is whole vectors.
            constexpr int V = kVec<T>;
            T m = shift[i];
            if (!q.fixed_shift) {
              T top[V];
              std::fill(top, top + V, m);
              for (const T* sv = srow; sv < srow + cols; sv += V)
#pragma omp simd
                for (int v = 0; v < V; ++v) top[v] = sv[v] > top[v] ? sv[v] : top[v];
              m = horizontal_max(top);
            }
            T part[V] = {};
            for (const T* sv = srow; sv < srow + cols; sv += V)
#pragma omp simd
              for (int v = 0; v < V; ++v) part[v] += fast_exp(sv[v] - m);
            const T acc = horizontal_sum(part);
            if (m != shift[i]) neg_sum[i] *= static_cast<double>(fast_exp(shift[i] - m));
            neg_sum[i] += static_cast<double>(acc);
            shift[i] = m;
          }
        }
      }
      for (int64_t a = g0; a < std::min(q.n2, t1 * kRows); ++a) {
        const int64_t i = a - g0;
        const T la = row_loss(pa[i], shift[i], neg_sum[i]);
        lse[a] = pa[i] + la;
        pos[a] = pa[i];
        total += static_cast<double>(la);
      }
    }
  });
  return static_cast<T>(total / static_cast<double>(q.n2));
}

// dL/dS, dL/dTa and dL/dTv from g = sum_b coef_ab Zn_b (the negatives, row stride ld, overwritten): adds the
// positive terms and the scale, then the chain through the normalisation, the mask and the individual cosine.
// pos_coef[a] = w_a - 1, with w_a the positive's softmax weight in row a.
template <class T>
void finish_backward(const ContrastiveProblem<T>& p, const T* zn, int64_t ld, const T* norm,
                     const Individual<T>* ind, T inv_tau, T grad_loss, const T* pos_coef, T* gz, T* g_student,
                     T* g_anchor, T* g_view) {
  const int64_t B = p.batch, K = p.bits, n2 = 2 * B;
  const T scale = grad_loss / static_cast<T>(n2);
  in_team(B * K >= kRowWorkForThreads, [&] {
#pragma omp for schedule(static)
  for (int64_t k = 0; k < B; ++k) {
    const T al = alpha_of(p, k);
    const T* m = p.bit_mask ? p.bit_mask + k * K : nullptr;
    const T cross = (T(1) - al) * (pos_coef[k] + pos_coef[k + B]);
    const T f = scale * inv_tau;
    for (int side = 0; side < 2; ++side) {
      const int64_t a = k + side * B, partner = partner_of(a, B);
      T* g = gz + a * ld;
      const T* za = zn + a * ld;
      const T* zp = zn + partner * ld;
#pragma omp simd
      for (int64_t d = 0; d < K; ++d) g[d] = f * (g[d] + cross * zp[d]);
      T* out = side == 0 ? g_student : g_view;
      if (out == nullptr) continue;
      out += k * K;
      const T n = norm[a];
      const T inv = T(1) / clamp_norm(n);
      // Through z / max(|z|, eps): the projection drops the radial part, except where the norm was clamped.
      const T radial = n > T(kEps) ? dot(za, g, K) : T(0);
#pragma omp simd
      for (int64_t d = 0; d < K; ++d) out[d] = (g[d] - za[d] * radial) * inv;
      if (m != nullptr) {
#pragma omp simd
        for (int64_t d = 0; d < K; ++d) out[d] *= m[d];
      }
    }
    // Individual term: alpha_k * cos(S_k, Ta_k) / tau appears in P_k and P_{k+B}.
    const T dc = scale * al * inv_tau * (pos_coef[k] + pos_coef[k + B]);
    const T* s = p.student + k * K;
    const T* ta = p.teacher_anchor + k * K;
    const T ns_raw = ind[k].student_norm, nt_raw = ind[k].anchor_norm;
    const T ns = clamp_norm(ns_raw), nt = clamp_norm(nt_raw);
    const T c = ind[k].cos;
    const T cross_coef = dc / (ns * nt);
    const T fs = ns_raw > T(kEps) ? dc * c / (ns * ns) : T(0);
    const T ft = nt_raw > T(kEps) ? dc * c / (nt * nt) : T(0);
    if (g_student != nullptr) {
      T* out = g_student + k * K;
#pragma omp simd
      for (int64_t d = 0; d < K; ++d) out[d] += cross_coef * ta[d] - fs * s[d];
    }
    if (g_anchor != nullptr) {
      T* out = g_anchor + k * K;
#pragma omp simd
      for (int64_t d = 0; d < K; ++d) out[d] = cross_coef * s[d] - ft * ta[d];
    }
  }
  });
}

// w_a - 1 for every row, with w_a = exp(P_a - lse_a) the positive's softmax weight: the loss of row a moves with it
// through P_a.
template <class T>
std::vector<T> positive_coefficients(const T* lse, const T* pos, int64_t n2) {
  std::vector<T> c(static_cast<size_t>(n2));
  for (int64_t a = 0; a < n2; ++a) c[a] = fast_exp(pos[a] - lse[a]) - T(1);
  return c;
}

template <class T>
void backward_general(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos, T* g_student,
                      T* g_anchor, T* g_view) {
  const Prepared<T> q = prepare(p);
  const int64_t B = q.batch, K = q.bits, n2 = q.n2;
  const std::vector<T> pos_coef = positive_coefficients(lse, pos, n2);
  std::vector<T> lse_pad(static_cast<size_t>(q.cols_pad), std::numeric_limits<T>::infinity());
  std::copy(lse, lse + n2, lse_pad.begin());
  AlignedVector<T> gz(static_cast<size_t>(q.rows_pad * K), T(0));  // dL/dZn
  const int64_t row_tiles = q.rows_pad / kRows;
  const int64_t groups = (row_tiles + kGroupTiles - 1) / kGroupTiles;
  in_team(worth_threads(q), [&] {
    AlignedVector<T> s(static_cast<size_t>(kRows * kCols));
#pragma omp for schedule(dynamic)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t t0 = grp * kGroupTiles, t1 = std::min(row_tiles, t0 + kGroupTiles);
      // Column tiles outside, row tiles inside: a column tile is reused from cache by the whole group.
      for (int64_t b0 = 0; b0 < n2; b0 += kCols) {
        const int cols = tile_cols(q, b0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t a0 = t * kRows;
          similarity_tile(q, a0, b0, cols, s.data());
          for (int r = 0; r < kRows; ++r) {
            const int64_t a = a0 + r;
            T* srow = s.data() + r * kCols;
            if (a >= n2) {  // padding rows take no part
              std::fill(srow, srow + cols, T(0));
              continue;
            }
            const int64_t partner = partner_of(a, B);
            const int32_t ga = q.gr[a], gca = q.gc[a];
            const T la = lse[a];
            const int32_t* gr_b = q.gr.data() + b0;
            const int32_t* gc_b = q.gc.data() + b0;
            const T* lse_b = lse_pad.data() + b0;
            // Coefficient of Zn_b in dL/dZn_a: softmax weight of b in row a plus that of a in row b.
            if (q.has_groups) {
#pragma omp simd
              for (int j = 0; j < cols; ++j) {
                const bool ab = !((ga >= 0) & (gc_b[j] == ga));
                const bool ba = !((gr_b[j] >= 0) & (gr_b[j] == gca));
                const T e_ab = fast_exp(srow[j] - la);
                const T e_ba = fast_exp(srow[j] - lse_b[j]);
                srow[j] = (ab ? e_ab : T(0)) + (ba ? e_ba : T(0));
              }
            } else {
#pragma omp simd
              for (int j = 0; j < cols; ++j) srow[j] = fast_exp(srow[j] - la) + fast_exp(srow[j] - lse_b[j]);
            }
            if (a >= b0 && a < b0 + kCols) srow[a - b0] = T(0);
            if (partner >= b0 && partner < b0 + kCols) srow[partner - b0] = T(0);
            for (int64_t j = n2 - b0; j < cols; ++j) srow[j] = T(0);  // padding columns
          }
          accumulate_rows(q, b0, std::min<int64_t>(kCols, n2 - b0), s.data(), gz.data() + a0 * K);
        }
      }
    }
  });
  finish_backward(p, q.zn.data(), K, q.norm.data(), q.ind.data(), q.inv_tau, grad_loss, pos_coef.data(), gz.data(),
                  g_student, g_anchor, g_view);
}

}  // namespace brcd::cpu::BRCD_ISA

#include "cpu/contrastive_symmetric.h"

namespace brcd::cpu::BRCD_ISA {

template <class T>
T forward(const ContrastiveProblem<T>& p, T* lse, T* pos) {
  return fixed_shift_fits(T(1) / p.temperature) ? forward_symmetric(p, lse, pos) : forward_general(p, lse, pos);
}

template <class T>
void backward(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos, T* g_student, T* g_anchor,
              T* g_view) {
  if (fixed_shift_fits(T(1) / p.temperature))
    backward_symmetric(p, grad_loss, lse, pos, g_student, g_anchor, g_view);
  else
    backward_general(p, grad_loss, lse, pos, g_student, g_anchor, g_view);
}

template float forward<float>(const ContrastiveProblem<float>&, float*, float*);
template double forward<double>(const ContrastiveProblem<double>&, double*, double*);
template void backward<float>(const ContrastiveProblem<float>&, float, const float*, const float*, float*, float*,
                              float*);
template void backward<double>(const ContrastiveProblem<double>&, double, const double*, const double*, double*,
                               double*, double*);

}  // namespace brcd::cpu::BRCD_ISA
