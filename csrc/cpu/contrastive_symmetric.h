// The fixed-shift path of the CPU loss (every temperature where exp(-2/tau) is a normal number), which uses the
// symmetry of the similarity matrix: s_ab = s_ba.
//
// The 2B rows are cut into blocks (of up to kBlock rows). Each pair of blocks (I, J), I < J, is computed once and
// serves both sides: the rows of I take its row sums, the rows of J its column sums. Under the fixed shift 1/tau an
// entry's exp(s_ab - 1/tau) is the same in row a and in row b; only the group masks differ. The backward's
// coefficient c_ab = w_ab + w_ba is symmetric too, so one tile of it feeds dZ_I += C Z_J and dZ_J += C^T Z_I. Per
// entry of the full matrix, forward and backward together then take two products instead of three, and one
// exponential instead of three.
//
// Pairs run in the rounds of a round-robin tournament (the circle method): no two pairs of a round share a block,
// so each thread owns the rows it writes and nothing needs a lock or a per-thread copy.
// Included by contrastive_impl.h inside its ISA namespace's translation unit.
#pragma once

namespace brcd::cpu::BRCD_ISA {

constexpr int kBlock = 128;                   // rows of a block (the largest; small batches use smaller ones)
constexpr int kSimVecs = 2;                   // column vectors of the similarity micro-kernel (with kRows rows)
constexpr int kAccVecs = 4;                   // bit vectors of the accumulation micro-kernel
constexpr int kAccRows = kRows >= 8 ? 4 : 2;  // its rows (accumulators: kAccRows x kAccVecs vectors)

template <class T>
struct SymPrepared {
  int64_t batch = 0, bits = 0, kp = 0, n2 = 0, block = 0, blocks = 0, rows_pad = 0;
  T inv_tau = 0;
  PooledBuffer<T, 0> zn;      // [rows_pad, kp]: normalised rows, zero in padding rows and bits
  PooledBuffer<T, 1> panels;  // [blocks][K][block]: each block's rows transposed, the columns of a similarity tile
  std::vector<T> norm;
  std::vector<Individual<T>> ind;  // [B]
  // The pair (a, b) is dropped when col_group[b] == row_key[a]: row_key is the row group (renumbered where ids
  // exceed int32), or -2 (never equal to a column group, which is >= -1) where the row has none.
  std::vector<int32_t> row_key, col_group;  // [rows_pad]
};

// Rows of block X that hold data, and the extent the kernels cover: that count rounded up to whole micro-tiles
// (a multiple of every micro-kernel's rows and columns), so a small batch does not pay for a whole block.
template <class T>
int64_t block_live(const SymPrepared<T>& q, int64_t X) {
  return std::min<int64_t>(q.block, q.n2 - X * q.block);
}
template <class T>
int block_span(const SymPrepared<T>& q, int64_t X) {
  constexpr int W = kSimVecs * kVec<T>;
  static_assert(kBlock % (4 * W) == 0 && W % kRows == 0 && W % kAccRows == 0, "micro-tiles must nest");
  return static_cast<int>((block_live(q, X) + W - 1) / W * W);
}

template <class T>
SymPrepared<T> prepare_symmetric(const ContrastiveProblem<T>& p) {
  constexpr int V = kVec<T>;
  SymPrepared<T> q;
  const int64_t B = p.batch, K = p.bits;
  q.batch = B;
  q.bits = K;
  q.kp = (K + V - 1) / V * V;
  q.n2 = 2 * B;
  // Blocks of kBlock / 4, / 2 or kBlock rows: a diagonal block gains nothing from the symmetry, so a small batch
  // cuts its rows into several blocks.
  q.block = q.n2 <= 2 * kBlock ? kBlock / 4 : (q.n2 <= 8 * kBlock ? kBlock / 2 : kBlock);
  q.blocks = (q.n2 + q.block - 1) / q.block;
  q.rows_pad = q.blocks * q.block;
  q.inv_tau = T(1) / p.temperature;
  q.zn.reserve(static_cast<size_t>(q.rows_pad * q.kp));
  q.norm.assign(static_cast<size_t>(q.n2), T(0));
  q.ind.assign(static_cast<size_t>(B), Individual<T>{});
  normalise_rows(p, q.zn.data(), q.kp, q.norm.data(), q.ind.data());
  // Zeros where normalise_rows writes nothing: the bits past K and the padding rows.
  if (q.kp > K)
    for (int64_t a = 0; a < q.n2; ++a) std::fill(q.zn.data() + a * q.kp + K, q.zn.data() + (a + 1) * q.kp, T(0));
  std::fill(q.zn.data() + q.n2 * q.kp, q.zn.data() + q.rows_pad * q.kp, T(0));
  const int64_t bs = q.block;
  q.panels.reserve(static_cast<size_t>(q.blocks * K * bs));  // every entry written below
  in_team(B * K >= kRowWorkForThreads, [&] {
#pragma omp for schedule(static)
  for (int64_t blk = 0; blk < q.blocks; ++blk) {
    T* panel = q.panels.data() + blk * K * bs;
    const T* z = q.zn.data() + blk * bs * q.kp;
    for (int64_t j0 = 0; j0 < bs; j0 += V) {  // the block size is a multiple of V
      int64_t d0 = 0;
      for (; d0 + V <= K; d0 += V) transpose_tile(z + j0 * q.kp + d0, q.kp, panel + d0 * bs + j0, bs);
      for (int64_t j = j0; j < j0 + V; ++j)  // the bits past the last whole vector
        for (int64_t d = d0; d < K; ++d) panel[d * bs + j] = z[j * q.kp + d];
    }
  }
  });
  q.row_key.assign(static_cast<size_t>(q.rows_pad), -2);
  q.col_group.assign(static_cast<size_t>(q.rows_pad), -1);
  if (p.row_groups != nullptr && p.col_groups != nullptr) {
    // Ids as they are where they fit in int32 (cluster ids do), else renumbered densely; every negative id is "none".
    const auto fits = [&](const int64_t* g) {
      return std::all_of(g, g + q.n2, [](int64_t v) { return v <= std::numeric_limits<int32_t>::max(); });
    };
    if (fits(p.row_groups) && fits(p.col_groups)) {
      for (int64_t a = 0; a < q.n2; ++a) {
        q.row_key[a] = p.row_groups[a] >= 0 ? static_cast<int32_t>(p.row_groups[a]) : -2;
        q.col_group[a] = p.col_groups[a] >= 0 ? static_cast<int32_t>(p.col_groups[a]) : -1;
      }
    } else {
      std::vector<int32_t> gr(static_cast<size_t>(q.n2)), gc(static_cast<size_t>(q.n2));
      renumber_groups(p.row_groups, p.col_groups, q.n2, gr, gc);
      for (int64_t a = 0; a < q.n2; ++a) {
        q.row_key[a] = gr[a] >= 0 ? gr[a] : -2;
        q.col_group[a] = gc[a];
      }
    }
  }
  return q;
}

// s[i * block + j] = <Zn_a, Zn_b> / tau for the rows a of block I and the rows b of block J (through J's panel),
// over the blocks' spans.
template <class T>
void similarity_block(const SymPrepared<T>& q, int64_t I, int64_t J, T* s) {
  constexpr int R = kRows, W = kSimVecs * kVec<T>;
  const int64_t K = q.bits, kp = q.kp, bs = q.block;
  const T* zi = q.zn.data() + I * bs * kp;
  const T* panel = q.panels.data() + J * K * bs;
  const int rows = block_span(q, I), cols = block_span(q, J);
  for (int r0 = 0; r0 < rows; r0 += R) {
    for (int j0 = 0; j0 < cols; j0 += W) {
      T acc[R][W];
      micro_product<T, R, W>(zi + r0 * kp, kp, 1, panel + j0, bs, K, acc);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma omp simd
        for (int v = 0; v < W; ++v) s[(r0 + r) * bs + j0 + v] = acc[r][v] * q.inv_tau;
    }
  }
}

// Sets to -inf the entries that are no negative of either side: a row with itself (diagonal blocks), a row with its
// positive partner (a symmetric relation: p(p(a)) = a), and the padding rows and columns of the spans. Their
// exponentials are then exactly 0 and every later loop may run over whole spans.
template <class T>
void exclude_non_negatives(const SymPrepared<T>& q, int64_t I, int64_t J, T* s) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t bs = q.block, a0 = I * bs, b0 = J * bs;
  const int64_t live_i = block_live(q, I), live_j = block_live(q, J);
  const int rows = block_span(q, I), cols = block_span(q, J);
  for (int64_t i = 0; i < live_i; ++i) {
    const int64_t a = a0 + i, partner = partner_of(a, q.batch);
    if (I == J) s[i * bs + i] = ninf;
    if (partner >= b0 && partner < b0 + live_j) s[i * bs + (partner - b0)] = ninf;
    std::fill(s + i * bs + live_j, s + i * bs + cols, ninf);
  }
  for (int64_t i = live_i; i < rows; ++i) std::fill(s + i * bs, s + i * bs + cols, ninf);
}

