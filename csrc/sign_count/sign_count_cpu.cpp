// CPU sign_count_: counts[c] += #(z > threshold) along the channel axis, one read of z, no
// temporaries the size of z.
//
// Layouts:
//  * contiguous z viewed as [outer, C, inner] with inner > 1 (NCHW, channel_dim=1): small planes
//    (under 64 values, a row of C * inner values fits 64K int32 counters, rows for every thread)
//    are walked as rows, like the channels-last layout below, with one counter per position of
//    the row; larger planes one (o, c) plane at a time, planes split over threads in contiguous
//    ranges (the split of the layer that wrote z, so each thread reads what is in its own
//    cache; a channel-by-channel split measured slower right after a write), each thread
//    summing into its own C counters;
//  * channel innermost in memory, i.e. z.movedim(channel_dim, -1) is contiguous (channels-last
//    NHWC storage of an NCHW tensor, [N, L, C], [N, H, W, C]): rows of C values, each thread
//    adding a row into its own int32 counters (flushed before they could overflow);
//  * any other strided layout (rare: sliced or transposed views) is first copied with
//    .contiguous(): a documented fallback that costs one copy of z.
// The comparison is done as torch does it: the threshold is first cast to z's dtype (a Python
// scalar adopts the tensor's dtype), then compared in float (double for fp64). NaN compares false,
// so it counts as OFF.
//
// Vector loops: the extension is compiled for the baseline x86-64 ISA (SSE2), where the plain
// loops below compare 4 floats at a time. On a CPU with AVX2 (checked once at run time) float32,
// bfloat16 and float16 inputs go through 8-wide AVX2 loops instead: each value is widened to
// float exactly (bf16: its bits shifted into the top half; fp16: the F16C conversion), compared
// with the ordered greater-than that `>` is (NaN false), and the all-ones lanes of the compare
// are subtracted from int32 lane counters. Results are identical to the plain loops; the test
// hook `torch.ops.egp_fast._sign_count_vector_mode` switches the AVX2 loops off and on so both
// are tested on the same inputs.
//
// relu_sign_count / relu_sign_count_: the same count at threshold 0 fused with the ReLU itself,
// so a measured ReLU reads its input once: each value is compared once for the count (z > 0)
// and written as relu(z) = (z < 0 ? +0 : z), bit for bit what torch.relu gives (-0.0 and NaN
// pass through unchanged, +inf too). The output is written in z's own memory order (in place,
// or into empty_like(z), which keeps z's strides for dense layouts); the rare strided view the
// count would copy is instead counted and then passed to at::relu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "layout.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EGP_SIGN_COUNT_AVX2 1
#include <immintrin.h>
#endif

namespace egp_fast {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Values per int32 accumulation block: no counter (lane or row position) can pass 2^31 - 1.
constexpr int64_t kBlock = int64_t{1} << 30;

// ---- plain loops: any dtype ----------------------------------------------------------------

// `out` (nullable; may equal the input for in-place) receives relu of the values read; the
// ReLU form is only used with threshold 0.
template <typename T>
inline T relu_of(T v) {
  return static_cast<acc_t<T>>(v) < acc_t<T>(0) ? T(0) : v;
}

template <typename T>
inline int64_t count_run_plain(const T* p, int64_t n, acc_t<T> thr, T* out = nullptr) {
  int32_t s = 0;
  if (out != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = p[i];
      s += static_cast<acc_t<T>>(v) > thr;
      out[i] = relu_of(v);
    }
    return s;
  }
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t<T>>(p[i]) > thr;
  return s;
}

template <typename T>
inline void add_row_plain(const T* row, int64_t n, acc_t<T> thr, int32_t* __restrict cnt, T* out) {
  if (out != nullptr) {
    for (int64_t k = 0; k < n; ++k) {
      const T v = row[k];
      cnt[k] += static_cast<acc_t<T>>(v) > thr;
      out[k] = relu_of(v);
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) cnt[k] += static_cast<acc_t<T>>(row[k]) > thr;
}

// ---- AVX2 loops: float32, bfloat16, float16 --------------------------------------------------

template <typename T>
constexpr bool kHasVector = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

#ifdef EGP_SIGN_COUNT_AVX2
#define EGP_AVX2 __attribute__((target("avx2,f16c")))

EGP_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EGP_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of a float32: widening is a 16-bit shift, exact for every value.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
EGP_AVX2 inline __m256 load8(const c10::Half* p) {
  // F16C widening is exact (subnormals, infinities and NaN included) and ignores MXCSR.
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// -1 in the lanes where v > t (ordered: NaN gives 0), 0 elsewhere.
EGP_AVX2 inline __m256i gt_mask(__m256 v, __m256 t) { return _mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_GT_OQ)); }

