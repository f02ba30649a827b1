// CPU select for select_smallest / global_smallest / global_smallest_counts (exact k, ties by
// index, NaN last). global_smallest_counts runs the same paths in counting mode: no outputs, only
// how many entries each layer loses (Seg::out is null, the counts go to `pruned`).
//
// Keys: the bits of |w| as an unsigned integer are monotone in |w| for IEEE floats, with +0.0 and
// -0.0 both mapping to 0 and every NaN above +inf. Clamping with min(bits, inf_bits + 1) gives all
// NaNs one canonical key, so NaNs rank after +inf and among themselves by position: the rule in
// egp_fast/ops/select.py. fp16/bf16 layers use their 16-bit patterns directly, fp32 32-bit keys,
// fp64 64-bit keys; a global call over mixed dtypes converts every value to the widest float
// present (exact for fp16/bf16 -> fp32 -> fp64), so layers rank as the reference's float64 keys.
//
// fp32, fp16 and bf16 problems of 2^15 entries or more (a global problem counts all its layers;
// with 32-bit keys only problems whose layers are all fp32) take the sampled one-pass path
// (solve_sampled below), and if its sample misleads, those of 2^18 or more the two-pass path
// (solve_two_pass for fp32; resolve16, one full histogram of the 16-bit keys, then the marking
// pass, for fp16/bf16); the rest, and fp64:
//
// Select: most-significant-digit radix select (digits of 11/11/10 bits for 32-bit keys), one
// histogram pass per digit over the unpruned entries whose higher digits match the prefix found
// so far. That yields the key T of the k-th smallest and how many entries equal to T must go
// (k_rem). A marking pass writes out = mask & (key > T) when every tie goes, else
// out = mask & (key >= T) and a fix-up pass over the few chunks that hold the first k_rem ties.
//
// Work is split in fixed chunks of kChunk elements so the tie fix-up knows, per chunk, how many
// ties come before it. Chunks of every layer run in one at::parallel_for (OpenMP) per pass; a
// layer's budget is a "problem" with its own histogram, so a call costs ~5 parallel regions
// whatever the number of layers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace egp_fast {

// Test hooks (egp_fast._C._set_select_paths / _select_path_counts): which select paths may run
// (bit 0 the sampled path, bit 1 the two-pass path; the radix path always can), and how many
// problems each path solved since the last reset. Tests force each path and check it ran.
static std::atomic<int> g_select_paths{3};
static std::atomic<int64_t> g_solved_by[3];  // sampled, two-pass, radix

void set_select_paths(int64_t bits) { g_select_paths.store(static_cast<int>(bits & 3)); }

std::vector<int64_t> select_path_counts(bool reset) {
  std::vector<int64_t> out;
  for (auto& c : g_solved_by) out.push_back(reset ? c.exchange(0) : c.load());
  return out;
}

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

struct Seg {
  const void* w;
  at::ScalarType dt;
  const bool* m;
  bool* out;
  int64_t n;
};

struct Chunk {
  int64_t seg, lo, hi;
};

template <typename KeyT>
struct KeyTraits;
template <>
struct KeyTraits<uint16_t> {
  static constexpr int kBits = 16;
  static constexpr int kDigits = 2;
  static constexpr int kDigit[2] = {11, 5};
};
template <>
struct KeyTraits<uint32_t> {
  static constexpr int kBits = 32;
  static constexpr int kDigits = 3;
  static constexpr int kDigit[3] = {11, 11, 10};
};
template <>
struct KeyTraits<uint64_t> {
  static constexpr int kBits = 64;
  static constexpr int kDigits = 6;
  static constexpr int kDigit[6] = {11, 11, 11, 11, 10, 10};
};

inline uint32_t key32(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0x7FFFFFFFu;
  return b < 0x7F800001u ? b : 0x7F800001u;
}

inline uint64_t key64(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0x7FFFFFFFFFFFFFFFull;
  return b < 0x7FF0000000000001ull ? b : 0x7FF0000000000001ull;
}

template <typename KeyT, typename T>
inline KeyT key_of(T v) {
  if constexpr (std::is_same_v<KeyT, uint32_t>) {
    return key32(static_cast<float>(v));
  } else if constexpr (std::is_same_v<KeyT, uint64_t>) {
    return key64(static_cast<double>(v));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const uint16_t b = v.x & 0x7FFF;
    return b < 0x7C01 ? b : 0x7C01;
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "16-bit keys come from fp16 or bf16 only");
    const uint16_t b = v.x & 0x7FFF;
    return b < 0x7F81 ? b : 0x7F81;
  }
}

// Calls f(typed pointer) for the segment's dtype. Which dtypes a key width accepts is decided by
// the caller (_key_width): 16-bit keys only for fp16/bf16, 32-bit never for fp64.
template <typename KeyT, typename F>
inline void visit(const Seg& s, F&& f) {
  switch (s.dt) {
    case at::kHalf:
      f(static_cast<const c10::Half*>(s.w));
      return;
    case at::kBFloat16:
      f(static_cast<const c10::BFloat16*>(s.w));
      return;
    case at::kFloat:
      if constexpr (!std::is_same_v<KeyT, uint16_t>) {
        f(static_cast<const float*>(s.w));
        return;
      }
      break;
    case at::kDouble:
      if constexpr (std::is_same_v<KeyT, uint64_t>) {
        f(static_cast<const double*>(s.w));
        return;
      }
      break;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "egp_fast select: dtype ", s.dt, " reached an unsupported key width");
}

// A problem is a set of segments with one budget: one per layer for select_smallest, one for all
// layers for global_smallest. Every pass runs all problems in a single parallel region, so the
// number of OpenMP regions does not grow with the number of layers (each costs a barrier, and
// milliseconds on a loaded machine).
template <typename KeyT>
struct Problem {
  int64_t k = 0;      // entries still to take inside the current prefix bucket
  int64_t n_eq = 0;   // entries in the last chosen bucket (equal to T after the last digit)
  int64_t total = 0;  // unpruned entries (known after the first pass)
  KeyT prefix = 0;
  bool active = false;
  bool skip = false;  // solved by the sampled or the 32-bit two-pass path: mark leaves it alone
  bool resolved = false;  // 16-bit keys: T and the ties known from one full histogram (two-pass)
};

