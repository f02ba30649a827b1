// CUDA kernels of egp_fast: multi-block radix select (select_smallest, global_smallest) and
// sign_count_. One .cu file on purpose: each translation unit costs ~1.5 min of nvcc per arch.
//
// Select (fp32/fp16/bf16; fp64 weights are sent to the torch reference by the Python backend):
//   keys are the fp32 bits of |w|, NaNs clamped to one key above +inf (the rule of
//   egp_fast/ops/select.py), fp16/bf16 converted exactly to fp32 first. Every layer is cut in
//   tiles of kTile elements, one block per tile, tiles of all layers in one launch. A "problem"
//   is a set of layers sharing one budget: one per layer for select_smallest, one for all for
//   global_smallest. Three histogram passes (11/11/10 bits, most significant first, as AIR
//   Top-K does) each followed by a one-block-per-problem scan that picks the bucket holding the
//   k-th key and narrows the prefix, all on the device. One small device-to-host copy of the
//   per-problem state then says whether ties at the threshold must be split; if so, the ties are
//   counted per tile, scanned with at::cumsum, and the marking kernel ranks them in index order
//   with a block-wide scan. Otherwise marking is one pass: out = mask & (key > T).
//
// sign_count_ (fp32/fp16/bf16/fp64): NCHW-like layouts ([outer, C, inner], inner > 1) use one
//   warp per (o, c) plane with 16-byte loads and one 64-bit atomic per plane; channel-innermost
//   layouts ([rows, C]) give each thread a group of channels over many rows, reduce per block in
//   shared memory and flush one atomic per channel per block. Other strided views are copied
//   with .contiguous() first (rare; documented). The threshold is cast to z's dtype as torch does.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "sign_count/layout.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace egp_fast {
namespace {

// ------------------------------------------------------------------------------------------
// select
// ------------------------------------------------------------------------------------------

constexpr int kSelThreads = 256;
constexpr int64_t kTile = 256 * 32;  // elements per block and pass
constexpr int kMaxBins = 2048;
constexpr int kDigitBits[3] = {11, 11, 10};

enum DType : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct SegDesc {
  const void* w;
  const bool* m;
  bool* out;
  int64_t n;
  int64_t tile_begin;
  int64_t dtype;
  int64_t problem;
};

struct ProblemState {
  int64_t k;      // entries still to take inside the current prefix bucket
  int64_t n_eq;   // entries in the last chosen bucket (equal to T after the last pass)
  int64_t total;  // unpruned entries of the problem (pass 0)
  uint32_t prefix;
  int32_t active;  // 0: nothing to prune (k == 0), 1: selecting, -1: k > unpruned
  int64_t first_tile;
};

__device__ __forceinline__ uint32_t key_from_float(float v) {
  uint32_t b = __float_as_uint(v) & 0x7FFFFFFFu;
  return b < 0x7F800001u ? b : 0x7F800001u;
}

__device__ __forceinline__ uint32_t load_key(const SegDesc& s, int64_t i) {
  switch (s.dtype) {
    case kF16: {
      const uint16_t h = static_cast<const uint16_t*>(s.w)[i];
      return key_from_float(__half2float(__ushort_as_half(h)));
    }
    case kBF16: {
      const uint16_t h = static_cast<const uint16_t*>(s.w)[i];
      return key_from_float(__uint_as_float(static_cast<uint32_t>(h) << 16));
    }
    default:
      return key_from_float(static_cast<const float*>(s.w)[i]);
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ int find_seg(const SegDesc* segs, int nsegs, int64_t tile) {
  int lo = 0, hi = nsegs - 1;  // last segment whose tile_begin <= tile (empty segments own none)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__global__ void hist_kernel(const SegDesc* __restrict__ segs, int nsegs,
                            const ProblemState* __restrict__ states, unsigned long long* __restrict__ hist,
                            int done, int db) {
  __shared__ uint32_t sh[kMaxBins];
  const int64_t tile = blockIdx.x;
  const SegDesc s = segs[find_seg(segs, nsegs, tile)];
  const ProblemState st = states[s.problem];
  if (st.active != 1) return;
  const int nb = 1 << db;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const int64_t lo = (tile - s.tile_begin) * kTile;
  const int64_t hi = min64(s.n, lo + kTile);
  const int shift = 32 - done - db;
  const uint32_t dmask = static_cast<uint32_t>(nb - 1);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    if (!s.m[i]) continue;
    const uint32_t key = load_key(s, i);
    if (done > 0 && (key >> (32 - done)) != st.prefix) continue;
    atomicAdd(&sh[(key >> shift) & dmask], 1u);
  }
  __syncthreads();
  unsigned long long* h = hist + s.problem * kMaxBins;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    if (sh[b]) atomicAdd(&h[b], static_cast<unsigned long long>(sh[b]));
  }
}

// One block (1024 threads, two bins each) per problem: find the bucket holding the k-th key.
__global__ void scan_kernel(ProblemState* __restrict__ states, const unsigned long long* __restrict__ hist,
                            int first_pass, int db) {
  __shared__ unsigned long long part[1024];
  ProblemState& st = states[blockIdx.x];
  if (st.active != 1) return;
  const unsigned long long* h = hist + static_cast<int64_t>(blockIdx.x) * kMaxBins;
  const int nb = 1 << db;
  const int t = threadIdx.x;
  const unsigned long long a = (2 * t < nb) ? h[2 * t] : 0ull;
  const unsigned long long b = (2 * t + 1 < nb) ? h[2 * t + 1] : 0ull;
  part[t] = a + b;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) {  // inclusive Hillis-Steele scan
    const unsigned long long v = t >= off ? part[t - off] : 0ull;
    __syncthreads();
    part[t] += v;
    __syncthreads();
  }
  const unsigned long long total = part[1023];
  const unsigned long long before = part[t] - a - b;
  const unsigned long long k = static_cast<unsigned long long>(st.k);
  __syncthreads();
  if (first_pass && t == 0) st.total = static_cast<int64_t>(total);
  if (total < k) {
    if (t == 0) st.active = -1;
    return;
  }
  // Exactly one thread's two bins contain the k-th entry.
  if (before < k && k <= before + a + b) {
    const bool in_a = k <= before + a;
    const int bin = in_a ? 2 * t : 2 * t + 1;
    const unsigned long long below = in_a ? before : before + a;
    st.k = static_cast<int64_t>(k - below);
    st.n_eq = static_cast<int64_t>(in_a ? a : b);
    st.prefix = (st.prefix << db) | static_cast<uint32_t>(bin);
  }
}

