// ISA-generic scan loops. Included by each hamming_<isa>.cpp after it defines `struct Isa` with
//   template <int WC> struct Query;  // a query prepared for the scan (its words in registers where WC > 0):
//                                    // default-constructible, and constructed from (const uint64_t* row,
//                                    // int64_t words)
//   struct Dist;                     // the distances of one block's 8 codes to a query, in registers
//   template <int WC> static Dist dist(const uint64_t* block, const Query<WC>& q, int64_t words);
//   static unsigned lanes_below(const Dist& d, int64_t threshold);  // bit l: lane l's distance < threshold
//   static void store(const Dist& d, int32_t* dist8);
// and optionally an append of a block's chosen lanes as distances and indices, without a branch (else a loop
// over the lanes does it):
//   static int append(const Dist& d, unsigned lanes, int64_t first_index, int32_t* dist, int64_t* idx);
// and optionally a transpose of whole blocks of contiguous rows of W = 2 or 4 words into the blocked layout:
//   template <int W> static void relayout_rows(const uint8_t* rows, int64_t blocks, uint64_t* out);
// and a branch-free append of the lanes below a threshold (valid: the lanes that are codes), for one
// block (collect) or two consecutive blocks (collect2), and as keys of Candidates (collect2_keys, WC > 0):
//   template <int WC> static int collect(const uint64_t* block, const Query<WC>& q, int64_t words, int64_t threshold,
//                                        unsigned valid, int32_t first_index, int32_t* dist, int32_t* idx);
//   template <int WC> static int collect2_keys(const uint64_t* block, const Query<WC>& q, int64_t threshold,
//                                              unsigned valid, int32_t first_index, int32_t* keys);
// WC is the word count when known at compile time (1..4), else 0.
#pragma once
#include <algorithm>
#include <type_traits>

#include "cpu/hamming_layout.h"

