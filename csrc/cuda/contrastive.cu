// CUDA kernels of the fused contrastive loss (shared/spec/contrastive-loss.md). No torch headers.
//
// Forward: each block owns 64 rows of Z = [M*S ; M*Tv] (normalised) and streams over all 2B columns in 64-wide
// tiles, computing the similarity tile in registers and folding it into per-row online log-sum-exp statistics.
// Backward: the same tiles are recomputed; the softmax weights of both directions (row a's weight of b and row b's
// weight of a) multiply Zn_b into dL/dZn_a. Nothing of size 2B x 2B is ever stored.
#include <cuda_runtime.h>

#include <cmath>

#include "cuda/launchers.h"

namespace brcd::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, KC = 64;  // row tile, column tile, K step, K chunk of the backward
constexpr int kThreads = 256;                       // 16 x 16 threads, 4 x 4 results each
constexpr double kEps = 1e-8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <class T>
__device__ inline T dev_exp(T x) { return exp(x); }
template <>
__device__ inline float dev_exp<float>(float x) { return expf(x); }

template <class T>
__device__ inline T clamp_norm(T n) { return n > T(kEps) ? n : T(kEps); }

template <class T>
__device__ inline T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <class T>
struct Workspace {
  T* zn;        // [n2_pad, k_pad] rows of Z scaled to unit norm, zero padded
  T* gz;        // [n2_pad, k_pad] dL/dZn (backward)
  T* norm;      // [n2] |z|
  T* cos_ind;   // [B]
  double* row_loss;  // [n2]
  int64_t n2, n2_pad, k_pad;

  Workspace(void* base, int64_t batch, int64_t bits) {
    n2 = 2 * batch;
    n2_pad = round_up(n2, BM);
    k_pad = round_up(bits, KC);
    char* p = static_cast<char*>(base);
    zn = reinterpret_cast<T*>(p);
    p += sizeof(T) * n2_pad * k_pad;
    gz = reinterpret_cast<T*>(p);
    p += sizeof(T) * n2_pad * k_pad;
    row_loss = reinterpret_cast<double*>(p);
    p += sizeof(double) * n2;
    norm = reinterpret_cast<T*>(p);
    p += sizeof(T) * n2;
    cos_ind = reinterpret_cast<T*>(p);
  }
  static size_t bytes(int64_t batch, int64_t bits) {
    const int64_t n2 = 2 * batch, n2_pad = round_up(n2, BM), k_pad = round_up(bits, KC);
    return 2 * sizeof(T) * n2_pad * k_pad + sizeof(double) * n2 + sizeof(T) * (n2 + batch) + 64;
  }
};

// One warp per row of Z: mask, norm, unit row (padded with zeros); the individual cosine for student rows.
template <class T>
__global__ void prepare_kernel(ContrastiveProblem<T> p, Workspace<T> w) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (a >= w.n2_pad) return;
  const int64_t B = p.batch, K = p.bits;
  T* z = w.zn + a * w.k_pad;
  if (a >= w.n2) {
    for (int64_t d = lane; d < w.k_pad; d += 32) z[d] = T(0);
    return;
  }
  const int64_t k = a % B;
  const T* src = (a < B ? p.student : p.teacher_view) + k * K;
  const T* m = p.bit_mask ? p.bit_mask + k * K : nullptr;
  T ss = 0;
  for (int64_t d = lane; d < w.k_pad; d += 32) {
    const T v = d < K ? (m ? m[d] * src[d] : src[d]) : T(0);
    z[d] = v;
    ss += v * v;
  }
  const T n = sqrt(warp_sum(ss));
  const T inv = T(1) / clamp_norm(n);
  for (int64_t d = lane; d < K; d += 32) z[d] *= inv;
  if (lane == 0) w.norm[a] = n;
  if (a < B) {
    const T* s = p.student + k * K;
    const T* t = p.teacher_anchor + k * K;
    T st = 0, s2 = 0, t2 = 0;
    for (int64_t d = lane; d < K; d += 32) {
      st += s[d] * t[d];
      s2 += s[d] * s[d];
      t2 += t[d] * t[d];
    }
    st = warp_sum(st);
    s2 = warp_sum(s2);
    t2 = warp_sum(t2);
    if (lane == 0) w.cos_ind[k] = st / (clamp_norm(sqrt(s2)) * clamp_norm(sqrt(t2)));
  }
}