// The tile of block pair (I, J) as both directions read it: logits s_ab / tau, -inf where (a, b) is no negative.
template <class T>
void logit_tile(const SymPrepared<T>& q, int64_t I, int64_t J, T* s) {
  similarity_block(q, I, J, s);
  exclude_non_negatives(q, I, J, s);
}

// out[r][d] += sum_t coef[r * rs + t * ts] * z[t][d] for rows r < rows (a multiple of kAccRows) and terms t < terms,
// over the bit vectors [d0, d0 + NV * V); z and out have row stride kp. rs = block, ts = 1 reads C; rs = 1,
// ts = block reads C^T.
template <class T, int NV>
void accumulate_chunk(const T* coef, int64_t rs, int64_t ts, int rows, int terms, const T* z, int64_t kp, int64_t d0,
                      T* out) {
  constexpr int R = kAccRows, W = NV * kVec<T>;
  for (int r0 = 0; r0 < rows; r0 += R) {
    T acc[R][W];
    micro_product<T, R, W>(coef + r0 * rs, rs, ts, z + d0, kp, terms, acc);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int v = 0; v < W; ++v) out[(r0 + r) * kp + d0 + v] += acc[r][v];
  }
}

template <class T>
void accumulate_block(const T* coef, int64_t rs, int64_t ts, int rows, int terms, const T* z, int64_t kp, T* out) {
  constexpr int V = kVec<T>;
  for (int64_t d0 = 0; d0 < kp; d0 += kAccVecs * V) {
    switch (std::min<int64_t>(kAccVecs, (kp - d0) / V)) {
      case 4: accumulate_chunk<T, 4>(coef, rs, ts, rows, terms, z, kp, d0, out); break;
      case 3: accumulate_chunk<T, 3>(coef, rs, ts, rows, terms, z, kp, d0, out); break;
      case 2: accumulate_chunk<T, 2>(coef, rs, ts, rows, terms, z, kp, d0, out); break;
      default: accumulate_chunk<T, 1>(coef, rs, ts, rows, terms, z, kp, d0, out); break;
    }
  }
}

