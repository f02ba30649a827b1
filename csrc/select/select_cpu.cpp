// CPU radix select for select_smallest / global_smallest (exact k, ties by index, NaN last).
//
// Keys: the bits of |w| as an unsigned integer are monotone in |w| for IEEE floats, with +0.0 and
// -0.0 both mapping to 0 and every NaN above +inf. Clamping with min(bits, inf_bits + 1) gives all
// NaNs one canonical key, so NaNs rank after +inf and among themselves by position: the rule in
// egp_fast/ops/select.py. fp16/bf16 layers use their 16-bit patterns directly, fp32 32-bit keys,
// fp64 64-bit keys; a global call over mixed dtypes converts every value to the widest float
// present (exact for fp16/bf16 -> fp32 -> fp64), so layers rank as the reference's float64 keys.
//
// fp32 problems of 2^18 entries or more take the two-pass path (solve_two_pass below); the rest:
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
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace egp_fast {
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
  bool skip = false;  // solved by the two-pass path (fp32 layers of kBig entries or more)
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
      if (!pr.active) continue;
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

// Narrows every active problem's prefix by one digit: the bucket holding its k-th entry.
template <typename KeyT>
void choose_buckets(std::vector<Problem<KeyT>>& probs, const std::vector<int64_t>& hist, int db, bool first,
                    const char* op, const std::vector<int64_t>& ks) {
  const int nb = 1 << db;
  for (size_t p = 0; p < probs.size(); ++p) {
    Problem<KeyT>& pr = probs[p];
    if (!pr.active) continue;
    const int64_t* h = hist.data() + p * nb;
    if (first) {
      pr.total = 0;
      for (int b = 0; b < nb; ++b) pr.total += h[b];
      TORCH_CHECK(pr.total >= pr.k, op, ": asked to prune ", ks[p], " entries but only ", pr.total,
                  " are unpruned (True in the masks); ask for at most that many");
    }
    int64_t cum = 0;
    int b = 0;
    for (; b < nb; ++b) {
      if (cum + h[b] >= pr.k) break;
      cum += h[b];
    }
    TORCH_INTERNAL_ASSERT(b < nb, "egp_fast select: lost the k-th key");
    pr.k -= cum;
    pr.prefix = static_cast<KeyT>((static_cast<uint64_t>(pr.prefix) << db) | static_cast<uint64_t>(b));
    pr.n_eq = h[b];
  }
}

// out = mask & (key > T) where every tie at T goes; else out = mask & (key >= T), ties counted
// per chunk, then the first k_rem ties of each such problem (in index order) dropped.
// Inactive problems (k == 0) copy their masks.
template <typename KeyT>
void mark(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, const std::vector<int64_t>& problem_of,
          const std::vector<Problem<KeyT>>& probs) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> eq(nc, 0);
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
        std::memcpy(s.out + ch.lo, s.m + ch.lo, static_cast<size_t>(ch.hi - ch.lo));
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
  if (!any_split) return;
  // Ties before each chunk within its problem (chunks of a problem are in index order, though
  // not necessarily adjacent to each other's problems: keep one running sum per problem).
  std::vector<int64_t> before(nc, 0);
  std::vector<int64_t> run(probs.size(), 0);
  std::vector<int64_t> todo;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t p = problem_of[chunks[c].seg];
    const Problem<KeyT>& pr = probs[p];
    if (!pr.active || pr.k == pr.n_eq) continue;
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
                    const std::vector<int64_t>& big, const char* op, const std::vector<int64_t>& ks) {
  const int64_t nbig = static_cast<int64_t>(big.size());
  std::vector<int64_t> slot(probs.size(), -1);
  for (int64_t j = 0; j < nbig; ++j) slot[big[j]] = j;
  std::vector<int64_t> mine;  // chunks of big problems, in order
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    if (slot[problem_of[chunks[c].seg]] >= 0) mine.push_back(c);
  }
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
    int64_t cum = 0, b = 0;
    for (; b < kBins; ++b) {
      if (cum + h[b] >= pr.k) break;
      cum += h[b];
    }
    TORCH_INTERNAL_ASSERT(b < kBins, "egp_fast select: lost the k-th key");
    pr.k -= cum;  // entries to take inside bucket b
    pr.prefix = static_cast<uint32_t>(b);
  }
  hist = std::vector<int64_t>();
  // Pass 2: mark below / above the bucket, collect the bucket's unpruned entries per chunk.
  std::vector<std::vector<uint32_t>> cand(static_cast<size_t>(nm));
  at::parallel_for(0, nm, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t j = cb; j < ce; ++j) {
      const Chunk& ch = chunks[mine[j]];
      const Seg& s = segs[ch.seg];
      const uint32_t bucket = probs[problem_of[ch.seg]].prefix;
      const float* w = static_cast<const float*>(s.w);
      const bool* m = s.m;
      bool* out = s.out;
      std::vector<uint32_t>& cj = cand[j];
      for (int64_t i = ch.lo; i < ch.hi; ++i) {
        const uint32_t k = key32(w[i]);
        const uint32_t hi = k >> kHi;
        out[i] = m[i] && hi >= bucket;
        if (hi == bucket && m[i]) {
          cj.push_back(static_cast<uint32_t>(i - ch.lo) << kHi | (k & 0xFFFFu));
        }
      }
    }
  });
  // Step 3, per problem, over its candidates only: the exact key and the ties, in index order.
  std::vector<int64_t> first(nbig + 1, nm);  // mine[first[j]..first[j+1]) are problem j's chunks
  for (int64_t j = nm - 1; j >= 0; --j) first[slot[problem_of[chunks[mine[j]].seg]]] = j;
  for (int64_t j = nbig - 1; j >= 0; --j) first[j] = std::min(first[j], first[j + 1]);
  at::parallel_for(0, nbig, 1, [&](int64_t pb, int64_t pe) {
    std::vector<int64_t> h(kBins, 0);
    for (int64_t j = pb; j < pe; ++j) {
      const Problem<uint32_t>& pr = probs[big[j]];
      std::fill(h.begin(), h.end(), 0);
      for (int64_t c = first[j]; c < first[j + 1]; ++c) {
        for (uint32_t v : cand[c]) ++h[v & 0xFFFFu];
      }
      int64_t cum = 0;
      uint32_t t = 0;
      for (; t < kBins; ++t) {
        if (cum + h[t] >= pr.k) break;
        cum += h[t];
      }
      TORCH_INTERNAL_ASSERT(t < kBins, "egp_fast select: lost the k-th key in its bucket");
      int64_t ties = pr.k - cum;  // entries equal to the k-th key to drop, lowest index first
      for (int64_t c = first[j]; c < first[j + 1]; ++c) {
        const Chunk& ch = chunks[mine[c]];
        bool* out = segs[ch.seg].out + ch.lo;
        for (uint32_t v : cand[c]) {
          const uint32_t low = v & 0xFFFFu;
          if (low < t) {
            out[v >> kHi] = false;
          } else if (low == t && ties > 0) {
            out[v >> kHi] = false;
            --ties;
          }
        }
      }
    }
  });
}