// One warp per row: the positive logit P_a.
template <class T>
__global__ void positive_kernel(ContrastiveProblem<T> p, Workspace<T> w, T* pos) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (a >= w.n2) return;
  const int64_t B = p.batch, partner = (a + B) % w.n2;
  T dot = 0;
  for (int64_t d = lane; d < w.k_pad; d += 32) dot += w.zn[a * w.k_pad + d] * w.zn[partner * w.k_pad + d];
  dot = warp_sum(dot);
  if (lane == 0) {
    const T al = alpha_of(p, a % B), inv_tau = T(1) / p.temperature;
    pos[a] = al * w.cos_ind[a % B] * inv_tau + (T(1) - al) * dot * inv_tau;
  }
}

constexpr int kPad = 4;  // rows of shared tiles stay 16-byte aligned (four-wide loads) and off one bank

// Four consecutive elements, loaded or stored as one vector (one 16-byte access for float, two for double).
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};
template <class T>
__device__ inline Quad<T> load_quad(const T* p) {
  return *reinterpret_cast<const Quad<T>*>(p);
}
template <class T>
__device__ inline void store_quad(T* p, const Quad<T>& q) {
  *reinterpret_cast<Quad<T>*>(p) = q;
}

template <class T>
struct alignas(4 * sizeof(T)) TileSmem {
  T a[BK][BM + kPad];
  T b[BK][BN + kPad];
};

// acc[i][j] = <Zn[a0 + 4ty + i], Zn[b0 + 4tx + j]>. Each step of the inner loop reads two four-wide vectors for 16
// products (with scalar reads, shared-memory issue and not the FMA units set the pace).
template <class T>
__device__ inline void similarity_tile(const T* zn, int64_t k_pad, int64_t a0, int64_t b0, TileSmem<T>& sm,
                                       T acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int64_t k0 = 0; k0 < k_pad; k0 += BK) {
#pragma unroll
    for (int e = 0; e < (BM * BK) / kThreads; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int r = idx / BK, c = idx % BK;
      sm.a[c][r] = zn[(a0 + r) * k_pad + k0 + c];
      sm.b[c][r] = zn[(b0 + r) * k_pad + k0 + c];
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const Quad<T> av = load_quad(&sm.a[kk][ty * 4]);
      const Quad<T> bv = load_quad(&sm.b[kk][tx * 4]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av.v[i] * bv.v[j];
    }
    __syncthreads();
  }
}

// What the per-pair test needs of a row, loaded once per row instead of once per pair (no 64-bit modulo there).
struct RowFacts {
  int64_t group_as_row, group_as_col;
  int index, partner;  // rows of Z: 2B < 2^30 (the CUDA ops refuse batches of 2^29 or more)
  bool live;
};

template <class T>
__device__ inline RowFacts row_facts(const ContrastiveProblem<T>& p, int64_t n2, int64_t a) {
  RowFacts f;
  f.index = static_cast<int>(a);
  f.live = a < n2;
  f.partner = static_cast<int>(a < p.batch ? a + p.batch : a - p.batch);
  f.group_as_row = (f.live && p.row_groups) ? p.row_groups[a] : -1;
  f.group_as_col = (f.live && p.col_groups) ? p.col_groups[a] : -1;
  return f;
}

// b is a negative of row a: not a itself, not a's partner, not dropped by the groups (row a's group against b's
// column group). Callers pass a.group_as_row and b.group_as_col.
__device__ inline bool negative_ok(const RowFacts& a, const RowFacts& b) {
  if (!a.live || !b.live || b.index == a.index || b.index == a.partner) return false;
  return !(a.group_as_row >= 0 && b.group_as_col == a.group_as_row);
}