// One histogram pass over the digit below the `done` most significant bits, counting unpruned
// entries whose top `done` bits equal their problem's prefix. hist is [problems][1 << db].
template <typename KeyT>
void histogram(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks,
               const std::vector<int64_t>& problem_of, const std::vector<Problem<KeyT>>& probs, int done,
               int db, std::vector<int64_t>& hist) {
  constexpr int kb = KeyTraits<KeyT>::kBits;
  const int shift = kb - done - db;
  const uint32_t dmask = (1u << db) - 1u;
  const int nb = 1 << db;
  hist.assign(probs.size() * static_cast<size_t>(nb), 0);
  std::mutex mu;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    // Four interleaved sub-histograms: weights cluster in a few exponent bins, and consecutive
    // increments of one counter would stall on store-to-load forwarding.
    std::vector<uint32_t> h(4 * static_cast<size_t>(nb), 0);
    uint32_t* h0 = h.data();
    uint32_t* h1 = h0 + nb;
    uint32_t* h2 = h1 + nb;
    uint32_t* h3 = h2 + nb;
    int64_t pending = 0;
    int64_t cur = -1;  // problem the local counters belong to
    auto flush = [&]() {
      if (cur >= 0 && pending > 0) {
        std::lock_guard<std::mutex> lock(mu);
        int64_t* g = hist.data() + cur * nb;
        for (int b = 0; b < nb; ++b) g[b] += static_cast<int64_t>(h0[b]) + h1[b] + h2[b] + h3[b];
      }
      std::fill(h.begin(), h.end(), 0u);
      pending = 0;
    };
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t p = problem_of[ch.seg];
      const Problem<KeyT>& pr = probs[p];
      if (!pr.active || pr.resolved) continue;
      // A new problem, or 32-bit local counters close to overflowing: hand them over.
      if (p != cur || pending > (int64_t{1} << 30)) {
        flush();
        cur = p;
      }
      const Seg& s = segs[ch.seg];
      const bool* m = s.m;
      visit<KeyT>(s, [&](auto* w) {
        int64_t i = ch.lo;
        if (done == 0) {
          for (; i + 4 <= ch.hi; i += 4) {
            h0[key_of<KeyT>(w[i]) >> shift] += m[i];
            h1[key_of<KeyT>(w[i + 1]) >> shift] += m[i + 1];
            h2[key_of<KeyT>(w[i + 2]) >> shift] += m[i + 2];
            h3[key_of<KeyT>(w[i + 3]) >> shift] += m[i + 3];
          }
          for (; i < ch.hi; ++i) h0[key_of<KeyT>(w[i]) >> shift] += m[i];
        } else {
          // Only a small share of entries matches the prefix: a well-predicted branch beats
          // touching a counter for every entry.
          const int up = kb - done;
          const KeyT prefix = pr.prefix;
          for (; i < ch.hi; ++i) {
            const KeyT k = key_of<KeyT>(w[i]);
            if (static_cast<KeyT>(k >> up) == prefix) h0[(k >> shift) & dmask] += m[i];
          }
        }
      });
      pending += ch.hi - ch.lo;
    }
    flush();
  });
}

// The bucket of histogram h (nb bins) that holds the k-th entry (1-based), and in `below` how
// many entries the buckets before it hold.
inline int64_t kth_bucket(const int64_t* h, int64_t nb, int64_t k, int64_t& below) {
  below = 0;
  int64_t b = 0;
  for (; b < nb; ++b) {
    if (below + h[b] >= k) break;
    below += h[b];
  }
  TORCH_INTERNAL_ASSERT(b < nb, "egp_fast select: lost the k-th key");
  return b;
}

// The chunks of a subset `sel` of the problems, as the two-pass and sampled paths walk them:
// slot[p] is p's index in sel (-1 if not selected); mine lists the selected problems' chunks in
// order; mine[first[j]..first[j+1]) are the chunks of sel[j] (a problem's chunks are adjacent).
struct ChunkSel {
  std::vector<int64_t> slot, mine, first;
};

ChunkSel select_chunks(const std::vector<Chunk>& chunks, const std::vector<int64_t>& problem_of, size_t nprobs,
                       const std::vector<int64_t>& sel) {
  ChunkSel cs;
  const int64_t ns = static_cast<int64_t>(sel.size());
  cs.slot.assign(nprobs, -1);
  for (int64_t j = 0; j < ns; ++j) cs.slot[sel[j]] = j;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    if (cs.slot[problem_of[chunks[c].seg]] >= 0) cs.mine.push_back(c);
  }
  const int64_t nm = static_cast<int64_t>(cs.mine.size());
  cs.first.assign(ns + 1, nm);
  for (int64_t c = nm - 1; c >= 0; --c) cs.first[cs.slot[problem_of[chunks[cs.mine[c]].seg]]] = c;
  for (int64_t j = ns - 1; j >= 0; --j) cs.first[j] = std::min(cs.first[j], cs.first[j + 1]);
  return cs;
}

// Narrows every active problem's prefix by one digit: the bucket holding its k-th entry.
template <typename KeyT>
void choose_buckets(std::vector<Problem<KeyT>>& probs, const std::vector<int64_t>& hist, int db, bool first,
                    const char* op, const std::vector<int64_t>& ks) {
  const int nb = 1 << db;
  for (size_t p = 0; p < probs.size(); ++p) {
    Problem<KeyT>& pr = probs[p];
    if (!pr.active || pr.resolved) continue;
    const int64_t* h = hist.data() + p * nb;
    if (first) {
      pr.total = 0;
      for (int b = 0; b < nb; ++b) pr.total += h[b];
      TORCH_CHECK(pr.total >= pr.k, op, ": asked to prune ", ks[p], " entries but only ", pr.total,
                  " are unpruned (True in the masks); ask for at most that many");
    }
    int64_t cum = 0;
    const int64_t b = kth_bucket(h, nb, pr.k, cum);
    pr.k -= cum;
    pr.prefix = static_cast<KeyT>((static_cast<uint64_t>(pr.prefix) << db) | static_cast<uint64_t>(b));
    pr.n_eq = h[b];
  }
}