// Runs fn(I, J) over every pair of blocks I <= J: the diagonal first, then the tournament's rounds, each round's
// pairs disjoint. Called inside a parallel region (or on one thread); every loop ends in a barrier.
template <class Fn>
void for_each_block_pair(int64_t blocks, Fn&& fn) {
  // Diagonal blocks dealt round-robin: in distillation's backward only the student's (the first half) have work,
  // and contiguous chunks would give them all to the first thread.
#pragma omp for schedule(static, 1)
  for (int64_t I = 0; I < blocks; ++I) fn(I, I);
  const int64_t m = blocks + (blocks & 1);  // an odd count gets a dummy block: its pairs are skipped
  for (int64_t round = 0; round + 1 < m; ++round) {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < m / 2; ++k) {
      const int64_t x = k == 0 ? m - 1 : (round + k) % (m - 1);
      const int64_t y = (round - k + (m - 1)) % (m - 1);
      if (x < blocks && y < blocks) fn(std::min(x, y), std::max(x, y));
    }
  }
}

// A team from about B = 181 at K = 64. On an idle machine two threads are faster from B = 64 (9 % at B = 64, 24 % at
// B = 128: whole step, 2 cores), but a step of a tenth of a millisecond with a barrier per round is at the mercy of
// the other core: with a busy process there (a data loader's worker, say) the B = 64 step took 0.24 ms, and with two
// 46 ms (a descheduled thread holds every barrier), where one thread kept its 0.14 ms. Measured on 2 cores.
template <class T>
bool worth_threads(const SymPrepared<T>& q) {
  return q.n2 * q.n2 * q.bits >= (int64_t(1) << 23);
}