template <class T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ContrastiveProblem<T> p, Workspace<T> w, const T* pos,
                                                           T* lse) {
  __shared__ TileSmem<T> sm;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * BM;
  const T inv_tau = T(1) / p.temperature;
  T run_max[4];
  double run_sum[4];
  RowFacts rows[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t a = a0 + ty * 4 + i;
    rows[i] = row_facts(p, w.n2, a);
    const bool owner = tx == 0 && a < w.n2;  // the positive's own term starts one lane's sum
    run_max[i] = owner ? pos[a] : -INFINITY;
    run_sum[i] = owner ? 1.0 : 0.0;
  }
  for (int64_t b0 = 0; b0 < w.n2; b0 += BN) {
    T acc[4][4];
    similarity_tile(w.zn, w.k_pad, a0, b0, sm, acc);
    RowFacts cols[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) cols[j] = row_facts(p, w.n2, b0 + tx * 4 + j);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!negative_ok(rows[i], cols[j])) continue;
        const T x = acc[i][j] * inv_tau;
        if (x > run_max[i]) {
          run_sum[i] = run_sum[i] * static_cast<double>(dev_exp(run_max[i] - x)) + 1.0;
          run_max[i] = x;
        } else {
          run_sum[i] += static_cast<double>(dev_exp(x - run_max[i]));
        }
      }
    }
  }
  // Merge the 16 partial statistics of each row (lanes of one half-warp).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T m = run_max[i];
    double s = run_sum[i];
    for (int off = 8; off > 0; off >>= 1) {
      const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const double s2 = __shfl_xor_sync(0xffffffffu, s, off);
      const T mm = m > m2 ? m : m2;
      const double t1 = m == -INFINITY ? 0.0 : s * static_cast<double>(dev_exp(m - mm));
      const double t2 = m2 == -INFINITY ? 0.0 : s2 * static_cast<double>(dev_exp(m2 - mm));
      s = (s != s || s2 != s2) ? s + s2 : t1 + t2;  // NaN anywhere reaches the loss
      m = (m != m || m2 != m2) ? m + m2 : mm;
    }
    const int64_t a = a0 + ty * 4 + i;
    if (tx == 0 && a < w.n2) {
      const T l = m + static_cast<T>(log(s));
      lse[a] = l;
      w.row_loss[a] = static_cast<double>(l) - static_cast<double>(pos[a]);
    }
  }
}

// loss = mean of the row losses, summed in a fixed order (deterministic).
template <class T>
__global__ void mean_kernel(const double* row_loss, int64_t n, T* loss) {
  __shared__ double part[1024 / 32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += row_loss[i];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    double v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0;
    v = warp_sum(v);
    if (threadIdx.x == 0) *loss = static_cast<T>(v / static_cast<double>(n));
  }
}

template <class T>
struct alignas(4 * sizeof(T)) BackwardSmem {
  TileSmem<T> tile;
  T coef_t[BN][BM + kPad];  // the weights, column-major: coef_t[b][a]
  T zb[BN][KC + kPad];
};

