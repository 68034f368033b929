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

// The prepared operands: Zn = rows of [M*S ; M*Tv] scaled to unit norm (max(|z|, eps)), padded with zero rows to
// whole tiles, and its transpose for the column-vectorised products.
template <class T>
struct Prepared {
  int64_t batch, bits, n2, rows_pad, cols_pad;
  T inv_tau;
  std::vector<T> zn;      // [rows_pad, K]
  std::vector<T> zt;      // [K, cols_pad]
  std::vector<T> norm;    // [2B] |z| (unclamped)
  std::vector<T> cos_ind; // [B] cos(S_k, Ta_k)
  // Groups renumbered 0..G-1 (int32 compares vectorise twice as wide), -1 where none; padded columns have -1.
  std::vector<int32_t> gr, gc;  // [cols_pad]
  bool has_groups = false;
  // Log-sum-exp shift: cosines are at most 1, so every logit is at most 1/tau and a fixed shift of 1/tau cannot
  // overflow; it is used while exp(-2/tau) stays a normal number, else the rows track their running maximum.
  bool fixed_shift = true;
};

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

template <class T>
T clamp_norm(T n) { return n > T(kEps) ? n : T(kEps); }

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
  q.cos_ind.assign(static_cast<size_t>(B), T(0));
  q.gr.assign(static_cast<size_t>(q.cols_pad), -1);
  q.gc.assign(static_cast<size_t>(q.cols_pad), -1);
  q.has_groups = p.row_groups != nullptr && p.col_groups != nullptr;
  if (q.has_groups) renumber_groups(p.row_groups, p.col_groups, q.n2, q.gr, q.gc);
  q.fixed_shift = T(2) * q.inv_tau < (sizeof(T) == 4 ? T(80) : T(700));
#pragma omp parallel for schedule(static) if (B * K > 65536)
  for (int64_t a = 0; a < q.n2; ++a) {
    const int64_t k = a % B;
    const T* src = (a < B ? p.student : p.teacher_view) + k * K;
    const T* m = p.bit_mask ? p.bit_mask + k * K : nullptr;
    T* z = q.zn.data() + a * K;
    T ss = 0;
    for (int64_t d = 0; d < K; ++d) {
      z[d] = m ? m[d] * src[d] : src[d];
      ss += z[d] * z[d];
    }
    const T n = std::sqrt(ss);
    q.norm[a] = n;
    const T inv = T(1) / clamp_norm(n);
    for (int64_t d = 0; d < K; ++d) z[d] *= inv;
    if (a < B) {
      const T* t = p.teacher_anchor + k * K;
      const T* s = p.student + k * K;
      T st = 0, s2 = 0, t2 = 0;
      for (int64_t d = 0; d < K; ++d) {
        st += s[d] * t[d];
        s2 += s[d] * s[d];
        t2 += t[d] * t[d];
      }
      q.cos_ind[k] = st / (clamp_norm(std::sqrt(s2)) * clamp_norm(std::sqrt(t2)));
    }
  }
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

// s[r * kCols + j] = <Zn[a0 + r], Zn[b0 + j]> / tau for the tile's rows and its first `cols` columns.
template <class T>
inline void similarity_tile(const Prepared<T>& q, int64_t a0, int64_t b0, int cols, T* s) {
  constexpr int V = kVec<T>;
  const int64_t K = q.bits;
  const T* zn = q.zn.data() + a0 * K;
  for (int j0 = 0; j0 < cols; j0 += V) {
    T acc[kRows][V];
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = T(0);
    const T* zt = q.zt.data() + b0 + j0;
    for (int64_t d = 0; d < K; ++d) {
      const T* col = zt + d * q.cols_pad;
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const T z = zn[r * K + d];
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[r][v] += z * col[v];
      }
    }
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
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = T(0);
    for (int64_t j = 0; j < jn; ++j) {
      const T* zb = q.zn.data() + (b0 + j) * K + d0;
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const T c = coef[r * kCols + j];
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[r][v] += c * zb[v];
      }
    }
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
  const int64_t partner = (a + q.batch) % q.n2;
  if (a >= b0 && a < b0 + kCols) srow[a - b0] = ninf;
  if (partner >= b0 && partner < b0 + kCols) srow[partner - b0] = ninf;
  for (int64_t j = q.n2 - b0; j < cols; ++j) srow[j] = ninf;  // padding columns
}