template <class T>
T forward_symmetric(const ContrastiveProblem<T>& p, T* lse, T* pos) {
  const SymPrepared<T> q = prepare_symmetric(p);
  const T shift = q.inv_tau;
  std::vector<double> neg_sum(static_cast<size_t>(q.rows_pad), 0.0);  // sum over negatives of exp(s - shift)
  in_team(worth_threads(q), [&] {
    AlignedVector<T> s(static_cast<size_t>(q.block * q.block)), col_sums(static_cast<size_t>(q.block));
    // shift by value: a captured reference would be reloaded in every iteration, since the stores might alias it.
    for_each_block_pair(q.blocks, [&, shift](int64_t I, int64_t J) {
      logit_tile(q, I, J, s.data());
      const int64_t bs = q.block, a0 = I * bs, b0 = J * bs;
      const int32_t* key_b = q.row_key.data() + b0;
      const int32_t* group_b = q.col_group.data() + b0;
      T* col_sum = col_sums.data();
      const int64_t live_i = block_live(q, I), live_j = block_live(q, J);
      const int cols = block_span(q, J);
      std::fill(col_sum, col_sum + cols, T(0));
      for (int64_t i = 0; i < live_i; ++i) {
        const int64_t a = a0 + i;
        const int32_t key_a = q.row_key[a], group_a = q.col_group[a];
        const T* srow = s.data() + i * bs;
        // Vector partial sums and a tree: `omp simd reduction` here summed its partials serially (16 dependent
        // adds per row, most of this loop's time at B = 64).
        constexpr int V = kVec<T>;
        T row[V] = {};
        // (Pointers advanced per vector: with the extension's -fwrapv, an int index j0 + v would not vectorise.)
        if (I == J) {
          for (int64_t j0 = 0; j0 < cols; j0 += V) {  // spans are whole vectors
            alignas(64) T e[V];
            exp_shifted_line(srow + j0, shift, e);  // every entry: the groups select afterwards
            const int32_t* gv = group_b + j0;
#pragma omp simd
            for (int v = 0; v < V; ++v) row[v] += gv[v] == key_a ? T(0) : e[v];
          }
        } else {
          for (int64_t j0 = 0; j0 < cols; j0 += V) {
            alignas(64) T e[V];
            exp_shifted_line(srow + j0, shift, e);
            const int32_t* gv = group_b + j0;
            const int32_t* kv = key_b + j0;
            T* cv = col_sum + j0;
#pragma omp simd
            for (int v = 0; v < V; ++v) {
              row[v] += gv[v] == key_a ? T(0) : e[v];
              cv[v] += kv[v] == group_a ? T(0) : e[v];  // entry (b, a) of row b
            }
          }
        }
        neg_sum[a] += static_cast<double>(horizontal_sum(row));
      }
      if (I != J)
        for (int64_t j = 0; j < live_j; ++j) neg_sum[b0 + j] += static_cast<double>(col_sum[j]);
    });
  });
  double total = 0;
  in_team(q.batch * q.bits >= kRowWorkForThreads, [&] {
#pragma omp for schedule(static) reduction(+ : total)
    for (int64_t a = 0; a < q.n2; ++a) {
      const T pa = positive_logit(p, q.zn.data(), q.kp, q.ind.data(), q.inv_tau, a);
      const T la = row_loss(pa, shift, neg_sum[a]);
      lse[a] = pa + la;
      pos[a] = pa;
      total += static_cast<double>(la);
    }
  });
  return static_cast<T>(total / static_cast<double>(q.n2));
}