__global__ void count_eq_kernel(const SegDesc* __restrict__ segs, int nsegs,
                                const ProblemState* __restrict__ states, int64_t* __restrict__ tile_eq) {
  __shared__ int warp_sum[kSelThreads / 32];
  const int64_t tile = blockIdx.x;
  const SegDesc s = segs[find_seg(segs, nsegs, tile)];
  const ProblemState st = states[s.problem];
  int n = 0;
  if (st.active == 1) {
    const int64_t lo = (tile - s.tile_begin) * kTile;
    const int64_t hi = min64(s.n, lo + kTile);
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      n += (s.m[i] && load_key(s, i) == st.prefix);
    }
  }
  for (int off = 16; off > 0; off >>= 1) n += __shfl_down_sync(0xFFFFFFFFu, n, off);
  if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kSelThreads / 32; ++w) total += warp_sum[w];
    tile_eq[tile] = total;
  }
}

// out = mask & (key > T), plus, with ties to split, the ties ranked >= k_rem in index order.
template <bool kTies>
__global__ void mark_kernel(const SegDesc* __restrict__ segs, int nsegs, const ProblemState* __restrict__ states,
                            const int64_t* __restrict__ tile_eq, const int64_t* __restrict__ tile_eq_cum) {
  __shared__ int warp_cnt[kSelThreads / 32];
  const int64_t tile = blockIdx.x;
  const SegDesc s = segs[find_seg(segs, nsegs, tile)];
  const ProblemState st = states[s.problem];
  const int64_t lo = (tile - s.tile_begin) * kTile;
  const int64_t hi = min64(s.n, lo + kTile);
  if (st.active != 1) {
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s.out[i] = s.m[i];
    return;
  }
  const uint32_t t = st.prefix;
  if (!kTies || st.k == st.n_eq) {
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s.out[i] = s.m[i] && load_key(s, i) > t;
    return;
  }
  // Ties before this tile, within this problem (cumsum runs over all tiles in order).
  int64_t rank = (tile_eq_cum[tile] - tile_eq[tile]) -
                 (tile_eq_cum[st.first_tile] - tile_eq[st.first_tile]);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t base = lo; base < hi; base += blockDim.x) {  // uniform trip count for the scan
    const int64_t i = base + threadIdx.x;
    bool keep = false, eq = false;
    if (i < hi && s.m[i]) {
      const uint32_t key = load_key(s, i);
      keep = key > t;
      eq = key == t;
    }
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, eq);
    if (lane == 0) warp_cnt[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, round = 0;
    for (int w = 0; w < kSelThreads / 32; ++w) {
      before += w < warp ? warp_cnt[w] : 0;
      round += warp_cnt[w];
    }
    before += __popc(ballot & ((1u << lane) - 1u));
    if (i < hi) s.out[i] = keep || (eq && rank + before >= st.k);
    rank += round;
    __syncthreads();
  }
}