// Small batches run on the calling thread: waking a team costs more than the whole product.
template <class T>
bool worth_threads(const Prepared<T>& q) {
  return q.n2 * q.n2 * q.bits >= (int64_t(1) << 22);
}

template <class T>
T positive_logit(const ContrastiveProblem<T>& p, const Prepared<T>& q, int64_t a) {
  const int64_t k = a % q.batch, partner = (a + q.batch) % q.n2, K = q.bits;
  T dot = 0;
  for (int64_t d = 0; d < K; ++d) dot += q.zn[a * K + d] * q.zn[partner * K + d];
  const T al = p.alpha[k];
  return al * q.cos_ind[k] * q.inv_tau + (T(1) - al) * dot * q.inv_tau;
}

template <class T>
T forward(const ContrastiveProblem<T>& p, T* lse, T* pos) {
  const Prepared<T> q = prepare(p);
  const int64_t row_tiles = q.rows_pad / kRows;
  const int64_t groups = (row_tiles + kGroupTiles - 1) / kGroupTiles;
  double total = 0;
#pragma omp parallel reduction(+ : total) if (worth_threads(q))
  {
    std::vector<T> s(static_cast<size_t>(kRows * kCols));
    // Per row of the group: the sum of exp(logit - shift) over the negatives, and the shift (1/tau, or the
    // running maximum).
    std::vector<T> shift(static_cast<size_t>(kGroupTiles * kRows)), pa(shift.size());
    std::vector<double> neg_sum(shift.size());
#pragma omp for schedule(dynamic)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t t0 = grp * kGroupTiles, t1 = std::min(row_tiles, t0 + kGroupTiles);
      const int64_t g0 = t0 * kRows;  // first row of the group
      for (int64_t a = g0; a < t1 * kRows; ++a) {
        pa[a - g0] = a < q.n2 ? positive_logit(p, q, a) : T(0);
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
            T m = shift[i];
            if (!q.fixed_shift) {
#pragma omp simd reduction(max : m)
              for (int j = 0; j < cols; ++j) m = srow[j] > m ? srow[j] : m;
            }
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < cols; ++j) acc += fast_exp(srow[j] - m);
            if (m != shift[i]) neg_sum[i] *= static_cast<double>(fast_exp(shift[i] - m));
            neg_sum[i] += static_cast<double>(acc);
            shift[i] = m;
          }
        }
      }
      for (int64_t a = g0; a < std::min(q.n2, t1 * kRows); ++a) {
        const int64_t i = a - g0;
        // l_a = log(1 + sum_b exp(s_ab - P_a)): exactly 0 when every negative is dropped.
        const double pos_term = std::exp(static_cast<double>(pa[i]) - static_cast<double>(shift[i]));
        const double l = pos_term > 1e-300 ? std::log1p(neg_sum[i] / pos_term)
                                           : std::log(pos_term + neg_sum[i]) + shift[i] - pa[i];
        // NaN anywhere in the row (or the positive) reaches the loss.
        const bool bad = pa[i] != pa[i] || neg_sum[i] != neg_sum[i];
        const T la = bad ? std::numeric_limits<T>::quiet_NaN() : static_cast<T>(l);
        lse[a] = pa[i] + la;
        pos[a] = pa[i];
        total += static_cast<double>(la);
      }
    }
  }
  return static_cast<T>(total / static_cast<double>(q.n2));
}