// out = mask & (key > T) where every tie at T goes; else out = mask & (key >= T), ties counted
// per chunk, then the first k_rem ties of each such problem (in index order) dropped.
// Inactive problems (k == 0) copy their masks. Counting mode (pruned != nullptr, no outputs):
// nothing is written; pruned[segment] += the entries the marking would have set False.
template <typename KeyT>
void mark(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, const std::vector<int64_t>& problem_of,
          const std::vector<Problem<KeyT>>& probs, int64_t* pruned) {
  const bool counting = pruned != nullptr;
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> eq(nc, 0);
  std::vector<int64_t> lt(counting ? nc : 0, 0);
  bool any_split = false;
  for (const auto& pr : probs) any_split = any_split || (pr.active && pr.k < pr.n_eq);
  at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
      const Problem<KeyT>& pr = probs[problem_of[ch.seg]];
      const KeyT t = pr.prefix;
      if (pr.skip) {
        continue;
      } else if (!pr.active) {
        if (!counting) std::memcpy(s.out + ch.lo, s.m + ch.lo, static_cast<size_t>(ch.hi - ch.lo));
      } else if (counting) {
        int64_t a = 0, e = 0;
        visit<KeyT>(s, [&](auto* w) {
          for (int64_t i = ch.lo; i < ch.hi; ++i) {
            const KeyT k = key_of<KeyT>(w[i]);
            a += s.m[i] && k < t;
            e += s.m[i] && k == t;
          }
        });
        lt[c] = a;
        eq[c] = e;
      } else if (pr.k == pr.n_eq) {
        visit<KeyT>(s, [&](auto* w) {
          for (int64_t i = ch.lo; i < ch.hi; ++i) s.out[i] = s.m[i] && key_of<KeyT>(w[i]) > t;
        });
      } else {
        int64_t n = 0;
        visit<KeyT>(s, [&](auto* w) {
          for (int64_t i = ch.lo; i < ch.hi; ++i) {
            const KeyT k = key_of<KeyT>(w[i]);
            s.out[i] = s.m[i] && k >= t;
            n += (s.m[i] && k == t);
          }
        });
        eq[c] = n;
      }
    }
  });
  if (counting) {
    // Everything below T goes, and the first k ties of each problem in index order.
    std::vector<int64_t> run(probs.size(), 0);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t p = problem_of[chunks[c].seg];
      const Problem<KeyT>& pr = probs[p];
      if (pr.skip || !pr.active) continue;
      const int64_t take = std::min(eq[c], std::max<int64_t>(0, pr.k - run[p]));
      run[p] += eq[c];
      pruned[chunks[c].seg] += lt[c] + take;
    }
    return;
  }
  if (!any_split) return;
  // Ties before each chunk within its problem (chunks of a problem are in index order, though
  // not necessarily adjacent to each other's problems: keep one running sum per problem).
  std::vector<int64_t> before(nc, 0);
  std::vector<int64_t> run(probs.size(), 0);
  std::vector<int64_t> todo;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t p = problem_of[chunks[c].seg];
    const Problem<KeyT>& pr = probs[p];
    if (pr.skip || !pr.active || pr.k == pr.n_eq) continue;
    before[c] = run[p];
    if (eq[c] > 0 && run[p] < pr.k) todo.push_back(c);
    run[p] += eq[c];
  }
  at::parallel_for(0, static_cast<int64_t>(todo.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t c = todo[j];
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
      const Problem<KeyT>& pr = probs[problem_of[ch.seg]];
      const KeyT t = pr.prefix;
      int64_t rank = before[c];
      visit<KeyT>(s, [&](auto* w) {
        for (int64_t i = ch.lo; i < ch.hi && rank < pr.k; ++i) {
          if (s.m[i] && key_of<KeyT>(w[i]) == t) {
            s.out[i] = false;
            ++rank;
          }
        }
      });
    }
  });
}

std::vector<Chunk> make_chunks(const std::vector<Seg>& segs) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    for (int64_t lo = 0; lo < segs[s].n; lo += kChunk) {
      chunks.push_back({s, lo, std::min(segs[s].n, lo + kChunk)});
    }
  }
  return chunks;
}

// ---- Two-pass select for big fp32 problems -------------------------------------------------
//
// Pass 1 histograms the top 16 bits of every unpruned key (65536 bins), which fixes the bucket
// B holding the k-th smallest key. Pass 2 writes out = mask & (key >> 16 >= B) for every entry,
// so everything below the bucket is pruned and everything above it kept, and collects the few
// unpruned entries inside B (well under 1% of a layer of trained or random weights) as
// (index in chunk << 16 | low 16 bits). A third step over those candidates only picks the
// exact key T and the ties to drop, in index order. Two passes over the weights instead of the
// radix path's four (three histogram digits and the marking pass): on resnet50's weights, 50%
// per layer, 2 threads of the shared 2-core EPYC, about 1.7-1.9x faster than the radix path
// alone, measured side by side (benchmarks/bench_select.py has the table). If every key falls
// into one bucket the candidates hold the whole layer: 4 bytes per entry, still within the
// 2x-the-weights memory bound.
//
// The global histogram is 512 KiB per problem, so only problems of kBig entries or more take
// this path (at most 2 bytes of histogram per weight); smaller ones keep the radix path.
constexpr int64_t kBig = int64_t{1} << 18;
constexpr int kHi = 16;
constexpr int64_t kBins = int64_t{1} << kHi;
static_assert(kChunk <= (int64_t{1} << 16), "candidate packing needs chunk offsets below 2^16");

void solve_two_pass(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks,
                    const std::vector<int64_t>& problem_of, std::vector<Problem<uint32_t>>& probs,
                    const std::vector<int64_t>& big, const char* op, const std::vector<int64_t>& ks,
                    int64_t* pruned) {
  const bool counting = pruned != nullptr;
  const int64_t nbig = static_cast<int64_t>(big.size());
  const ChunkSel cs = select_chunks(chunks, problem_of, probs.size(), big);
  const std::vector<int64_t>& slot = cs.slot;
  const std::vector<int64_t>& mine = cs.mine;  // chunks of big problems, in order
  const std::vector<int64_t>& first = cs.first;
  const int64_t nm = static_cast<int64_t>(mine.size());
  std::vector<int64_t> hist(static_cast<size_t>(nbig * kBins), 0);
  std::mutex mu;
  // Pass 1: top-16-bit histogram of the unpruned keys.
  at::parallel_for(0, nm, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint32_t> h(kBins, 0);
    int64_t cur = -1;
    auto flush = [&]() {
      if (cur < 0) return;
      std::lock_guard<std::mutex> lock(mu);
      int64_t* g = hist.data() + cur * kBins;
      for (int64_t b = 0; b < kBins; ++b) g[b] += h[b];
      std::fill(h.begin(), h.end(), 0u);
    };
    for (int64_t j = cb; j < ce; ++j) {
      const Chunk& ch = chunks[mine[j]];
      const int64_t sl = slot[problem_of[ch.seg]];
      if (sl != cur) {
        flush();
        cur = sl;
      }
      const Seg& s = segs[ch.seg];
      const float* w = static_cast<const float*>(s.w);
      const bool* m = s.m;
      // a chunk (<= 65536 entries) cannot overflow the 32-bit local counters
      for (int64_t i = ch.lo; i < ch.hi; ++i) h[key32(w[i]) >> kHi] += m[i];
    }
    flush();
  });
  for (int64_t j = 0; j < nbig; ++j) {
    Problem<uint32_t>& pr = probs[big[j]];
    const int64_t* h = hist.data() + j * kBins;
    int64_t total = 0;
    for (int64_t b = 0; b < kBins; ++b) total += h[b];
    TORCH_CHECK(total >= pr.k, op, ": asked to prune ", ks[big[j]], " entries but only ", total,
                " are unpruned (True in the masks); ask for at most that many");
    int64_t cum = 0;
    const int64_t b = kth_bucket(h, kBins, pr.k, cum);
    pr.k -= cum;  // entries to take inside bucket b
    pr.prefix = static_cast<uint32_t>(b);
  }
  hist = std::vector<int64_t>();
  // Pass 2: mark below / above the bucket, collect the bucket's unpruned entries per chunk
  // (counting mode: count the unpruned entries below the bucket instead of marking).
  std::vector<std::vector<uint32_t>> cand(static_cast<size_t>(nm));
  std::vector<int64_t> gone(counting ? nm : 0, 0);  // per chunk: entries pruned (counting mode)
  at::parallel_for(0, nm, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t j = cb; j < ce; ++j) {
      const Chunk& ch = chunks[mine[j]];
      const Seg& s = segs[ch.seg];
      const uint32_t bucket = probs[problem_of[ch.seg]].prefix;
      const float* w = static_cast<const float*>(s.w);
      const bool* m = s.m;
      bool* out = s.out;
      std::vector<uint32_t>& cj = cand[j];
      int64_t below = 0;
      for (int64_t i = ch.lo; i < ch.hi; ++i) {
        const uint32_t k = key32(w[i]);
        const uint32_t hi = k >> kHi;
        if (counting) {
          below += m[i] && hi < bucket;
        } else {
          out[i] = m[i] && hi >= bucket;
        }
        if (hi == bucket && m[i]) {
          cj.push_back(static_cast<uint32_t>(i - ch.lo) << kHi | (k & 0xFFFFu));
        }
      }
      if (counting) gone[j] = below;
    }
  });
  // Step 3, per problem, over its candidates only: the exact key and the ties, in index order.
  at::parallel_for(0, nbig, 1, [&](int64_t pb, int64_t pe) {
    std::vector<int64_t> h(kBins, 0);
    for (int64_t j = pb; j < pe; ++j) {
      const Problem<uint32_t>& pr = probs[big[j]];
      std::fill(h.begin(), h.end(), 0);
      for (int64_t c = first[j]; c < first[j + 1]; ++c) {
        for (uint32_t v : cand[c]) ++h[v & 0xFFFFu];
      }
      int64_t cum = 0;
      const uint32_t t = static_cast<uint32_t>(kth_bucket(h.data(), kBins, pr.k, cum));
      int64_t ties = pr.k - cum;  // entries equal to the k-th key to drop, lowest index first
      for (int64_t c = first[j]; c < first[j + 1]; ++c) {
        const Chunk& ch = chunks[mine[c]];
        bool* out = counting ? nullptr : segs[ch.seg].out + ch.lo;
        for (uint32_t v : cand[c]) {
          const uint32_t low = v & 0xFFFFu;
          const bool go = low < t || (low == t && ties > 0);
          ties -= low == t && ties > 0;
          if (!go) continue;
          if (counting) {
            ++gone[c];
          } else {
            out[v >> kHi] = false;
          }
        }
      }
    }
  });
  if (counting) {
    for (int64_t c = 0; c < nm; ++c) pruned[chunks[mine[c]].seg] += gone[c];
  }
}