int64_t dtype_code(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      return -1;
  }
}

// problem_of[i]: which problem segment i belongs to; ks[p]: budget of problem p.
std::vector<at::Tensor> select_cuda(at::TensorList weights, at::TensorList masks,
                                    const std::vector<int64_t>& problem_of, const std::vector<int64_t>& ks,
                                    const char* op) {
  TORCH_CHECK(weights.size() == masks.size(), op, ": got ", weights.size(), " weights but ",
              masks.size(), " masks; pass one mask per weight");
  std::vector<at::Tensor> outs, keep;
  if (weights.empty()) return outs;
  const at::Device dev = weights[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<SegDesc> segs;
  int64_t tiles = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& m = masks[i];
    TORCH_CHECK(w.device() == dev && m.device() == dev, op, ": weights[", i, "] and masks[", i,
                "] must be on ", dev);
    const int64_t code = dtype_code(w.scalar_type());
    TORCH_CHECK(code >= 0, op, ": weights[", i, "] has dtype ", w.scalar_type(),
                "; the CUDA kernel takes float32, float16 or bfloat16 (use backend='torch' for others)");
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": masks[", i, "] must be bool (True = kept), got ",
                m.scalar_type());
    TORCH_CHECK(w.sizes() == m.sizes(), op, ": masks[", i, "] has shape ", m.sizes(), " but weights[", i,
                "] has ", w.sizes());
    at::Tensor wc = w.contiguous();
    at::Tensor mc = m.contiguous();
    at::Tensor out = at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t n = w.numel();
    segs.push_back({wc.data_ptr(), mc.data_ptr<bool>(), out.data_ptr<bool>(), n, tiles, code, problem_of[i]});
    tiles += (n + kTile - 1) / kTile;
    keep.push_back(wc);
    keep.push_back(mc);
    outs.push_back(out);
  }
  const int64_t np = static_cast<int64_t>(ks.size());
  std::vector<ProblemState> init(np);
  for (int64_t p = 0; p < np; ++p) {
    TORCH_CHECK(ks[p] >= 0, op, ": count ", ks[p], " is negative; counts must be >= 0");
    init[p] = {ks[p], 0, 0, 0u, ks[p] > 0 ? 1 : 0, 0};
  }
  for (int64_t i = static_cast<int64_t>(segs.size()) - 1; i >= 0; --i) {
    init[segs[i].problem].first_tile = segs[i].tile_begin;
  }
  if (tiles == 0) {  // every layer empty: nothing can be pruned
    for (int64_t p = 0; p < np; ++p) {
      TORCH_CHECK(ks[p] == 0, op, ": asked to prune ", ks[p], " entries but only 0 are unpruned");
    }
    return outs;
  }
  auto bytes = [](const void* p, size_t n) {
    at::Tensor t = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(t.data_ptr(), p, n);
    return t;
  };
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(dev);
  at::Tensor d_segs = bytes(segs.data(), segs.size() * sizeof(SegDesc)).to(u8);
  at::Tensor d_states = bytes(init.data(), init.size() * sizeof(ProblemState)).to(u8);
  at::Tensor d_hist = at::zeros({3, np, kMaxBins}, at::TensorOptions().dtype(at::kLong).device(dev));
  const auto* sp = reinterpret_cast<const SegDesc*>(d_segs.data_ptr());
  auto* stp = reinterpret_cast<ProblemState*>(d_states.data_ptr());
  auto* hp = reinterpret_cast<unsigned long long*>(d_hist.data_ptr<int64_t>());
  const int nsegs = static_cast<int>(segs.size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  int done = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int db = kDigitBits[pass];
    unsigned long long* h = hp + static_cast<int64_t>(pass) * np * kMaxBins;
    hist_kernel<<<static_cast<unsigned>(tiles), kSelThreads, 0, stream>>>(sp, nsegs, stp, h, done, db);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_kernel<<<static_cast<unsigned>(np), 1024, 0, stream>>>(stp, h, pass == 0 ? 1 : 0, db);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done += db;
  }
  // One small copy: errors, and whether any problem must split its ties.
  at::Tensor h_states = d_states.cpu();
  const auto* hs = reinterpret_cast<const ProblemState*>(h_states.data_ptr());
  bool ties = false;
  for (int64_t p = 0; p < np; ++p) {
    TORCH_CHECK(hs[p].active != -1, op, ": asked to prune ", ks[p], " entries but only ", hs[p].total,
                " are unpruned (True in the masks); ask for at most that many");
    ties = ties || (hs[p].active == 1 && hs[p].k < hs[p].n_eq);
  }
  if (ties) {
    at::Tensor tile_eq = at::empty({tiles}, at::TensorOptions().dtype(at::kLong).device(dev));
    count_eq_kernel<<<static_cast<unsigned>(tiles), kSelThreads, 0, stream>>>(sp, nsegs, stp,
                                                                              tile_eq.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor cum = at::cumsum(tile_eq, 0);
    mark_kernel<true><<<static_cast<unsigned>(tiles), kSelThreads, 0, stream>>>(
        sp, nsegs, stp, tile_eq.data_ptr<int64_t>(), cum.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    mark_kernel<false><<<static_cast<unsigned>(tiles), kSelThreads, 0, stream>>>(sp, nsegs, stp, nullptr,
                                                                                 nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The descriptor and state buffers are freed when this returns; the caching allocator keeps
  // them from reuse until the stream's queued kernels are done with them.
  return outs;
}

std::vector<at::Tensor> select_smallest_cuda(at::TensorList weights, at::TensorList masks,
                                             at::IntArrayRef counts) {
  TORCH_CHECK(counts.size() == weights.size(), "select_smallest: got ", counts.size(), " counts for ",
              weights.size(), " layers; pass one count per layer");
  std::vector<int64_t> problem_of(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) problem_of[i] = static_cast<int64_t>(i);
  return select_cuda(weights, masks, problem_of, counts.vec(), "select_smallest");
}

std::vector<at::Tensor> global_smallest_cuda(at::TensorList weights, at::TensorList masks, int64_t count) {
  std::vector<int64_t> problem_of(weights.size(), 0);
  return select_cuda(weights, masks, problem_of, {count}, "global_smallest");
}

// ------------------------------------------------------------------------------------------
// sign_count_
// ------------------------------------------------------------------------------------------

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<c10::Half>(c10::Half v) {
  return __half2float(__ushort_as_half(v.x));
}
template <>
__device__ __forceinline__ float to_acc<c10::BFloat16>(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}

// Counts of the sizeof(uint4)/sizeof(T) values packed in one 16-byte load.
template <typename T>
__device__ __forceinline__ int count_vec(const uint4& v, typename Acc<T>::type thr) {
  const T* e = reinterpret_cast<const T*>(&v);
  int n = 0;
#pragma unroll
  for (int j = 0; j < static_cast<int>(sizeof(uint4) / sizeof(T)); ++j) n += to_acc<T>(e[j]) > thr;
  return n;
}

template <typename T>
__global__ void sign_count_planes_kernel(const T* __restrict__ z, int64_t nplanes, int64_t C, int64_t inner,
                                         typename Acc<T>::type thr, unsigned long long* __restrict__ counts,
                                         int64_t cstride, bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  constexpr int kVec = sizeof(uint4) / sizeof(T);
  for (int64_t p = warp; p < nplanes; p += nwarps) {
    const T* base = z + p * inner;
    int n = 0;
    if (vec) {
      const uint4* v = reinterpret_cast<const uint4*>(base);
      const int64_t nv = inner / kVec;
#pragma unroll 4
      for (int64_t j = lane; j < nv; j += 32) n += count_vec<T>(__ldg(v + j), thr);
    } else {
      for (int64_t j = lane; j < inner; j += 32) n += to_acc<T>(base[j]) > thr;
    }
    for (int off = 16; off > 0; off >>= 1) n += __shfl_down_sync(0xFFFFFFFFu, n, off);
    if (lane == 0 && n) atomicAdd(counts + (p % C) * cstride, static_cast<unsigned long long>(n));
  }
}

// Rows of C contiguous channels. Thread t owns channel group g = t % groups (kVec channels when
// vectorised, else 1) and walks rows t / groups, t / groups + lanes_per_group, ... of its block's
// row range. Per-block totals meet in shared memory (C <= kMaxSharedC) before one atomic per
// channel; wider C goes straight to global atomics.
constexpr int kRowThreads = 256;
constexpr int64_t kMaxSharedC = 8192;

template <typename T>
__global__ void sign_count_rows_kernel(const T* __restrict__ z, int64_t nrows, int64_t C, int64_t rows_per_block,
                                       typename Acc<T>::type thr, unsigned long long* __restrict__ counts,
                                       int64_t cstride, bool vec) {
  extern __shared__ unsigned int shc[];
  constexpr int kVec = sizeof(uint4) / sizeof(T);
  const int width = vec ? kVec : 1;
  const int64_t groups = C / width;  // vec requires C % kVec == 0
  const bool use_shared = C <= kMaxSharedC;
  if (use_shared) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) shc[c] = 0;
    __syncthreads();
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min64(nrows, r0 + rows_per_block);
  // Channel groups handled by this block column: [g0, g0 + kRowThreads) when groups is wide.
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * kRowThreads;
  const int64_t gcount = min64(kRowThreads, groups - g0);
  const int64_t lanes = max64(1, kRowThreads / gcount);  // row lanes per group
  const int64_t g = g0 + threadIdx.x % gcount;
  const int64_t rl = threadIdx.x / gcount;
  if (rl < lanes) {
    int cnt[kVec > 1 ? kVec : 1];
#pragma unroll
    for (int j = 0; j < (kVec > 1 ? kVec : 1); ++j) cnt[j] = 0;
    for (int64_t r = r0 + rl; r < r1; r += lanes) {
      if (vec) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(z + r * C + g * kVec));
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < kVec; ++j) cnt[j] += to_acc<T>(e[j]) > thr;
      } else {
        cnt[0] += to_acc<T>(z[r * C + g]) > thr;
      }
    }
    for (int j = 0; j < width; ++j) {
      const int64_t c = g * width + j;
      if (!cnt[j]) continue;
      if (use_shared) {
        atomicAdd(shc + c, static_cast<unsigned int>(cnt[j]));
      } else {
        atomicAdd(counts + c * cstride, static_cast<unsigned long long>(cnt[j]));
      }
    }
  }
  if (use_shared) {
    __syncthreads();
    // Only this block column's channels were touched.
    const int64_t c_lo = g0 * width;
    const int64_t c_hi = min64(C, (g0 + gcount) * width);
    for (int64_t c = c_lo + threadIdx.x; c < c_hi; c += blockDim.x) {
      if (shc[c]) atomicAdd(counts + c * cstride, static_cast<unsigned long long>(shc[c]));
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void sign_count_cuda(const at::Tensor& z, const at::Tensor& counts, int64_t channel_dim, double threshold) {
  TORCH_CHECK(z.is_cuda() && counts.device() == z.device(),
              "sign_count_: z and counts must be on the same CUDA device");
  const int64_t dim = check_sign_count_args(z, counts, channel_dim, "CUDA");
  const int64_t C = z.size(dim);
  const auto dt = z.scalar_type();
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* cp = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const int64_t cs = counts.stride(0);

  const SignCountLayout layout = sign_count_layout(z, dim, C);
  const at::Tensor& src = layout.src;
  const bool channel_last = layout.channel_last;
  const int64_t inner = layout.inner;
  const int64_t outer = layout.outer;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, z.device().index()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "sign_count_cuda", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    const A thr = static_cast<A>(static_cast<T>(threshold));
    const T* zp = src.data_ptr<T>();
    constexpr int kVec = sizeof(uint4) / sizeof(T);
    if (!channel_last) {
      const int64_t nplanes = outer * C;
      const bool vec = aligned16(zp) && (inner % kVec) == 0;
      const int64_t blocks = std::min<int64_t>((nplanes + 7) / 8, static_cast<int64_t>(sms) * 8);
      sign_count_planes_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(zp, nplanes, C, inner,
                                                                                     thr, cp, cs, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const bool vec = aligned16(zp) && (C % kVec) == 0;
      const int64_t width = vec ? kVec : 1;
      const int64_t groups = C / width;
      const int64_t gx = (groups + kRowThreads - 1) / kRowThreads;
      // Enough row blocks to fill the GPU, each reading at least ~64 KB.
      const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
      const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
      const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(sms) * 8 / gx);
      const int64_t gy = std::min<int64_t>(std::min<int64_t>(want, (outer + min_rows - 1) / min_rows), 65535);
      const int64_t rpb = (outer + gy - 1) / gy;
      const size_t shmem = C <= kMaxSharedC ? static_cast<size_t>(C) * sizeof(unsigned int) : 0;
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>((outer + rpb - 1) / rpb));
      sign_count_rows_kernel<T><<<grid, kRowThreads, shmem, stream>>>(zp, outer, C, rpb, thr, cp, cs, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(egp_fast, CUDA, m) {
  m.impl("select_smallest", &select_smallest_cuda);
  m.impl("global_smallest", &global_smallest_cuda);
  m.impl("sign_count_", &sign_count_cuda);
}

}  // namespace egp_fast
