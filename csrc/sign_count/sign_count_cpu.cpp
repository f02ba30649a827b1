// CPU sign_count_: counts[c] += #(z > threshold) along the channel axis, one read of z, no
// temporaries the size of z.
//
// Layouts:
//  * contiguous z viewed as [outer, C, inner] with inner > 1 (NCHW, channel_dim=1): small planes
//    (under 64 values, a row of C * inner values fits 64K int32 counters, rows for every thread)
//    are walked as rows, like the channels-last layout below, with one counter per position of
//    the row; larger planes one (o, c) plane at a time, planes split over threads, each thread
//    summing into its own C counters;
//  * channel innermost in memory, i.e. z.movedim(channel_dim, -1) is contiguous (channels-last
//    NHWC storage of an NCHW tensor, [N, L, C], [N, H, W, C]): rows of C values, each thread
//    adding a row into its own int32 counters (flushed before they could overflow);
//  * any other strided layout (rare: sliced or transposed views) is first copied with
//    .contiguous(): a documented fallback that costs one copy of z.
// The comparison is done as torch does it: the threshold is first cast to z's dtype (a Python
// scalar adopts the tensor's dtype), then compared in float (double for fp64). NaN compares false,
// so it counts as OFF.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "layout.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace egp_fast {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Counts of one contiguous run; 32-bit partial sums vectorise, blocks keep them from overflowing.
template <typename T>
inline int64_t count_run(const T* p, int64_t n, acc_t<T> thr) {
  constexpr int64_t kBlock = int64_t{1} << 30;
  int64_t total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    int32_t s = 0;
    for (int64_t i = b; i < e; ++i) s += static_cast<acc_t<T>>(p[i]) > thr;
    total += s;
  }
  return total;
}

template <typename T>
void planes(const T* z, int64_t outer, int64_t C, int64_t inner, acc_t<T> thr, int64_t* counts,
            int64_t cstride) {
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
      if (inner <= 16) {
        int32_t s = 0;
        for (int64_t i = 0; i < inner; ++i) s += static_cast<acc_t<T>>(run[i]) > thr;
        local[c] += s;
      } else {
        local[c] += count_run(run, inner, thr);
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
void rows(const T* z, int64_t nrows, int64_t C, int64_t inner, acc_t<T> thr, int64_t* counts,
          int64_t cstride) {
  std::mutex mu;
  constexpr int64_t kFlush = int64_t{1} << 30;  // int32 counters overflow after 2^31 rows
  const int64_t width = C * inner;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(width, 1));
  at::parallel_for(0, nrows, grain, [&](int64_t rb, int64_t re) {
    std::vector<int32_t> local(width, 0);
    std::vector<int64_t> wide(C, 0);
    int32_t* __restrict cnt = local.data();
    for (int64_t b = rb; b < re; b += kFlush) {
      const int64_t e = std::min(re, b + kFlush);
      for (int64_t r = b; r < e; ++r) {
        const T* __restrict row = z + r * width;
        for (int64_t k = 0; k < width; ++k) cnt[k] += static_cast<acc_t<T>>(row[k]) > thr;
      }
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

void sign_count_cpu(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim, double threshold) {
  TORCH_CHECK(z.device().is_cpu() && counts.device().is_cpu(),
              "sign_count_: z and counts must be CPU tensors for the CPU kernel");
  const int64_t dim = check_sign_count_args(z, counts, channel_dim, "CPU");
  const int64_t C = z.size(dim);
  const auto dt = z.scalar_type();
  if (z.numel() == 0) return;
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t cs = counts.stride(0);

  const SignCountLayout layout = sign_count_layout(z, dim, C);
  const at::Tensor& src = layout.src;
  const bool channel_last = layout.channel_last;
  const int64_t inner = layout.inner;
  const int64_t outer = layout.outer;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "sign_count_cpu", [&] {
    using T = scalar_t;
    // Cast the threshold to z's dtype first, as `z > threshold` does in torch.
    const acc_t<T> thr = static_cast<acc_t<T>>(static_cast<T>(threshold));
    const T* zp = src.data_ptr<T>();
    if (channel_last || use_rows(outer, C, inner)) {
      rows<T>(zp, outer, C, channel_last ? 1 : inner, thr, cp, cs);
    } else {
      planes<T>(zp, outer, C, inner, thr, cp, cs);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(egp_fast, CPU, m) {
  m.impl("sign_count_", &sign_count_cpu);
}

}  // namespace egp_fast