// dL/dZn (unscaled) for 64 rows and a 64-wide chunk of K (blockIdx.y). Each thread owns 4 rows x 4 columns of the
// chunk, so the weighted sum reads two four-wide vectors per 16 products, as the similarity tile does.
template <class T>
__global__ void __launch_bounds__(kThreads) backward_kernel(ContrastiveProblem<T> p, Workspace<T> w, const T* lse) {
  extern __shared__ unsigned char raw[];
  BackwardSmem<T>& sm = *reinterpret_cast<BackwardSmem<T>*>(raw);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t kc0 = static_cast<int64_t>(blockIdx.y) * KC;
  const T inv_tau = T(1) / p.temperature;
  T g[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) g[i][c] = T(0);
  RowFacts rows[4];
  T row_lse[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    rows[i] = row_facts(p, w.n2, a0 + ty * 4 + i);
    row_lse[i] = rows[i].live ? lse[rows[i].index] : T(0);
  }
  for (int64_t b0 = 0; b0 < w.n2; b0 += BN) {
    T acc[4][4];
    similarity_tile(w.zn, w.k_pad, a0, b0, sm.tile, acc);
    RowFacts cols[4];
    T col_lse[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      cols[j] = row_facts(p, w.n2, b0 + tx * 4 + j);
      col_lse[j] = cols[j].live ? lse[cols[j].index] : T(0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      Quad<T> cq;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T x = acc[i][j] * inv_tau;
        T c = T(0);
        if (negative_ok(rows[i], cols[j])) c += dev_exp(x - row_lse[i]);
        if (negative_ok(cols[j], rows[i])) c += dev_exp(x - col_lse[j]);
        cq.v[i] = c;
      }
      store_quad(&sm.coef_t[tx * 4 + j][ty * 4], cq);
    }
#pragma unroll
    for (int e = 0; e < (BN * KC) / kThreads; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int r = idx / KC, c = idx % KC;
      sm.zb[r][c] = w.zn[(b0 + r) * w.k_pad + kc0 + c];
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < BN; ++j) {
      const Quad<T> cj = load_quad(&sm.coef_t[j][ty * 4]);
      const Quad<T> zj = load_quad(&sm.zb[j][tx * 4]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) g[i][c] += cj.v[i] * zj.v[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    Quad<T> out;
#pragma unroll
    for (int c = 0; c < 4; ++c) out.v[c] = g[i][c];
    store_quad(&w.gz[(a0 + ty * 4 + i) * w.k_pad + kc0 + tx * 4], out);
  }
}

// One warp per sample k: positive terms, the scale, the chain through the normalisation, the mask and the
// individual cosine.
template <class T>
__global__ void finish_backward_kernel(ContrastiveProblem<T> p, Workspace<T> w, const T* grad_loss, const T* lse,
                                       const T* pos, T* g_student, T* g_anchor, T* g_view) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t B = p.batch, K = p.bits, n2 = w.n2;
  if (k >= B) return;
  const T inv_tau = T(1) / p.temperature;
  const T scale = *grad_loss / static_cast<T>(n2);
  const T pc0 = dev_exp(pos[k] - lse[k]) - T(1), pc1 = dev_exp(pos[k + B] - lse[k + B]) - T(1);
  const T al = alpha_of(p, k);
  const T cross = (T(1) - al) * (pc0 + pc1);
  const T* m = p.bit_mask ? p.bit_mask + k * K : nullptr;
  for (int side = 0; side < 2; ++side) {
    const int64_t a = k + side * B, partner = (a + B) % n2;
    const T* za = w.zn + a * w.k_pad;
    const T* zp = w.zn + partner * w.k_pad;
    const T* ga = w.gz + a * w.k_pad;
    T dot = 0;
    for (int64_t d = lane; d < K; d += 32) dot += za[d] * (scale * inv_tau * (ga[d] + cross * zp[d]));
    dot = warp_sum(dot);
    T* out = side == 0 ? g_student : g_view;
    const T n = w.norm[a];
    const bool clamped = !(n > T(kEps));
    const T inv = T(1) / clamp_norm(n);
    for (int64_t d = lane; d < K; d += 32) {
      const T gd = scale * inv_tau * (ga[d] + cross * zp[d]);
      const T dz = clamped ? gd * inv : (gd - za[d] * dot) * inv;
      out[k * K + d] = m ? m[d] * dz : dz;
    }
  }
  const T dc = scale * al * inv_tau * (pc0 + pc1);
  const T* s = p.student + k * K;
  const T* ta = p.teacher_anchor + k * K;
  T s2 = 0, t2 = 0;
  for (int64_t d = lane; d < K; d += 32) {
    s2 += s[d] * s[d];
    t2 += ta[d] * ta[d];
  }
  s2 = warp_sum(s2);
  t2 = warp_sum(t2);
  const T ns_raw = sqrt(s2), nt_raw = sqrt(t2);
  const T ns = clamp_norm(ns_raw), nt = clamp_norm(nt_raw);
  const T c = w.cos_ind[k];
  const T fs = ns_raw > T(kEps) ? c / (ns * ns) : T(0);
  const T ft = nt_raw > T(kEps) ? c / (nt * nt) : T(0);
  for (int64_t d = lane; d < K; d += 32) {
    g_student[k * K + d] += dc * (ta[d] / (ns * nt) - fs * s[d]);
    g_anchor[k * K + d] = dc * (s[d] / (ns * nt) - ft * ta[d]);
  }
}

template <class T>
int prepare(const ContrastiveProblem<T>& p, Workspace<T>& w, T* pos, cudaStream_t stream) {
  const int rows_per_block = kThreads / 32;
  prepare_kernel<T><<<(w.n2_pad + rows_per_block - 1) / rows_per_block, kThreads, 0, stream>>>(p, w);
  positive_kernel<T><<<(w.n2 + rows_per_block - 1) / rows_per_block, kThreads, 0, stream>>>(p, w, pos);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

template <class T>
size_t contrastive_workspace(int64_t batch, int64_t bits) {
  return Workspace<T>::bytes(batch, bits);
}

template <class T>
int contrastive_forward(const ContrastiveProblem<T>& p, T* loss, T* lse, T* pos, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  Workspace<T> w(workspace, p.batch, p.bits);
  if (int err = prepare(p, w, pos, s)) return err;
  forward_kernel<T><<<static_cast<unsigned>(w.n2_pad / BM), kThreads, 0, s>>>(p, w, pos, lse);
  mean_kernel<T><<<1, 1024, 0, s>>>(w.row_loss, w.n2, loss);
  return static_cast<int>(cudaGetLastError());
}

template <class T>
int contrastive_backward(const ContrastiveProblem<T>& p, const T* grad_loss, const T* lse, const T* pos,
                         T* grad_student, T* grad_teacher_anchor, T* grad_teacher_view, void* workspace,
                         void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  Workspace<T> w(workspace, p.batch, p.bits);
  // Rebuild Zn (O(B*K)); the positive logits and log-sum-exps saved by the forward are reused.
  const int rows_per_block = kThreads / 32;
  prepare_kernel<T><<<(w.n2_pad + rows_per_block - 1) / rows_per_block, kThreads, 0, s>>>(p, w);
  const size_t smem = sizeof(BackwardSmem<T>);
  // Over the default 48 KiB of shared memory: opt in (per device, so on every call; it is cheap).
  if (cudaError_t e = cudaFuncSetAttribute(backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)))
    return static_cast<int>(e);
  const dim3 grid(static_cast<unsigned>(w.n2_pad / BM), static_cast<unsigned>(w.k_pad / KC));
  backward_kernel<T><<<grid, kThreads, smem, s>>>(p, w, lse);
  finish_backward_kernel<T><<<(p.batch + rows_per_block - 1) / rows_per_block, kThreads, 0, s>>>(
      p, w, grad_loss, lse, pos, grad_student, grad_teacher_anchor, grad_teacher_view);
  return static_cast<int>(cudaGetLastError());
}

template size_t contrastive_workspace<float>(int64_t, int64_t);
template size_t contrastive_workspace<double>(int64_t, int64_t);
template int contrastive_forward<float>(const ContrastiveProblem<float>&, float*, float*, float*, void*, void*);
template int contrastive_forward<double>(const ContrastiveProblem<double>&, double*, double*, double*, void*, void*);
template int contrastive_backward<float>(const ContrastiveProblem<float>&, const float*, const float*, const float*,
                                         float*, float*, float*, void*, void*);
template int contrastive_backward<double>(const ContrastiveProblem<double>&, const double*, const double*,
                                          const double*, double*, double*, double*, void*, void*);

}  // namespace brcd::cuda