template <class T>
void backward_symmetric(const ContrastiveProblem<T>& p, T grad_loss, const T* lse, const T* pos, T* g_student,
                        T* g_anchor, T* g_view) {
  const SymPrepared<T> q = prepare_symmetric(p);
  const T shift = q.inv_tau;
  const std::vector<T> pos_coef = positive_coefficients(lse, pos, q.n2);
  // exp(s_ab - lse_a) = exp(s_ab - shift) * exp(shift - lse_a): one exponential per entry serves both rows. The
  // second factor is at most exp(2 / tau) (lse_a >= P_a >= -1/tau), which the fixed shift's range keeps finite.
  std::vector<T> rescale(static_cast<size_t>(q.rows_pad), T(0));
  for (int64_t a = 0; a < q.n2; ++a) rescale[a] = static_cast<T>(std::exp(shift - lse[a]));
  PooledBuffer<T, 2> gz;  // sum_b c_ab Zn_b
  gz.assign(static_cast<size_t>(q.rows_pad * q.kp), T(0));
  // The rows whose sums are needed: the student's (rows < B) for its gradient, the view's (rows >= B) for its own
  // (the anchor's comes from the individual term alone). In distillation only the student's are: pairs of two view
  // blocks are skipped whole, and a mixed pair feeds only its student side.
  const bool student_rows = g_student != nullptr, view_rows = g_view != nullptr;
  const auto needed = [&](int64_t X) {
    return (student_rows && X * q.block < q.batch) || (view_rows && (X + 1) * q.block > q.batch);
  };
  in_team(worth_threads(q), [&] {
    AlignedVector<T> s(static_cast<size_t>(q.block * q.block));
    // shift by value: a captured reference would be reloaded in every iteration, since the stores might alias it.
    for_each_block_pair(q.blocks, [&, shift](int64_t I, int64_t J) {
      const bool into_i = needed(I), into_j = I != J && needed(J);
      if (!into_i && !into_j) return;
      logit_tile(q, I, J, s.data());
      const int64_t bs = q.block, a0 = I * bs, b0 = J * bs;
      const int32_t* key_b = q.row_key.data() + b0;
      const int32_t* group_b = q.col_group.data() + b0;
      const T* rescale_b = rescale.data() + b0;
      const int rows = block_span(q, I), cols = block_span(q, J);
      // Padding rows and columns hold -inf (exponential 0) and a rescale of 0: their coefficients are 0.
      for (int i = 0; i < rows; ++i) {
        T* srow = s.data() + i * bs;
        const int32_t key_a = q.row_key[a0 + i], group_a = q.col_group[a0 + i];
        const T rescale_a = rescale[a0 + i];
        // c_ab: the softmax weight of b in row a plus that of a in row b, each where it is a negative.
        constexpr int V = kVec<T>;
        for (int j0 = 0; j0 < cols; j0 += V) {  // spans are whole vectors
          alignas(64) T e[V];
          exp_shifted_line(srow + j0, shift, e);
          const int32_t* gb = group_b + j0;  // pointers per vector: see forward_symmetric
          const int32_t* kb = key_b + j0;
          const T* rb = rescale_b + j0;
          T* out = srow + j0;
#pragma omp simd
          for (int v = 0; v < V; ++v) {
            const T w = (gb[v] == key_a ? T(0) : rescale_a) + (kb[v] == group_a ? T(0) : rb[v]);
            out[v] = e[v] * w;
          }
        }
      }
      if (into_i) accumulate_block(s.data(), bs, 1, rows, cols, q.zn.data() + b0 * q.kp, q.kp, gz.data() + a0 * q.kp);
      if (into_j) accumulate_block(s.data(), 1, bs, cols, rows, q.zn.data() + a0 * q.kp, q.kp, gz.data() + b0 * q.kp);
    });
  });
  finish_backward(p, q.zn.data(), q.kp, q.norm.data(), q.ind.data(), q.inv_tau, grad_loss, pos_coef.data(),
                  gz.data(), g_student, g_anchor, g_view);
}

}  // namespace brcd::cpu::BRCD_ISA