namespace brcd::cpu::detail {

// A query prepared for a vector scan, for ISAs whose Query holds broadcast words (Words::Vec, filled by
// Words::broadcast(uint64_t)): with a known word count (WC > 0) each word is broadcast once into a register,
// otherwise from the row at each use.
template <class Words, int WC>
struct BroadcastQuery {
  using Vec = typename Words::Vec;
  Vec word[WC > 0 ? WC : 1];
  const uint64_t* row = nullptr;
  BroadcastQuery() = default;
  BroadcastQuery(const uint64_t* r, int64_t) : row(r) {
    if constexpr (WC > 0)
      for (int w = 0; w < WC; ++w) word[w] = Words::broadcast(r[w]);
  }
  Vec at(int64_t w) const {
    if constexpr (WC > 0) return word[w];
    else return Words::broadcast(row[w]);
  }
};

// The lanes of a block closer than threshold; their distances (all 8 lanes) in dist8 where there is any.
template <class Isa, int WC>
inline unsigned below(const uint64_t* block, const typename Isa::template Query<WC>& q, int64_t words,
                      int64_t threshold, int32_t* dist8) {
  const auto d = Isa::template dist<WC>(block, q, words);
  const unsigned m = Isa::lanes_below(d, threshold);
  if (m) Isa::store(d, dist8);
  return m;
}

// Queries compared with each database block while their words stay in registers: as many as leave registers for
// the block and the arithmetic (the word loads and broadcasts then cost nothing per block).
template <int WC>
constexpr int held_queries() {
  return WC == 1 ? 8 : WC == 2 ? 6 : WC == 3 ? 5 : WC == 4 ? 4 : 1;
}

// group(std::integral_constant<int, QB>{}, qi, c0, c1) for every chunk [c0, c1) of blocks [b_begin, b_end) and, within
// it, every group of held queries from qi (QB of them, the last ones one by one), chunk by chunk.
template <int WC, class Group>
void for_each_chunk_and_group(const BlockedCodes& db, int64_t q_begin, int64_t q_end, int64_t b_begin, int64_t b_end,
                              Group&& group) {
  constexpr int QB = held_queries<WC>();
  const int64_t chunk = chunk_blocks(db.words);
  for (int64_t c0 = b_begin; c0 < b_end; c0 += chunk) {
    const int64_t c1 = std::min(b_end, c0 + chunk);
    int64_t qi = q_begin;
    for (; qi + QB <= q_end; qi += QB) group(std::integral_constant<int, QB>{}, qi, c0, c1);
    for (; qi < q_end; ++qi) group(std::integral_constant<int, 1>{}, qi, c0, c1);
  }
}

// The blocks of a chunk where any held query has a hit, marked by the scan without a branch: a mispredicted branch
// in the scan loop would throw away the many blocks already in flight, which costs more than a hit's bookkeeping.
struct HitBlocks {
  static constexpr int kMaxMarked = 64;  // a scan stops to tighten its limits after this many
  int count = 0;
  int32_t block[kMaxMarked];   // the marked blocks, relative to the first block scanned
  uint64_t lanes[kMaxMarked];  // their hit lanes: held query j's in byte j
};

// The codes with a hit for one held query, gathered from the marked blocks and pushed into its threshold state.
struct HitLog {
  static constexpr int kCapacity = 256;
  int count = 0;
  // Room for one whole block past the capacity: an append may write all 8 lanes.
  alignas(64) int32_t dist[kCapacity + kLanes];
  alignas(64) int64_t idx[kCapacity + kLanes];
};

// Appends the lanes of `lanes` (distances d, indices first_index + lane) at dist and idx, writing up to 8 entries;
// returns how many it appended. Branch-free where the ISA has an append (a compress), else a loop over the lanes.
template <class Isa>
inline int append_hits(const typename Isa::Dist& d, unsigned lanes, int64_t first_index, int32_t* dist,
                       int64_t* idx) {
  if constexpr (requires { Isa::append(d, lanes, first_index, dist, idx); }) {
    return Isa::append(d, lanes, first_index, dist, idx);
  } else {
    alignas(64) int32_t dist8[kLanes];
    Isa::store(d, dist8);
    int n = 0;
    for (; lanes; lanes &= lanes - 1, ++n) {
      const int lane = __builtin_ctz(lanes);
      dist[n] = dist8[lane];
      idx[n] = first_index + lane;
    }
    return n;
  }
}

// Marks the blocks from b0 on, up to b1 (a chunk), where a query of the group of QB from
// qi0 has a code below its limit; stops after kMaxMarked marked blocks (a loose limit, as at the start of a scan,
// would otherwise mark every block before the limits can tighten). Returns the block after the last one scanned.
// A leaf loop: the queries' words stay in registers (a call in the loop would make the compiler spill them), kept
// out of line so that the gathering after it cannot crowd its registers either.
template <class Isa, int WC, int QB>
[[gnu::noinline]] int64_t mark_hit_blocks(const BlockedCodes& db, const QueryWords& q, int64_t qi0, int64_t b0,
                                          int64_t b1, const int64_t* limit, HitBlocks& hits) {
  static_assert(QB <= 8, "a block's hit lanes hold 8 queries");
  using Query = typename Isa::template Query<WC>;
  const int64_t words = WC > 0 ? WC : db.words;
  Query held[QB];
  int64_t below[QB];  // a local copy: the stores to hits cannot alias it, so its broadcasts leave the loop
  for (int j = 0; j < QB; ++j) {
    held[j] = Query(q.row(qi0 + j), words);
    below[j] = limit[j];
  }
  const uint64_t* block = db.block(b0);
  const int32_t n = static_cast<int32_t>(b1 - b0);
  int count = 0;
  int32_t b = 0;
  for (; b < n && count < HitBlocks::kMaxMarked; ++b, block += words * kLanes) {
    uint64_t lanes = 0;
#pragma GCC unroll 8
    for (int j = 0; j < QB; ++j)
      lanes |= uint64_t{Isa::lanes_below(Isa::template dist<WC>(block, held[j], words), below[j])} << (8 * j);
    hits.block[count] = b;  // written always, kept only where a lane hit
    hits.lanes[count] = lanes;
    count += lanes != 0;
  }
  hits.count = count;
  return b0 + b;
}

template <class Isa, int WC, int QB>
void topk_group(const BlockedCodes& db, const QueryWords& q, int64_t qi0, int64_t b0, int64_t b1, TopkState* st) {
  using Query = typename Isa::template Query<WC>;
  const int64_t words = WC > 0 ? WC : db.words;
  Query held[QB];
  for (int j = 0; j < QB; ++j) held[j] = Query(q.row(qi0 + j), words);
  int64_t limit[QB];
  HitBlocks hits;
  HitLog log[QB];
  const auto flush = [&] {
    for (int j = 0; j < QB; ++j) {
      st[j].push_batch(log[j].dist, log[j].idx, log[j].count, db.rows);
      log[j].count = 0;
    }
  };
  for (int64_t from = b0; from < b1;) {
    for (int j = 0; j < QB; ++j) limit[j] = st[j].threshold();
    const int64_t scanned_to = mark_hit_blocks<Isa, WC, QB>(db, q, qi0, from, b1, limit, hits);
    // The marked blocks' distances again, for the queries with a hit there (usually one).
    for (int h = 0; h < hits.count; ++h) {
      const int64_t b = from + hits.block[h];
      const uint64_t* block = db.block(b);
      bool full = false;
      for (uint64_t all = hits.lanes[h]; all;) {
        const int j = __builtin_ctzll(all) / 8;
        const unsigned lanes = static_cast<unsigned>(all >> (8 * j)) & 0xffu;
        all &= ~(uint64_t{0xff} << (8 * j));
        HitLog& l = log[j];
        l.count += append_hits<Isa>(Isa::template dist<WC>(block, held[j], words), lanes, b * kLanes,
                                    l.dist + l.count, l.idx + l.count);
        full |= l.count > HitLog::kCapacity - kLanes;
      }
      if (full) flush();
    }
    flush();
    from = scanned_to;
  }
}

// Block-major in chunks: each chunk of the database is compared with every query of [q_begin, q_end), a group of
// held queries at a time, while it is in L2. Each query still sees the database in ascending index order, which
// the threshold state needs for its ties.
template <class Isa, int WC>
void topk_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
               int64_t b_end, TopkState* states) {
  for_each_chunk_and_group<WC>(db, q_begin, q_end, b_begin, b_end, [&](auto held, int64_t qi, int64_t c0, int64_t c1) {
    topk_group<Isa, WC, decltype(held)::value>(db, q, qi, c0, c1, states + (qi - q_begin));
  });
}

