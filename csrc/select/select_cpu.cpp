// CPU radix select for select_smallest / global_smallest (exact k, ties by index, NaN last).
//
// Keys: the bits of |w| as an unsigned integer are monotone in |w| for IEEE floats, with +0.0 and
// -0.0 both mapping to 0 and every NaN above +inf. Clamping with min(bits, inf_bits + 1) gives all
// NaNs one canonical key, so NaNs rank after +inf and among themselves by position: the rule in
// egp_fast/ops/select.py. fp16/bf16 layers use their 16-bit patterns directly, fp32 32-bit keys,
// fp64 64-bit keys; a global call over mixed dtypes converts every value to the widest float
// present (exact for fp16/bf16 -> fp32 -> fp64), so layers rank as the reference's float64 keys.
//
// Select: most-significant-digit radix select (digits of 11/11/10 bits for 32-bit keys), one
// histogram pass per digit over the unpruned entries whose higher digits match the prefix found
// so far. That yields the key T of the k-th smallest and how many entries equal to T must go
// (k_rem). A marking pass writes out = mask & (key > T) when every tie goes, else
// out = mask & (key >= T) and a fix-up pass over the few chunks that hold the first k_rem ties.
//
// Work is split in fixed chunks of kChunk elements so the tie fix-up knows, per chunk, how many
// ties come before it. Chunks run on at::parallel_for (OpenMP); segmented calls run small
// layers side by side (the nested parallel_for then runs inline) and big layers one by one.
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

// One histogram pass over the digit below the `done` most significant bits, counting unpruned
// entries whose top `done` bits equal `prefix`.
template <typename KeyT>
void histogram(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, int done, int db,
               KeyT prefix, std::vector<int64_t>& hist) {
  constexpr int kb = KeyTraits<KeyT>::kBits;
  const int shift = kb - done - db;
  const uint32_t dmask = (1u << db) - 1u;
  const int nb = 1 << db;
  hist.assign(nb, 0);
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
    auto flush = [&]() {
      std::lock_guard<std::mutex> lock(mu);
      for (int b = 0; b < nb; ++b) {
        hist[b] += static_cast<int64_t>(h0[b]) + h1[b] + h2[b] + h3[b];
      }
    };
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
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
          const int up = kb - done;
          for (; i < ch.hi; ++i) {
            const KeyT k = key_of<KeyT>(w[i]);
            h0[(k >> shift) & dmask] += (m[i] && static_cast<KeyT>(k >> up) == prefix);
          }
        }
      });
      pending += ch.hi - ch.lo;
      if (pending > (int64_t{1} << 30)) {  // keep the 32-bit local counters from overflowing
        flush();
        std::fill(h.begin(), h.end(), 0u);
        pending = 0;
      }
    }
    if (pending > 0) flush();
  });
}

// Finds the key T of the k-th smallest unpruned entry (k >= 1) and how many entries equal to T
// must be taken (k_rem), plus how many equal T in total (n_eq). Returns false when fewer than
// k entries are unpruned.
template <typename KeyT>
bool find_threshold(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, int64_t k,
                    KeyT& t, int64_t& k_rem, int64_t& n_eq, int64_t& total) {
  using Tr = KeyTraits<KeyT>;
  std::vector<int64_t> hist;
  KeyT prefix = 0;
  int done = 0;
  for (int d = 0; d < Tr::kDigits; ++d) {
    const int db = Tr::kDigit[d];
    histogram<KeyT>(segs, chunks, done, db, prefix, hist);
    if (d == 0) {
      total = 0;
      for (int64_t v : hist) total += v;
      if (total < k) return false;
    }
    int64_t cum = 0;
    int b = 0;
    for (; b < static_cast<int>(hist.size()); ++b) {
      if (cum + hist[b] >= k) break;
      cum += hist[b];
    }
    TORCH_INTERNAL_ASSERT(b < static_cast<int>(hist.size()), "egp_fast select: lost the k-th key");
    k -= cum;
    prefix = static_cast<KeyT>((static_cast<uint64_t>(prefix) << db) | static_cast<uint64_t>(b));
    done += db;
    n_eq = hist[b];
  }
  t = prefix;
  k_rem = k;
  return true;
}

