// How sign_count_ walks a tensor, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace egp_fast {

// z seen as [outer, C, inner] (C at `dim`). inner == 1 means the channel is the innermost axis
// (channels-last, [N, L, C]), which the kernels walk row by row. A view whose channel axis can
// be moved last without a copy is used as is; any other strided view is copied once.
struct SignCountLayout {
  at::Tensor src;
  bool channel_last;
  int64_t inner;
  int64_t outer;
};

// Argument checks shared by the CPU and CUDA kernels (device placement is each kernel's own
// check). Returns the wrapped channel dim.
inline int64_t check_sign_count_args(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim,
                                     const char* kernel) {
  TORCH_CHECK(z.dim() > 0, "sign_count_: z must have a channel dimension; got a 0-d tensor");
  const int64_t dim = at::maybe_wrap_dim(channel_dim, z.dim());
  const int64_t C = z.size(dim);
  TORCH_CHECK(counts.scalar_type() == at::kLong, "sign_count_: counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == C, "sign_count_: counts must have shape [", C,
              "] (channels of z along dim ", channel_dim, "), got ", counts.sizes());
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "sign_count_: the ",
              kernel, " kernel takes float32/float64/float16/bfloat16 z, got ", dt);
  return dim;
}

inline SignCountLayout sign_count_layout(const at::Tensor& z, int64_t dim, int64_t C) {
  at::Tensor src = z;
  bool channel_last = false;
  if (!z.is_contiguous()) {
    at::Tensor moved = z.movedim(dim, -1);
    if (moved.is_contiguous()) {
      src = moved;
      channel_last = true;
    } else {
      src = z.contiguous();  // rare strided view: one copy
    }
  }
  int64_t inner = 1;
  if (!channel_last) {
    for (int64_t d = dim + 1; d < src.dim(); ++d) inner *= src.size(d);
    channel_last = inner == 1;
  }
  return {src, channel_last, inner, z.numel() / (C * inner)};
}

}  // namespace egp_fast