// ---- Two-pass select for big 16-bit problems ---------------------------------------------------
//
// A 16-bit key has only 2^15 values once the sign is cleared, so one histogram pass over all of
// them fixes the k-th key T and how many of its ties go; the radix path's marking pass (mark)
// then finishes the problem. Two passes instead of the radix path's three.
constexpr int64_t kBins16 = int64_t{1} << 15;

void resolve16(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, const std::vector<int64_t>& problem_of,
               std::vector<Problem<uint16_t>>& probs, const std::vector<int64_t>& big, const char* op,
               const std::vector<int64_t>& ks) {
  const int64_t nbig = static_cast<int64_t>(big.size());
  const ChunkSel cs = select_chunks(chunks, problem_of, probs.size(), big);
  const int64_t nm = static_cast<int64_t>(cs.mine.size());
  std::vector<int64_t> hist(static_cast<size_t>(nbig * kBins16), 0);
  std::mutex mu;
  at::parallel_for(0, nm, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint32_t> h(2 * kBins16, 0);  // two interleaved sub-histograms
    uint32_t* h0 = h.data();
    uint32_t* h1 = h0 + kBins16;
    int64_t cur = -1;
    auto flush = [&]() {
      if (cur < 0) return;
      std::lock_guard<std::mutex> lock(mu);
      int64_t* g = hist.data() + cur * kBins16;
      for (int64_t b = 0; b < kBins16; ++b) g[b] += static_cast<int64_t>(h0[b]) + h1[b];
      std::fill(h.begin(), h.end(), 0u);
    };
    for (int64_t j = cb; j < ce; ++j) {
      const Chunk& ch = chunks[cs.mine[j]];
      const int64_t sl = cs.slot[problem_of[ch.seg]];
      if (sl != cur) {
        flush();
        cur = sl;
      }
      const Seg& s = segs[ch.seg];
      const bool* m = s.m;
      visit<uint16_t>(s, [&](auto* w) {
        int64_t i = ch.lo;
        for (; i + 2 <= ch.hi; i += 2) {
          h0[key_of<uint16_t>(w[i])] += m[i];
          h1[key_of<uint16_t>(w[i + 1])] += m[i + 1];
        }
        for (; i < ch.hi; ++i) h0[key_of<uint16_t>(w[i])] += m[i];
      });
      // 32-bit local counters: hand them over every 2^14 chunks (2^30 entries) at the latest
      if (((j - cb + 1) & ((int64_t{1} << 14) - 1)) == 0) flush();
    }
    flush();
  });
  for (int64_t j = 0; j < nbig; ++j) {
    Problem<uint16_t>& pr = probs[big[j]];
    const int64_t* h = hist.data() + j * kBins16;
    int64_t total = 0;
    for (int64_t b = 0; b < kBins16; ++b) total += h[b];
    TORCH_CHECK(total >= pr.k, op, ": asked to prune ", ks[big[j]], " entries but only ", total,
                " are unpruned (True in the masks); ask for at most that many");
    int64_t cum = 0;
    const int64_t b = kth_bucket(h, kBins16, pr.k, cum);
    pr.k -= cum;  // ties of T to take
    pr.prefix = static_cast<uint16_t>(b);
    pr.n_eq = h[b];
    pr.total = total;
    pr.resolved = true;
  }
}