// -1 in the lanes where v < 0 (ordered: NaN and -0.0 give 0): the lanes relu sets to +0.
EGP_AVX2 inline __m256i lt_zero(__m256 v) {
  return _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// Write relu of the 8 values at p (already loaded as v) to q: the input's own bits, cleared
// where v < 0. 16-bit types clear their raw halves with the compare mask narrowed in order.
EGP_AVX2 inline void store_relu8(float* q, const float*, __m256 v) {
  _mm256_storeu_ps(q, _mm256_castsi256_ps(_mm256_andnot_si256(lt_zero(v), _mm256_castps_si256(v))));
}
template <typename T16>
EGP_AVX2 inline void store_relu8(T16* q, const T16* p, __m256 v) {
  const __m256i lt = lt_zero(v);
  const __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(lt), _mm256_extracti128_si256(lt, 1));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_andnot_si128(m16, h));
}

EGP_AVX2 inline int64_t hsum(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i q = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1))));
}

// Count of one run of at most kBlock values (each lane of each accumulator gains at most
// n / 32 + 1, the total at most n: no int32 overflows).
template <typename T>
EGP_AVX2 int64_t count_run_avx2(const T* p, int64_t n, float thr) {
  const __m256 t = _mm256_set1_ps(thr);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_sub_epi32(a0, gt_mask(load8(p + i), t));
    a1 = _mm256_sub_epi32(a1, gt_mask(load8(p + i + 8), t));
    a2 = _mm256_sub_epi32(a2, gt_mask(load8(p + i + 16), t));
    a3 = _mm256_sub_epi32(a3, gt_mask(load8(p + i + 24), t));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_sub_epi32(a0, gt_mask(load8(p + i), t));
  int64_t s = hsum(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
  for (; i < n; ++i) s += static_cast<float>(p[i]) > thr;
  return s;
}

// The same count fused with relu: out[i] = relu(p[i]) (out may be p).
template <typename T>
EGP_AVX2 int64_t count_relu_run_avx2(const T* p, T* out, int64_t n, float thr) {
  const __m256 t = _mm256_set1_ps(thr);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = load8(p + i), v1 = load8(p + i + 8);
    a0 = _mm256_sub_epi32(a0, gt_mask(v0, t));
    a1 = _mm256_sub_epi32(a1, gt_mask(v1, t));
    store_relu8(out + i, p + i, v0);
    store_relu8(out + i + 8, p + i + 8, v1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(p + i);
    a0 = _mm256_sub_epi32(a0, gt_mask(v, t));
    store_relu8(out + i, p + i, v);
  }
  int64_t s = hsum(_mm256_add_epi32(a0, a1));
  for (; i < n; ++i) {
    const T v = p[i];
    s += static_cast<float>(v) > thr;
    out[i] = relu_of(v);
  }
  return s;
}

template <typename T>
EGP_AVX2 void add_row_relu_avx2(const T* row, T* out, int64_t n, float thr, int32_t* __restrict cnt) {
  const __m256 t = _mm256_set1_ps(thr);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256i* c = reinterpret_cast<__m256i*>(cnt + k);
    const __m256 v = load8(row + k);
    _mm256_storeu_si256(c, _mm256_sub_epi32(_mm256_loadu_si256(c), gt_mask(v, t)));
    store_relu8(out + k, row + k, v);
  }
  for (; k < n; ++k) {
    const T v = row[k];
    cnt[k] += static_cast<float>(v) > thr;
    out[k] = relu_of(v);
  }
}

template <typename T>
EGP_AVX2 void add_row_avx2(const T* __restrict row, int64_t n, float thr, int32_t* __restrict cnt) {
  const __m256 t = _mm256_set1_ps(thr);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256i* c = reinterpret_cast<__m256i*>(cnt + k);
    _mm256_storeu_si256(c, _mm256_sub_epi32(_mm256_loadu_si256(c), gt_mask(load8(row + k), t)));
  }
  for (; k < n; ++k) cnt[k] += static_cast<float>(row[k]) > thr;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