template <class T>
void backward(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos, T* g_student,
              T* g_anchor, T* g_view) {
  const Prepared<T> q = prepare(p);
  const int64_t B = q.batch, K = q.bits, n2 = q.n2;
  const T scale = grad_loss / static_cast<T>(n2);
  // w_a: the positive's softmax weight; the loss of row a moves with (w_a - 1) through P_a.
  std::vector<T> pos_coef(static_cast<size_t>(n2));
  for (int64_t a = 0; a < n2; ++a) pos_coef[a] = fast_exp(pos[a] - lse[a]) - T(1);
  std::vector<T> lse_pad(static_cast<size_t>(q.cols_pad), std::numeric_limits<T>::infinity());
  std::copy(lse, lse + n2, lse_pad.begin());
  std::vector<T> gz(static_cast<size_t>(q.rows_pad * K), T(0));  // dL/dZn
  const int64_t row_tiles = q.rows_pad / kRows;
  const int64_t groups = (row_tiles + kGroupTiles - 1) / kGroupTiles;
#pragma omp parallel if (worth_threads(q))
  {
    std::vector<T> s(static_cast<size_t>(kRows * kCols));
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
            const int64_t partner = (a + B) % n2;
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
  }
  // Positive terms, scale, and the chain through the normalisation, the mask and the individual cosine.
#pragma omp parallel for schedule(static) if (B * K > 65536)
  for (int64_t k = 0; k < B; ++k) {
    const T al = p.alpha[k];
    const T* m = p.bit_mask ? p.bit_mask + k * K : nullptr;
    const T cross = (T(1) - al) * (pos_coef[k] + pos_coef[k + B]);
    for (int side = 0; side < 2; ++side) {
      const int64_t a = k + side * B, partner = (a + B) % n2;
      T* g = gz.data() + a * K;
      const T* za = q.zn.data() + a * K;
      const T* zp = q.zn.data() + partner * K;
      T dot = 0;
      for (int64_t d = 0; d < K; ++d) {
        g[d] = scale * q.inv_tau * (g[d] + cross * zp[d]);
        dot += za[d] * g[d];
      }
      T* out = side == 0 ? g_student : g_view;
      if (out == nullptr) continue;
      const T n = q.norm[a];
      const bool clamped = !(n > T(kEps));
      const T inv = T(1) / clamp_norm(n);
      for (int64_t d = 0; d < K; ++d) {
        const T dz = clamped ? g[d] * inv : (g[d] - za[d] * dot) * inv;
        out[k * K + d] = m ? m[d] * dz : dz;
      }
    }
    // Individual term: alpha_k * cos(S_k, Ta_k) / tau appears in P_k and P_{k+B}.
    const T dc = scale * al * q.inv_tau * (pos_coef[k] + pos_coef[k + B]);
    const T* s = p.student + k * K;
    const T* ta = p.teacher_anchor + k * K;
    T s2 = 0, t2 = 0;
    for (int64_t d = 0; d < K; ++d) {
      s2 += s[d] * s[d];
      t2 += ta[d] * ta[d];
    }
    const T ns_raw = std::sqrt(s2), nt_raw = std::sqrt(t2);
    const T ns = clamp_norm(ns_raw), nt = clamp_norm(nt_raw);
    const T c = q.cos_ind[k];
    const T fs = ns_raw > T(kEps) ? c / (ns * ns) : T(0);
    const T ft = nt_raw > T(kEps) ? c / (nt * nt) : T(0);
    for (int64_t d = 0; d < K; ++d) {
      if (g_student) g_student[k * K + d] += dc * (ta[d] / (ns * nt) - fs * s[d]);
      if (g_anchor) g_anchor[k * K + d] = dc * (s[d] / (ns * nt) - ft * ta[d]);
    }
  }
}

template float forward<float>(const ContrastiveProblem<float>&, float*, float*);
template double forward<double>(const ContrastiveProblem<double>&, double*, double*);
template void backward<float>(const ContrastiveProblem<float>&, float, const float*, const float*, float*, float*,
                              float*);
template void backward<double>(const ContrastiveProblem<double>&, double, const double*, const double*, double*,
                               double*, double*);

}  // namespace brcd::cpu::BRCD_ISA