// ---- Sampled one-pass select for fp32, fp16 and bf16 problems ----------------------------------
//
// The k-th smallest key of a problem is first bracketed from a sample: runs of kRun consecutive
// entries (one cache line each) at a pseudo-random offset inside each of R equal strides
// (R = n / 512, within [256, 2048]; above 2^23 entries n / 4096, at most 65536), their unpruned keys, and the sample keys of ranks r -/+ margin
// around the expected rank r = k S / n (S = R kRun draws; margin = 3.5 binomial standard
// deviations, doubled in variance for the correlation inside a run, + 2) give a window
// [lo, hi]. One pass over the problem then writes out = mask & (key >= lo), counts the
// unpruned entries below lo, and collects the unpruned entries inside the window (a few percent
// of the layer) as candidates. If the window holds the k-th key (below <= k <= below +
// candidates), the exact key and its ties are picked among the candidates only; otherwise (a
// sample that misled, heavy ties, or more than a quarter of a chunk, or 1024 entries of a small
// one, inside the window) the problem falls back to the two-pass or radix path, which rewrite
// its output entirely.
// Correctness never depends on the sample; only the speed does.
//
// The pass reads the weights and masks once and writes the output once (SSE2 on x86-64, a
// portable loop elsewhere; 16-bit keys compare 8 to a register). With 16-bit keys many entries
// share a key: the window then spans whole keys, and a tie group too big for the candidate cap
// sends the problem to the two-pass path. Counting mode writes nothing: a problem's count per
// layer is its entries below lo plus the candidates picked there.
constexpr int64_t kSampleMin = int64_t{1} << 15;
constexpr int64_t kRun = 8;
constexpr int64_t kRunsDiv = 512;
constexpr int64_t kRunsMax = 2048;
// Problems beyond kRunsMax * kRunsBigDiv entries (a global selection over a big model) sample
// n / kRunsBigDiv runs, up to kRunsBigMax: the window, and so the candidates held (8 bytes
// each), shrink as 1 / sqrt(runs); from 2^28 entries on about 0.7% of the entries instead of 4%.
constexpr int64_t kRunsBigDiv = 4096;
constexpr int64_t kRunsBigMax = 65536;
constexpr int64_t kRunsMin = 256;  // small layers: a denser sample (they are in cache anyway)

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: a fixed, well-spread offset per run
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Window {
  uint32_t lo = 0, hi = 0x7FFFFFFFu;  // candidate keys lie in [lo, hi]
};

template <typename KeyT>
inline uint32_t key_at(const Seg& s, int64_t i) {
  uint32_t k = 0;
  visit<KeyT>(s, [&](auto* w) { k = key_of<KeyT>(w[i]); });
  return k;
}

// The window of one problem from its sample (segs_of: its segments in order, n entries).
template <typename KeyT>
Window sample_window(const std::vector<Seg>& segs, const std::vector<int64_t>& segs_of, int64_t n, int64_t k,
                     std::vector<uint32_t>& keys) {
  const int64_t runs = std::min(std::max(kRunsMax, std::min(kRunsBigMax, n / kRunsBigDiv)),
                                std::max(kRunsMin, n / kRunsDiv));
  const int64_t stride = n / runs;  // >= kSampleMin / kRunsMin = 128 > kRun
  const int64_t span = stride - kRun + 1;
  keys.clear();
  size_t si = 0;
  int64_t base = 0;  // problem index of segs_of[si]'s first entry
  for (int64_t d = 0; d < runs; ++d) {
    const int64_t pos = d * stride + static_cast<int64_t>(mix64(static_cast<uint64_t>(d)) % static_cast<uint64_t>(span));
    for (int64_t e = pos; e < pos + kRun; ++e) {
      while (e >= base + segs[segs_of[si]].n) base += segs[segs_of[si++]].n;
      const Seg& s = segs[segs_of[si]];
      if (s.m[e - base]) keys.push_back(key_at<KeyT>(s, e - base));
    }
  }
  const double draws = static_cast<double>(runs * kRun);
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double r = q * draws;
  const double margin = 3.5 * std::sqrt(2.0 * draws * q * (1.0 - q)) + 2.0;
  const int64_t rl = static_cast<int64_t>(std::floor(r - margin));
  const int64_t rh = static_cast<int64_t>(std::ceil(r + margin));
  const int64_t nk = static_cast<int64_t>(keys.size());
  Window w;
  if (rl > 0 && nk > 0) {
    const int64_t at = std::min(rl, nk - 1);
    std::nth_element(keys.begin(), keys.begin() + at, keys.end());
    w.lo = keys[at];
  }
  if (rh < nk) {
    // after the first nth_element, keys[rl..] hold the keys >= keys[rl]: search only there
    auto from = (rl > 0 && rl < nk) ? keys.begin() + rl : keys.begin();
    std::nth_element(from, keys.begin() + rh, keys.end());
    w.hi = keys[rh];
  }
  if constexpr (std::is_same_v<KeyT, uint16_t>) w.hi = std::min<uint32_t>(w.hi, 0x7FFFu);
  return w;
}

// One chunk of the pass: out = mask & (key >= lo); returns the unpruned entries below lo and
// appends the unpruned entries inside [lo, hi] to buf as (offset in chunk << 32) | key, in index
// order. Returns -1 when more than `cap` candidates turned up (the caller gives up the problem).
// kWrite false: counting mode, out is not touched.
template <bool kWrite>
int64_t mark_chunk(const float* w, const uint8_t* m, uint8_t* out, int64_t n, Window win, int64_t cap,
                   uint64_t* buf, int64_t& cnt) {
  const uint32_t lo = win.lo, hi = win.hi;
  // Keys are below 2^31 (sign cleared), so signed compares work. Raw NaN keys (above the
  // clamped 0x7F800001) compare like the clamped one against lo, and against hi unless hi is
  // the NaN key itself, where every key from lo up is inside the window.
  const int32_t lo_s = static_cast<int32_t>(lo);
  const int32_t hi_s = static_cast<int32_t>(hi >= 0x7F800001u ? 0x7FFFFFFFu : hi);
  int64_t below = 0;
  int64_t i = 0;
  cnt = 0;
#if defined(__SSE2__)
  {
    const __m128i absm = _mm_set1_epi32(0x7FFFFFFF);
    const __m128i lov = _mm_set1_epi32(lo_s);
    const __m128i hiv = _mm_set1_epi32(hi_s);
    const __m128i zero = _mm_setzero_si128();
    __m128i bacc = zero;  // per-lane counts; a chunk has <= 2^16 entries, no overflow
    alignas(16) int32_t kk[16];
    for (; i + 16 <= n; i += 16) {
      const __m128i mb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i));
      const __m128i m16a = _mm_unpacklo_epi8(mb, zero);
      const __m128i m16b = _mm_unpackhi_epi8(mb, zero);
      const __m128i mw[4] = {_mm_unpacklo_epi16(m16a, zero), _mm_unpackhi_epi16(m16a, zero),
                             _mm_unpacklo_epi16(m16b, zero), _mm_unpackhi_epi16(m16b, zero)};
      __m128i keep[4];
      int bits = 0;
      for (int q = 0; q < 4; ++q) {
        const __m128i k = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 4 * q)), absm);
        _mm_store_si128(reinterpret_cast<__m128i*>(kk + 4 * q), k);
        const __m128i lt = _mm_cmplt_epi32(k, lov);
        const __m128i gt = _mm_cmpgt_epi32(k, hiv);
        keep[q] = _mm_andnot_si128(lt, mw[q]);
        bacc = _mm_add_epi32(bacc, _mm_and_si128(lt, mw[q]));
        const __m128i inw = _mm_andnot_si128(_mm_or_si128(lt, gt), _mm_sub_epi32(zero, mw[q]));
        bits |= _mm_movemask_ps(_mm_castsi128_ps(inw)) << (4 * q);
      }
      if constexpr (kWrite) {
        const __m128i packed =
            _mm_packus_epi16(_mm_packs_epi32(keep[0], keep[1]), _mm_packs_epi32(keep[2], keep[3]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), packed);
      }
      while (bits) {
        const int t = __builtin_ctz(static_cast<unsigned>(bits));
        bits &= bits - 1;
        const uint32_t kv = static_cast<uint32_t>(kk[t]);
        buf[cnt++] = static_cast<uint64_t>(i + t) << 32 | (kv < 0x7F800001u ? kv : 0x7F800001u);
      }
      if (cnt > cap) return -1;
    }
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), bacc);
    below = int64_t{lanes[0]} + lanes[1] + lanes[2] + lanes[3];
  }