#endif

// 1: the AVX2 loops run where the CPU has them (the default); 0: the plain loops only (tests).
std::atomic<int> g_vector_mode{1};

bool vector_on() { return g_vector_mode.load(std::memory_order_relaxed) != 0 && cpu_has_avx2(); }

// The two loops of a dtype: AVX2 where it exists and is on, plain otherwise.
template <typename T>
struct Loops {
  bool vec;
  acc_t<T> thr;
  // Count of p[0, n); with `out`, also out[i] = relu(p[i]).
  int64_t count(const T* p, int64_t n, T* out = nullptr) const {
    int64_t total = 0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      T* o = out != nullptr ? out + b : nullptr;
#ifdef EGP_SIGN_COUNT_AVX2
      if constexpr (kHasVector<T>) {
        if (vec) {
          total += o != nullptr ? count_relu_run_avx2(p + b, o, m, thr) : count_run_avx2(p + b, m, thr);
          continue;
        }
      }
#endif
      total += count_run_plain(p + b, m, thr, o);
    }
    return total;
  }
  void add_row(const T* row, int64_t n, int32_t* cnt, T* out = nullptr) const {
#ifdef EGP_SIGN_COUNT_AVX2
    if constexpr (kHasVector<T>) {
      if (vec) {
        if (out != nullptr) return add_row_relu_avx2(row, out, n, thr, cnt);
        return add_row_avx2(row, n, thr, cnt);
      }
    }
#endif
    add_row_plain(row, n, thr, cnt, out);
  }
};

template <typename T>
void planes(const T* z, int64_t outer, int64_t C, int64_t inner, const Loops<T>& loops, int64_t* counts,
            int64_t cstride, T* out = nullptr) {
  std::mutex mu;
  const int64_t np = outer * C;
  // Grain: enough planes that a task reads ~64K elements, so tiny planes do not pay per-task cost.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(inner, 1));
  at::parallel_for(0, np, grain, [&](int64_t pb, int64_t pe) {
    std::vector<int64_t> local(C, 0);
    // The channel of plane p is p % C: stepped, not divided, since small planes (2x2 maps of
    // a late ResNet stage) would otherwise spend most of their time in that division.
    int64_t c = pb % C;
    for (int64_t p = pb; p < pe; ++p) {
      const T* run = z + p * inner;
      T* o = out != nullptr ? out + p * inner : nullptr;
      if (inner < 8) {
        local[c] += count_run_plain(run, inner, loops.thr, o);
      } else {
        local[c] += loops.count(run, inner, o);
      }
      if (++c == C) c = 0;
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t c = 0; c < C; ++c) counts[c * cstride] += local[c];
  });
}

// Rows of `width` = C * inner values (one sample's slab of an [outer, C, inner] tensor; inner == 1
// is the channels-last layout), each thread adding whole rows into its own int32 counters, one
// per position of the row: a straight vectorised loop however small the planes are. The
// position counters are folded into channels (sums of `inner` neighbours) when a thread ends.
template <typename T>
void rows(const T* z, int64_t nrows, int64_t C, int64_t inner, const Loops<T>& loops, int64_t* counts,
          int64_t cstride, T* out = nullptr) {
  std::mutex mu;
  const int64_t width = C * inner;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(width, 1));
  at::parallel_for(0, nrows, grain, [&](int64_t rb, int64_t re) {
    std::vector<int32_t> local(width, 0);
    std::vector<int64_t> wide(C, 0);
    int32_t* __restrict cnt = local.data();
    for (int64_t b = rb; b < re; b += kBlock) {
      const int64_t e = std::min(re, b + kBlock);
      for (int64_t r = b; r < e; ++r) loops.add_row(z + r * width, width, cnt, out != nullptr ? out + r * width : nullptr);
      for (int64_t c = 0; c < C; ++c) {
        int64_t s = 0;
        for (int64_t j = 0; j < inner; ++j) s += cnt[c * inner + j];
        wide[c] += s;
      }
      std::fill(local.begin(), local.end(), 0);
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t c = 0; c < C; ++c) counts[c * cstride] += wide[c];
  });
}