// Prunes exactly ks[p] more entries in each problem p (its segments ranked as concatenated).
template <typename KeyT>
void solve(const std::vector<Seg>& segs, const std::vector<int64_t>& problem_of, const std::vector<int64_t>& ks,
           const char* op) {
  using Tr = KeyTraits<KeyT>;
  std::vector<Problem<KeyT>> probs(ks.size());
  for (size_t p = 0; p < ks.size(); ++p) {
    TORCH_CHECK(ks[p] >= 0, op, ": count ", ks[p], " is negative; counts must be >= 0");
    probs[p].k = ks[p];
    probs[p].active = ks[p] > 0;
  }
  const std::vector<Chunk> chunks = make_chunks(segs);
  if constexpr (std::is_same_v<KeyT, uint32_t>) {
    // Big problems whose segments are all fp32 take the two-pass path; the radix path below
    // then leaves them alone (skip) and solves the rest.
    std::vector<int64_t> size(probs.size(), 0);
    std::vector<bool> all32(probs.size(), true);
    for (size_t i = 0; i < segs.size(); ++i) {
      size[problem_of[i]] += segs[i].n;
      all32[problem_of[i]] = all32[problem_of[i]] && segs[i].dt == at::kFloat;
    }
    std::vector<int64_t> big;
    for (size_t p = 0; p < probs.size(); ++p) {
      if (probs[p].active && all32[p] && size[p] >= kBig) big.push_back(static_cast<int64_t>(p));
    }
    if (!big.empty()) {
      solve_two_pass(segs, chunks, problem_of, probs, big, op, ks);
      for (int64_t p : big) {
        probs[p].active = false;
        probs[p].skip = true;
      }
    }
  }
  std::vector<int64_t> hist;
  int done = 0;
  for (int d = 0; d < Tr::kDigits; ++d) {
    const int db = Tr::kDigit[d];
    histogram<KeyT>(segs, chunks, problem_of, probs, done, db, hist);
    choose_buckets<KeyT>(probs, hist, db, d == 0, op, ks);
    done += db;
  }
  mark<KeyT>(segs, chunks, problem_of, probs);
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
               const std::vector<int64_t>& ks, const char* op) {
  switch (key_width(segs)) {
    case 16:
      solve<uint16_t>(segs, problem_of, ks, op);
      break;
    case 64:
      solve<uint64_t>(segs, problem_of, ks, op);
      break;
    default:
      solve<uint32_t>(segs, problem_of, ks, op);
      break;
  }
}
// Validates the lists, makes contiguous inputs and allocates the outputs. `keep` holds the
// contiguous copies alive while raw pointers into them are used.
std::vector<Seg> prepare(at::TensorList weights, at::TensorList masks, const char* op,
                         std::vector<at::Tensor>& keep, std::vector<at::Tensor>& outs) {
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
    at::Tensor out = at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous));
    segs.push_back({wc.data_ptr(), dt, mc.data_ptr<bool>(), out.data_ptr<bool>(), w.numel()});
    keep.push_back(wc);
    keep.push_back(mc);
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

}  // namespace

TORCH_LIBRARY_IMPL(egp_fast, CPU, m) {
  m.impl("select_smallest", &select_smallest_cpu);
  m.impl("global_smallest", &global_smallest_cpu);
}

}  // namespace egp_fast