#endif
  for (; i < n; ++i) {
    const uint32_t k = key32(w[i]);
    const bool mm = m[i] != 0;
    if constexpr (kWrite) out[i] = mm && k >= lo;
    below += mm && k < lo;
    if (mm && k >= lo && k <= hi) {
      buf[cnt++] = static_cast<uint64_t>(i) << 32 | k;
      if (cnt > cap) return -1;
    }
  }
  return below;
}

// The same for 16-bit floats (fp16 or bf16 bit patterns; nan_key: the canonical NaN key).
template <bool kWrite>
int64_t mark_chunk16(const uint16_t* w, uint32_t nan_key, const uint8_t* m, uint8_t* out, int64_t n, Window win,
                     int64_t cap, uint64_t* buf, int64_t& cnt) {
  const uint32_t lo = win.lo, hi = win.hi;
  // Keys are below 2^15 (sign cleared), so signed 16-bit compares work; raw NaN keys compare
  // like the canonical one, as in mark_chunk.
  const int16_t lo_s = static_cast<int16_t>(lo);
  const int16_t hi_s = static_cast<int16_t>(hi >= nan_key ? 0x7FFFu : hi);
  int64_t below = 0;
  int64_t i = 0;
  cnt = 0;
#if defined(__SSE2__)
  {
    const __m128i absm = _mm_set1_epi16(0x7FFF);
    const __m128i lov = _mm_set1_epi16(lo_s);
    const __m128i hiv = _mm_set1_epi16(hi_s);
    const __m128i zero = _mm_setzero_si128();
    __m128i bacc = zero;  // 16-bit lanes: a chunk adds at most 2^16 / 8 = 8192 to each
    alignas(16) int16_t kk[16];
    for (; i + 16 <= n; i += 16) {
      const __m128i mb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i));
      const __m128i ma = _mm_unpacklo_epi8(mb, zero);
      const __m128i mc = _mm_unpackhi_epi8(mb, zero);
      const __m128i ka = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)), absm);
      const __m128i kc = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8)), absm);
      const __m128i lta = _mm_cmplt_epi16(ka, lov);
      const __m128i ltc = _mm_cmplt_epi16(kc, lov);
      bacc = _mm_add_epi16(bacc, _mm_add_epi16(_mm_and_si128(lta, ma), _mm_and_si128(ltc, mc)));
      if constexpr (kWrite) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm_packus_epi16(_mm_andnot_si128(lta, ma), _mm_andnot_si128(ltc, mc)));
      }
      const __m128i ina = _mm_andnot_si128(_mm_or_si128(lta, _mm_cmpgt_epi16(ka, hiv)), _mm_sub_epi16(zero, ma));
      const __m128i inc = _mm_andnot_si128(_mm_or_si128(ltc, _mm_cmpgt_epi16(kc, hiv)), _mm_sub_epi16(zero, mc));
      int bits = _mm_movemask_epi8(_mm_packs_epi16(ina, inc));
      if (bits) {
        _mm_store_si128(reinterpret_cast<__m128i*>(kk), ka);
        _mm_store_si128(reinterpret_cast<__m128i*>(kk + 8), kc);
        while (bits) {
          const int t = __builtin_ctz(static_cast<unsigned>(bits));
          bits &= bits - 1;
          const uint32_t kv = static_cast<uint16_t>(kk[t]);
          buf[cnt++] = static_cast<uint64_t>(i + t) << 32 | (kv < nan_key ? kv : nan_key);
        }
        if (cnt > cap) return -1;
      }
    }
    alignas(16) uint16_t lanes[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), bacc);
    for (int q = 0; q < 8; ++q) below += lanes[q];
  }
#endif
  for (; i < n; ++i) {
    uint32_t k = w[i] & 0x7FFFu;
    k = k < nan_key ? k : nan_key;
    const bool mm = m[i] != 0;
    if constexpr (kWrite) out[i] = mm && k >= lo;
    below += mm && k < lo;
    if (mm && k >= lo && k <= hi) {
      buf[cnt++] = static_cast<uint64_t>(i) << 32 | k;
      if (cnt > cap) return -1;
    }
  }
  return below;
}

// Picks, among one problem's candidates (all inside [lo, hi]), the kk smallest keys, ties to
// the lower index, and clears their outputs. A histogram of the window's key range finds the
// bucket of the kk-th key; only that bucket's keys are ordered.
// Counting mode (taken != nullptr): taken[c] counts chunk c's picks, nothing is written.
void pick_candidates(const std::vector<std::vector<uint64_t>>& cand, int64_t c0, int64_t c1,
                     const std::vector<bool*>& outs, Window win, int64_t kk, std::vector<int64_t>& hist,
                     std::vector<uint32_t>& keys, int64_t* taken) {
  if (kk <= 0) return;
  const uint32_t lo = win.lo;
  const uint64_t range = static_cast<uint64_t>(win.hi) - lo;
  int shift = 0;
  while ((range >> shift) >= 4096) ++shift;
  const int64_t nb = static_cast<int64_t>(range >> shift) + 1;
  hist.assign(static_cast<size_t>(nb), 0);
  for (int64_t c = c0; c < c1; ++c) {
    for (uint64_t v : cand[c]) ++hist[(static_cast<uint32_t>(v) - lo) >> shift];
  }
  int64_t cum = 0;
  const int64_t b = kth_bucket(hist.data(), nb, kk, cum);
  keys.clear();
  for (int64_t c = c0; c < c1; ++c) {
    for (uint64_t v : cand[c]) {
      const uint32_t key = static_cast<uint32_t>(v);
      if (static_cast<int64_t>((key - lo) >> shift) == b) keys.push_back(key);
    }
  }
  const int64_t in_b = kk - cum;  // keys of bucket b to take
  std::nth_element(keys.begin(), keys.begin() + (in_b - 1), keys.end());
  const uint32_t t = keys[in_b - 1];
  int64_t lt = cum;
  for (uint32_t v : keys) lt += v < t;
  int64_t ties = kk - lt;  // entries equal to t to prune, lowest index first
  for (int64_t c = c0; c < c1; ++c) {
    bool* out = outs[c];
    for (uint64_t v : cand[c]) {
      const uint32_t key = static_cast<uint32_t>(v);
      if (key < t || (key == t && ties > 0)) {
        if (taken) {
          ++taken[c];
        } else {
          out[v >> 32] = false;
        }
        ties -= key == t;
      }
    }
  }
}

