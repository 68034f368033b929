// ISA-generic scan loops. Included by each hamming_<isa>.cpp after it defines `struct Isa` with
//   template <int WC> static unsigned below(const uint64_t* block, const uint64_t* q, int64_t words,
//                                           int64_t threshold, int32_t* dist8);   // lanes with distance < threshold
//   template <int WC> static void all(const uint64_t* block, const uint64_t* q, int64_t words, int32_t* dist8);
// and optionally a branch-free append of the lanes below a threshold (valid: the lanes that are codes):
//   template <int WC> static int collect(const uint64_t* block, const uint64_t* q, int64_t words, int64_t threshold,
//                                        unsigned valid, int32_t first_index, int32_t* dist, int32_t* idx);
// WC is the word count when known at compile time (1..4), else 0.
#pragma once
#include <algorithm>
#include <type_traits>

#include "cpu/hamming_layout.h"

namespace brcd::cpu::detail {

// Block-major: each block of 8 database codes is compared with every query of the block of queries while it is
// still in L1, so the database streams from L2 once per block of queries, not once per query.
template <class Isa, int WC>
void topk_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
               int64_t b_end, TopkState* states) {
  alignas(64) int32_t dist8[kLanes];
  const int64_t words = db.words;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint64_t* block = db.block(b);
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      TopkState& st = states[qi - q_begin];
      unsigned m = Isa::template below<WC>(block, q.row(qi), words, st.threshold(), dist8);
      while (m) {
        const int lane = __builtin_ctz(m);
        m &= m - 1;
        const int64_t idx = b * kLanes + lane;
        if (idx >= db.rows) break;
        if (dist8[lane] < st.threshold()) st.push(dist8[lane], idx);
      }
    }
  }
}

template <class Isa, int WC>
void distance_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
                   int64_t b_end, int32_t* out) {
  alignas(64) int32_t dist8[kLanes];
  const int64_t words = db.words;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint64_t* block = db.block(b);
    const int64_t base = b * kLanes;
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      int32_t* row = out + (qi - q_begin) * db.rows;
      if (base + kLanes <= db.rows) {
        Isa::template all<WC>(block, q.row(qi), words, row + base);
      } else {
        Isa::template all<WC>(block, q.row(qi), words, dist8);
        for (int64_t l = 0; base + l < db.rows; ++l) row[base + l] = dist8[l];
      }
    }
  }
}

template <class Isa, int WC>
void collect_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
                  int64_t b_end, Candidates* cands) {
  alignas(64) int32_t dist8[kLanes];
  const int64_t words = db.words;
  if constexpr (requires { Isa::template collect2<WC>(nullptr, nullptr, words, 0, 0u, 0, dist8, dist8); }) {
    for (; b_begin + 2 <= b_end; b_begin += 2) {  // pairs of blocks; a last odd one below
      const uint64_t* block = db.block(b_begin);
      const int64_t base = b_begin * kLanes;
      const int64_t lanes = std::min<int64_t>(2 * kLanes, db.rows - base);
      const unsigned valid = (1u << lanes) - 1;
      for (int64_t qi = q_begin; qi < q_end; ++qi) {
        Candidates& c = cands[qi - q_begin];
        c.make_room();
        c.size += Isa::template collect2<WC>(block, q.row(qi), words, c.limit, valid, static_cast<int32_t>(base),
                                             c.dist.data() + c.size, c.idx.data() + c.size);
      }
    }
  }
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint64_t* block = db.block(b);
    const int64_t base = b * kLanes;
    const int64_t lanes = std::min<int64_t>(kLanes, db.rows - base);
    const unsigned valid = (1u << lanes) - 1;
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      Candidates& c = cands[qi - q_begin];
      c.make_room();
      if constexpr (requires { Isa::template collect<WC>(block, q.row(qi), words, 0, 0u, 0, dist8, dist8); }) {
        c.size += Isa::template collect<WC>(block, q.row(qi), words, c.limit, valid, static_cast<int32_t>(base),
                                            c.dist.data() + c.size, c.idx.data() + c.size);
      } else {
        unsigned m = Isa::template below<WC>(block, q.row(qi), words, c.limit, dist8) & valid;
        while (m) {
          const int lane = __builtin_ctz(m);
          m &= m - 1;
          c.dist[c.size] = dist8[lane];
          c.idx[c.size] = static_cast<int32_t>(base + lane);
          ++c.size;
        }
      }
    }
  }
}

// Calls f(std::integral_constant<int, WC>{}) with WC the word count where it is 1..4 (compiled for it), else 0.
template <class F>
void with_word_count(int64_t words, F&& f) {
  switch (words) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

template <class Isa>
ScanKernels make_kernels() {
  ScanKernels k;
  k.topk = [](const BlockedCodes& db, const QueryWords& q, int64_t qb, int64_t qe, int64_t bb, int64_t be,
              TopkState* st) {
    with_word_count(db.words, [&](auto wc) { topk_scan<Isa, decltype(wc)::value>(db, q, qb, qe, bb, be, st); });
  };
  k.distance = [](const BlockedCodes& db, const QueryWords& q, int64_t qb, int64_t qe, int64_t bb, int64_t be,
                  int32_t* out) {
    with_word_count(db.words,
                    [&](auto wc) { distance_scan<Isa, decltype(wc)::value>(db, q, qb, qe, bb, be, out); });
  };
  k.collect = [](const BlockedCodes& db, const QueryWords& q, int64_t qb, int64_t qe, int64_t bb, int64_t be,
                 Candidates* c) {
    with_word_count(db.words, [&](auto wc) { collect_scan<Isa, decltype(wc)::value>(db, q, qb, qe, bb, be, c); });
  };
  return k;
}

}  // namespace brcd::cpu::detail