template <class Isa, int WC>
void distance_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
                   int64_t b_end, int32_t* out, int64_t out_stride) {
  using Query = typename Isa::template Query<WC>;
  alignas(64) int32_t dist8[kLanes];
  const int64_t words = db.words;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint64_t* block = db.block(b);
    const int64_t live = std::min<int64_t>(kLanes, db.rows - b * kLanes);  // codes of this block
    const int64_t col = (b - b_begin) * kLanes;
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      const Query query(q.row(qi), words);
      int32_t* row = out + (qi - q_begin) * out_stride + col;
      if (live == kLanes) {
        Isa::store(Isa::template dist<WC>(block, query, words), row);
      } else {
        Isa::store(Isa::template dist<WC>(block, query, words), dist8);
        for (int64_t l = 0; l < live; ++l) row[l] = dist8[l];
      }
    }
  }
}

template <class Isa, int WC, int QB>
void collect_group(const BlockedCodes& db, const QueryWords& q, int64_t qi0, int64_t b0, int64_t b1,
                   Candidates* cands) {
  using Query = typename Isa::template Query<WC>;
  const int64_t words = WC > 0 ? WC : db.words;
  Query held[QB];
  for (int j = 0; j < QB; ++j) held[j] = Query(q.row(qi0 + j), words);
  alignas(64) int32_t dist8[kLanes];
  // Room for every code of the chunk plus the lanes an append may write past it: no growth (a call) in the loop.
  for (int j = 0; j < QB; ++j) cands[j].reserve(cands[j].size + (b1 - b0 + 2) * kLanes);
  // Every block's append, as (distance, index) pairs or as keys (Keyed), pairs of blocks first where the ISA has it.
  const auto scan = [&](auto keyed) {
    constexpr bool Keyed = decltype(keyed)::value;
    for (int j = 0; j < QB; ++j) cands[j].keyed = Keyed;
    int64_t b = b0;
    if constexpr (requires { Isa::template collect2<WC>(nullptr, held[0], words, 0, 0u, 0, dist8, dist8); }) {
      for (; b + 2 <= b1; b += 2) {  // pairs of blocks; a last odd one below
        const uint64_t* block = db.block(b);
        const int32_t base = static_cast<int32_t>(b * kLanes);
        const unsigned valid = (1u << std::min<int64_t>(2 * kLanes, db.rows - base)) - 1;
#pragma GCC unroll 8
        for (int j = 0; j < QB; ++j) {
          Candidates& c = cands[j];
          if constexpr (Keyed)
            c.size += Isa::template collect2_keys<WC>(block, held[j], c.limit, valid, base, c.idx.get() + c.size);
          else
            c.size += Isa::template collect2<WC>(block, held[j], words, c.limit, valid, base, c.dist.get() + c.size,
                                                 c.idx.get() + c.size);
        }
      }
    }
    for (; b < b1; ++b) {
      const uint64_t* block = db.block(b);
      const int64_t base = b * kLanes;
      const unsigned valid = (1u << std::min<int64_t>(kLanes, db.rows - base)) - 1;
      for (int j = 0; j < QB; ++j) {
        Candidates& c = cands[j];
        constexpr bool has_collect =
            requires { Isa::template collect<WC>(block, held[0], words, 0, 0u, 0, dist8, dist8); };
        if constexpr (!Keyed && has_collect) {
          c.size += Isa::template collect<WC>(block, held[j], words, c.limit, valid, static_cast<int32_t>(base),
                                              c.dist.get() + c.size, c.idx.get() + c.size);
        } else {
          for (unsigned m = below<Isa, WC>(block, held[j], words, c.limit, dist8) & valid; m; m &= m - 1) {
            const int lane = __builtin_ctz(m);
            if constexpr (Keyed) {
              c.idx[c.size] = static_cast<int32_t>((base + lane) << Candidates::kKeyDistBits | dist8[lane]);
            } else {
              c.dist[c.size] = dist8[lane];
              c.idx[c.size] = static_cast<int32_t>(base + lane);
            }
            ++c.size;
          }
        }
      }
    }
  };
  if constexpr (requires { Isa::template collect2_keys<WC>(nullptr, held[0], 0, 0u, 0, dist8); }) {
    if (Candidates::keys_fit(words, db.rows)) return scan(std::true_type{});
  }
  scan(std::false_type{});
}