// Solves the problems in `elig` (fp32, kSampleMin entries or more) that the sample brackets;
// returns, per entry of `elig`, whether it was solved. Unsolved problems' outputs are partly
// written and must be rewritten by another path.
// Counting mode (pruned != nullptr): nothing is written; pruned[segment] += the entries the
// solved problems prune.
template <typename KeyT>
std::vector<char> solve_sampled(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks,
                                const std::vector<int64_t>& problem_of, const std::vector<Problem<KeyT>>& probs,
                                const std::vector<int64_t>& elig, int64_t* pruned) {
  const bool counting = pruned != nullptr;
  const int64_t ne = static_cast<int64_t>(elig.size());
  const ChunkSel cs = select_chunks(chunks, problem_of, probs.size(), elig);
  const std::vector<int64_t>& slot = cs.slot;
  const std::vector<int64_t>& mine = cs.mine;  // chunks of eligible problems, in order
  const std::vector<int64_t>& first = cs.first;
  std::vector<std::vector<int64_t>> segs_of(ne);
  std::vector<int64_t> size(ne, 0);
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    const int64_t j = slot[problem_of[s]];
    if (j < 0) continue;
    segs_of[j].push_back(s);
    size[j] += segs[s].n;
  }
  std::vector<Window> win(ne);
  at::parallel_for(0, ne, 1, [&](int64_t pb, int64_t pe) {
    std::vector<uint32_t> keys;
    for (int64_t j = pb; j < pe; ++j) win[j] = sample_window<KeyT>(segs, segs_of[j], size[j], probs[elig[j]].k, keys);
  });
  // The pass, chunk by chunk.
  const int64_t nm = static_cast<int64_t>(mine.size());
  std::vector<int64_t> below(nm, 0);
  std::vector<std::vector<uint64_t>> cand(nm);
  std::vector<bool*> outs(nm);
  std::unique_ptr<std::atomic<bool>[]> failed(new std::atomic<bool>[ne]);
  for (int64_t j = 0; j < ne; ++j) failed[j].store(false, std::memory_order_relaxed);
  at::parallel_for(0, nm, 1, [&](int64_t cb, int64_t ce) {
    // holds cap + 16 candidates: the SSE loop checks the cap after each group of 16
    std::vector<uint64_t> buf(static_cast<size_t>(kChunk / 4 + 32));
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[mine[c]];
      const Seg& s = segs[ch.seg];
      outs[c] = counting ? nullptr : s.out + ch.lo;
      const int64_t j = slot[problem_of[ch.seg]];
      if (failed[j].load(std::memory_order_relaxed)) continue;
      int64_t cnt = 0;
      const int64_t n = ch.hi - ch.lo;
      const int64_t cap = std::min<int64_t>(kChunk / 4, std::max<int64_t>(n / 4, 1024));
      const uint8_t* m = reinterpret_cast<const uint8_t*>(s.m) + ch.lo;
      uint8_t* out = counting ? nullptr : reinterpret_cast<uint8_t*>(s.out) + ch.lo;
      int64_t nb = 0;
      if constexpr (std::is_same_v<KeyT, uint16_t>) {
        const uint16_t* w = static_cast<const uint16_t*>(s.w) + ch.lo;
        const uint32_t nan_key = s.dt == at::kHalf ? 0x7C01u : 0x7F81u;
        nb = counting ? mark_chunk16<false>(w, nan_key, m, out, n, win[j], cap, buf.data(), cnt)
                      : mark_chunk16<true>(w, nan_key, m, out, n, win[j], cap, buf.data(), cnt);
      } else {
        const float* w = static_cast<const float*>(s.w) + ch.lo;
        nb = counting ? mark_chunk<false>(w, m, out, n, win[j], cap, buf.data(), cnt)
                      : mark_chunk<true>(w, m, out, n, win[j], cap, buf.data(), cnt);
      }
      if (nb < 0) {
        failed[j].store(true, std::memory_order_relaxed);
        continue;
      }
      below[c] = nb;
      cand[c].assign(buf.begin(), buf.begin() + cnt);
    }
  });
  // Per problem: check the bracket, then pick among the candidates.
  std::vector<char> ok(ne, 0);
  std::vector<int64_t> taken(counting ? nm : 0, 0);
  at::parallel_for(0, ne, 1, [&](int64_t pb, int64_t pe) {
    std::vector<int64_t> hist;
    std::vector<uint32_t> keys;
    for (int64_t j = pb; j < pe; ++j) {
      if (failed[j].load(std::memory_order_relaxed)) continue;
      int64_t nb = 0, nc = 0;
      for (int64_t c = first[j]; c < first[j + 1]; ++c) {
        nb += below[c];
        nc += static_cast<int64_t>(cand[c].size());
      }
      const int64_t k = probs[elig[j]].k;
      if (nb > k || nb + nc < k) continue;  // the window missed the k-th key
      pick_candidates(cand, first[j], first[j + 1], outs, win[j], k - nb, hist, keys,
                      counting ? taken.data() : nullptr);
      ok[j] = 1;
    }
  });
  if (counting) {
    for (int64_t c = 0; c < nm; ++c) {
      const int64_t sg = chunks[mine[c]].seg;
      if (ok[slot[problem_of[sg]]]) pruned[sg] += below[c] + taken[c];
    }
  }
  return ok;
}