// Small planes (under 64 values: late CNN stages, where a per-plane loop is mostly overhead) are
// walked as wide rows when each thread still gets rows to itself and a row's counters stay
// cache-sized; larger planes (or few samples) one plane at a time, which reads z only.
inline bool use_rows(int64_t outer, int64_t C, int64_t inner) {
  if (inner == 1) return true;
  if (inner >= 64) return false;
  const int64_t width = C * inner;
  return width <= (int64_t{1} << 16) && (outer >= 2 * at::get_num_threads() || outer * width <= (int64_t{1} << 16));
}

// The count (and, with `out`, relu into out's data, laid out as z's) over a layout that walks
// z's own memory. `out` is null for the count alone.
void count_into(const at::Tensor& z, const at::Tensor& counts, int64_t dim, double threshold,
                const SignCountLayout& layout, const at::Tensor* out) {
  const int64_t C = z.size(dim);
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t cs = counts.stride(0);
  const bool channel_last = layout.channel_last;
  const int64_t inner = layout.inner;
  const int64_t outer = layout.outer;
  const bool vec = vector_on();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sign_count_cpu", [&] {
    using T = scalar_t;
    // Cast the threshold to z's dtype first, as `z > threshold` does in torch.
    const Loops<T> loops{vec, static_cast<acc_t<T>>(static_cast<T>(threshold))};
    const T* zp = layout.src.const_data_ptr<T>();
    T* op = out != nullptr ? out->data_ptr<T>() : nullptr;
    if (channel_last || use_rows(outer, C, inner)) {
      rows<T>(zp, outer, C, channel_last ? 1 : inner, loops, cp, cs, op);
    } else {
      planes<T>(zp, outer, C, inner, loops, cp, cs, op);
    }
  });
}

void sign_count_cpu(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim, double threshold) {
  TORCH_CHECK(z.device().is_cpu() && counts.device().is_cpu(),
              "sign_count_: z and counts must be CPU tensors for the CPU kernel");
  const int64_t dim = check_sign_count_args(z, counts, channel_dim, "CPU");
  if (z.numel() == 0) return;
  count_into(z, counts, dim, threshold, sign_count_layout(z, dim, z.size(dim)), nullptr);
}

// relu(z) into `out` (z itself, or empty_like(z)) and counts[c] += #(z > 0), one pass where the
// layout walks z's own memory and out has z's strides; otherwise count, then at::relu.
at::Tensor relu_sign_count_into(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim, bool inplace) {
  TORCH_CHECK(z.device().is_cpu() && counts.device().is_cpu(),
              "relu_sign_count: z and counts must be CPU tensors for the CPU kernel");
  const int64_t dim = check_sign_count_args(z, counts, channel_dim, "CPU");
  at::Tensor out = inplace ? z : at::empty_like(z);
  if (z.numel() == 0) return out;
  const SignCountLayout layout = sign_count_layout(z, dim, z.size(dim));
  const bool own_memory = layout.src.data_ptr() == z.data_ptr() && out.strides() == z.strides();
  if (!own_memory) {  // a strided view the count copies: count it, then the ordinary relu
    count_into(z, counts, dim, 0.0, layout, nullptr);
    return inplace ? at::relu_(out) : at::relu(z);
  }
  count_into(z, counts, dim, 0.0, layout, &out);
  return out;
}

at::Tensor relu_sign_count_cpu(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim) {
  return relu_sign_count_into(z, counts, channel_dim, false);
}

at::Tensor relu_sign_count_inplace_cpu(at::Tensor& z, const at::Tensor& counts, int64_t channel_dim) {
  relu_sign_count_into(z, counts, channel_dim, true);
  return z;
}

// Test hook, not public API: mode 0 runs only the plain loops, 1 the AVX2 loops where the CPU
// has AVX2 (the default); a negative mode changes nothing. Returns whether the AVX2 loops run
// now.
bool sign_count_vector_mode(int64_t mode) {
  if (mode >= 0) g_vector_mode.store(mode ? 1 : 0, std::memory_order_relaxed);
  return vector_on();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(egp_fast, m) {
  m.def("_sign_count_vector_mode(int mode) -> bool", &sign_count_vector_mode);
}

TORCH_LIBRARY_IMPL(egp_fast, CPU, m) {
  m.impl("sign_count_", &sign_count_cpu);
  m.impl("relu_sign_count", &relu_sign_count_cpu);
  m.impl("relu_sign_count_", &relu_sign_count_inplace_cpu);
}

}  // namespace egp_fast