// As topk_scan, for the branch-free candidate lists.
template <class Isa, int WC>
void collect_scan(const BlockedCodes& db, const QueryWords& q, int64_t q_begin, int64_t q_end, int64_t b_begin,
                  int64_t b_end, Candidates* cands) {
  for_each_chunk_and_group<WC>(db, q_begin, q_end, b_begin, b_end, [&](auto held, int64_t qi, int64_t c0, int64_t c1) {
    collect_group<Isa, WC, decltype(held)::value>(db, q, qi, c0, c1, cands + (qi - q_begin));
  });
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
                  int32_t* out, int64_t stride) {
    with_word_count(db.words,
                    [&](auto wc) { distance_scan<Isa, decltype(wc)::value>(db, q, qb, qe, bb, be, out, stride); });
  };
  k.collect = [](const BlockedCodes& db, const QueryWords& q, int64_t qb, int64_t qe, int64_t bb, int64_t be,
                 Candidates* c) {
    with_word_count(db.words, [&](auto wc) { collect_scan<Isa, decltype(wc)::value>(db, q, qb, qe, bb, be, c); });
  };
  if constexpr (requires { Isa::template relayout_rows<2>(nullptr, 0, nullptr); }) {
    k.relayout = [](const uint8_t* rows, int64_t blocks, int64_t words, uint64_t* out) {
      switch (words) {
        case 2: Isa::template relayout_rows<2>(rows, blocks, out); return true;
        case 4: Isa::template relayout_rows<4>(rows, blocks, out); return true;
        default: return false;
      }
    };
  }
  return k;
}

}  // namespace brcd::cpu::detail