template <typename KeyT>
void mark(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, KeyT t, int64_t k_rem,
          int64_t n_eq) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
  if (k_rem == n_eq) {  // every tie goes: one pass
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const Seg& s = segs[ch.seg];
        visit<KeyT>(s, [&](auto* w) {
          for (int64_t i = ch.lo; i < ch.hi; ++i) s.out[i] = s.m[i] && key_of<KeyT>(w[i]) > t;
        });
      }
    });
    return;
  }
  // Keep the ties for now and count them per chunk; then drop the first k_rem in chunk order.
  std::vector<int64_t> eq(nc, 0);
  at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
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
  });
  std::vector<int64_t> before(nc, 0);
  int64_t run = 0;
  int64_t last = 0;  // chunks [0, last) hold the ties to drop
  for (int64_t c = 0; c < nc; ++c) {
    before[c] = run;
    if (run < k_rem) last = c + 1;
    run += eq[c];
  }
  at::parallel_for(0, last, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      if (eq[c] == 0) continue;
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
      int64_t rank = before[c];
      visit<KeyT>(s, [&](auto* w) {
        for (int64_t i = ch.lo; i < ch.hi && rank < k_rem; ++i) {
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

void copy_masks(const std::vector<Seg>& segs) {
  for (const Seg& s : segs) {
    if (s.n > 0) std::memcpy(s.out, s.m, static_cast<size_t>(s.n));
  }
}

// Prunes exactly k more entries of the problem formed by `segs` (ranked as concatenated).
template <typename KeyT>
void solve(const std::vector<Seg>& segs, int64_t k, const char* op) {
  if (k == 0) {
    copy_masks(segs);
    return;
  }
  const std::vector<Chunk> chunks = make_chunks(segs);
  KeyT t = 0;
  int64_t k_rem = 0, n_eq = 0, total = 0;
  const bool ok = find_threshold<KeyT>(segs, chunks, k, t, k_rem, n_eq, total);
  TORCH_CHECK(ok, op, ": asked to prune ", k, " entries but only ", total,
              " are unpruned (True in the masks); ask for at most that many");
  mark<KeyT>(segs, chunks, t, k_rem, n_eq);
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

void solve_any(const std::vector<Seg>& segs, int64_t k, const char* op) {
  switch (key_width(segs)) {
    case 16:
      solve<uint16_t>(segs, k, op);
      break;
    case 64:
      solve<uint64_t>(segs, k, op);
      break;
    default:
      solve<uint32_t>(segs, k, op);
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
  for (size_t i = 0; i < counts.size(); ++i) {
    TORCH_CHECK(counts[i] >= 0, op, ": counts[", i, "]=", counts[i], " is negative; counts must be >= 0");
  }
  // Small layers side by side (their inner parallel_for then runs inline), big ones one by one
  // with every thread on their chunks.
  std::vector<int64_t> small, big;
  for (size_t i = 0; i < segs.size(); ++i) {
    (segs[i].n < 4 * kChunk ? small : big).push_back(static_cast<int64_t>(i));
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      solve_any({segs[small[j]]}, counts[small[j]], op);
    }
  });
  for (int64_t i : big) solve_any({segs[i]}, counts[i], op);
  return outs;
}

std::vector<at::Tensor> global_smallest_cpu(at::TensorList weights, at::TensorList masks, int64_t count) {
  const char* op = "global_smallest";
  TORCH_CHECK(count >= 0, op, ": count=", count, " is negative; count must be >= 0");
  std::vector<at::Tensor> keep, outs;
  const std::vector<Seg> segs = prepare(weights, masks, op, keep, outs);
  solve_any(segs, count, op);
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(egp_fast, CPU, m) {
  m.impl("select_smallest", &select_smallest_cpu);
  m.impl("global_smallest", &global_smallest_cpu);
}

}  // namespace egp_fast