// Prunes exactly ks[p] more entries in each problem p (its segments ranked as concatenated).
// Counting mode (pruned != nullptr, the segments have no outputs): pruned[segment] = how many
// entries the selection takes from it, nothing written.
template <typename KeyT>
void solve(const std::vector<Seg>& segs, const std::vector<int64_t>& problem_of, const std::vector<int64_t>& ks,
           const char* op, int64_t* pruned) {
  using Tr = KeyTraits<KeyT>;
  std::vector<Problem<KeyT>> probs(ks.size());
  for (size_t p = 0; p < ks.size(); ++p) {
    TORCH_CHECK(ks[p] >= 0, op, ": count ", ks[p], " is negative; counts must be >= 0");
    probs[p].k = ks[p];
    probs[p].active = ks[p] > 0;
  }
  const std::vector<Chunk> chunks = make_chunks(segs);
  if constexpr (!std::is_same_v<KeyT, uint64_t>) {
    // Problems of kSampleMin entries or more try the sampled one-pass path (32-bit keys: only
    // problems whose segments are all fp32; 16-bit keys: every segment has the same 16-bit
    // dtype); the big ones it could not bracket take the two-pass path; the radix path below
    // then leaves the solved ones alone (skip, or resolved: only marked) and solves the rest.
    std::vector<int64_t> size(probs.size(), 0);
    std::vector<bool> fits(probs.size(), true);
    for (size_t i = 0; i < segs.size(); ++i) {
      size[problem_of[i]] += segs[i].n;
      if constexpr (std::is_same_v<KeyT, uint32_t>) {
        fits[problem_of[i]] = fits[problem_of[i]] && segs[i].dt == at::kFloat;
      }
    }
    const int paths = g_select_paths.load();
    std::vector<int64_t> elig;
    for (size_t p = 0; p < probs.size(); ++p) {
      if ((paths & 1) && probs[p].active && fits[p] && size[p] >= kSampleMin) {
        elig.push_back(static_cast<int64_t>(p));
      }
    }
    if (!elig.empty()) {
      const std::vector<char> ok = solve_sampled<KeyT>(segs, chunks, problem_of, probs, elig, pruned);
      for (size_t j = 0; j < elig.size(); ++j) {
        if (!ok[j]) continue;
        probs[elig[j]].active = false;
        probs[elig[j]].skip = true;
        g_solved_by[0].fetch_add(1);
      }
    }
    std::vector<int64_t> big;
    for (size_t p = 0; p < probs.size(); ++p) {
      if ((paths & 2) && probs[p].active && fits[p] && size[p] >= kBig) big.push_back(static_cast<int64_t>(p));
    }
    if (!big.empty()) {
      g_solved_by[1].fetch_add(static_cast<int64_t>(big.size()));
      if constexpr (std::is_same_v<KeyT, uint32_t>) {
        solve_two_pass(segs, chunks, problem_of, probs, big, op, ks, pruned);
        for (int64_t p : big) {
          probs[p].active = false;
          probs[p].skip = true;
        }
      } else {
        resolve16(segs, chunks, problem_of, probs, big, op, ks);  // mark() below finishes them
      }
    }
  }
  int64_t radix = 0;
  for (const auto& pr : probs) radix += pr.active && !pr.resolved;
  g_solved_by[2].fetch_add(radix);
  if (radix > 0) {
    std::vector<int64_t> hist;
    int done = 0;
    for (int d = 0; d < Tr::kDigits; ++d) {
      const int db = Tr::kDigit[d];
      histogram<KeyT>(segs, chunks, problem_of, probs, done, db, hist);
      choose_buckets<KeyT>(probs, hist, db, d == 0, op, ks);
      done += db;
    }
  }
  mark<KeyT>(segs, chunks, problem_of, probs, pruned);
}

// 16-bit keys when every segment has the same 16-bit dtype, 64-bit when any is fp64, else 32.
int key_width(const std::vector<Seg>& segs) {
  bool any64 = false, all16 = !segs.empty();
  for (const Seg& s : segs) {
    any64 = any64 || s.dt == at::kDouble;
    all16 = all16 && s.dt == segs[0].dt && (s.dt == at::kHalf || s.dt == at::kBFloat16);
  }
  return any64 ? 64 : (all16 ? 16 : 32);
}

void solve_any(const std::vector<Seg>& segs, const std::vector<int64_t>& problem_of,
               const std::vector<int64_t>& ks, const char* op, int64_t* pruned = nullptr) {
  switch (key_width(segs)) {
    case 16:
      solve<uint16_t>(segs, problem_of, ks, op, pruned);
      break;
    case 64:
      solve<uint64_t>(segs, problem_of, ks, op, pruned);
      break;
    default:
      solve<uint32_t>(segs, problem_of, ks, op, pruned);
      break;
  }
}
// Validates the lists, makes contiguous inputs and allocates the outputs. `keep` holds the
// contiguous copies alive while raw pointers into them are used.
// With counting true no outputs are allocated (the segments' out pointers are null).
std::vector<Seg> prepare(at::TensorList weights, at::TensorList masks, const char* op,
                         std::vector<at::Tensor>& keep, std::vector<at::Tensor>& outs, bool counting = false) {
  TORCH_CHECK(weights.size() == masks.size(), op, ": got ", weights.size(), " weights but ",
              masks.size(), " masks; pass one mask per weight");
  std::vector<Seg> segs;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& m = masks[i];
    TORCH_CHECK(w.device().is_cpu() && m.device().is_cpu(), op, ": weights[", i, "] and masks[", i,
                "] must be CPU tensors for the CPU kernel");
    const auto dt = w.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                ": weights[", i, "] has dtype ", dt, "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": masks[", i, "] must be bool (True = kept), got ",
                m.scalar_type());
    TORCH_CHECK(w.sizes() == m.sizes(), op, ": masks[", i, "] has shape ", m.sizes(),
                " but weights[", i, "] has ", w.sizes());
    at::Tensor wc = w.contiguous();
    at::Tensor mc = m.contiguous();
    keep.push_back(wc);
    keep.push_back(mc);
    if (counting) {
      segs.push_back({wc.data_ptr(), dt, mc.data_ptr<bool>(), nullptr, w.numel()});
      continue;
    }
    at::Tensor out = at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous));
    segs.push_back({wc.data_ptr(), dt, mc.data_ptr<bool>(), out.data_ptr<bool>(), w.numel()});
    outs.push_back(out);
  }
  return segs;
}

std::vector<at::Tensor> select_smallest_cpu(at::TensorList weights, at::TensorList masks,
                                            at::IntArrayRef counts) {
  const char* op = "select_smallest";
  TORCH_CHECK(counts.size() == weights.size(), op, ": got ", counts.size(), " counts for ",
              weights.size(), " layers; pass one count per layer");
  std::vector<at::Tensor> keep, outs;
  const std::vector<Seg> segs = prepare(weights, masks, op, keep, outs);
  std::vector<int64_t> problem_of(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) problem_of[i] = static_cast<int64_t>(i);
  solve_any(segs, problem_of, counts.vec(), op);
  return outs;
}

std::vector<at::Tensor> global_smallest_cpu(at::TensorList weights, at::TensorList masks, int64_t count) {
  const char* op = "global_smallest";
  TORCH_CHECK(count >= 0, op, ": count=", count, " is negative; count must be >= 0");
  std::vector<at::Tensor> keep, outs;
  const std::vector<Seg> segs = prepare(weights, masks, op, keep, outs);
  solve_any(segs, std::vector<int64_t>(segs.size(), 0), {count}, op);
  return outs;
}

// global_smallest without the masks: how many entries the selection takes from each layer.
// Reads the weights and masks once (sampled path) and allocates no per-weight output.
std::vector<int64_t> global_smallest_counts_cpu(at::TensorList weights, at::TensorList masks, int64_t count) {
  const char* op = "global_smallest_counts";
  TORCH_CHECK(count >= 0, op, ": count=", count, " is negative; count must be >= 0");
  std::vector<at::Tensor> keep, outs;
  const std::vector<Seg> segs = prepare(weights, masks, op, keep, outs, /*counting=*/true);
  std::vector<int64_t> pruned(segs.size(), 0);
  if (!segs.empty()) solve_any(segs, std::vector<int64_t>(segs.size(), 0), {count}, op, pruned.data());
  return pruned;
}

}  // namespace

TORCH_LIBRARY_IMPL(egp_fast, CPU, m) {
  m.impl("select_smallest", &select_smallest_cpu);
  m.impl("global_smallest", &global_smallest_cpu);
  m.impl("global_smallest_counts", &global_smallest_counts_cpu);
}

}  // namespace egp_fast
