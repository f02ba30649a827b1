// Schemas of every egp_fast op, and the Python module egp_fast._C that carries them.
//
// Kernels live next to their op (csrc/select/select_cpu.cpp, csrc/sign_count/sign_count_cpu.cpp,
// csrc/masks/zero_pruned_cpu.cpp, csrc/cuda_kernels.cu), each ending with its TORCH_LIBRARY_IMPL
// block. The ops are reached from Python as torch.ops.egp_fast.<op>, so torch.compile and
// torch.library.opcheck see them; their fake (meta) implementations are registered in
// egp_fast/ops/_ext_backend.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(egp_fast, m) {
  // Per layer i, set exactly counts[i] more entries of masks[i] to False: the smallest |w| among
  // the True entries, ties by lower flat index, NaN after +inf. Returns new contiguous masks.
  m.def("select_smallest(Tensor[] weights, Tensor[] masks, int[] counts) -> Tensor[]");
  // The same with one budget over all layers, ranked as if concatenated in list order.
  m.def("global_smallest(Tensor[] weights, Tensor[] masks, int count) -> Tensor[]");
  // How many entries global_smallest would set False in each layer, without the masks.
  m.def("global_smallest_counts(Tensor[] weights, Tensor[] masks, int count) -> int[]");
  // counts[c] += #(z > threshold) along channel_dim; counts is int64 [C], updated in place.
  m.def("sign_count_(Tensor z, Tensor(a!) counts, int channel_dim, float threshold) -> ()");
  // relu(z), with counts[c] += #(z > 0) taken in the same pass (a measured ReLU); the second
  // form writes relu into z itself, as torch.relu_ does.
  m.def("relu_sign_count(Tensor z, Tensor(a!) counts, int channel_dim) -> Tensor");
  m.def("relu_sign_count_(Tensor(a!) z, Tensor(b!) counts, int channel_dim) -> Tensor(a!)");
  // t[i] = 0 (all bits clear) where pruned[i]; other entries unchanged. CPU only: the masks'
  // gradient hook and state re-zeroing (egp_fast/masks.py).
  m.def("zero_pruned_(Tensor(a!) t, Tensor pruned) -> ()");
}

// The outputs are bool masks and in-place integer counts: nothing to differentiate. A
// fallthrough lets weights that require grad pass through without an autograd kernel.
TORCH_LIBRARY_IMPL(egp_fast, Autograd, m) {
  m.impl("select_smallest", torch::CppFunction::makeFallthrough());
  m.impl("global_smallest", torch::CppFunction::makeFallthrough());
  m.impl("global_smallest_counts", torch::CppFunction::makeFallthrough());
  m.impl("sign_count_", torch::CppFunction::makeFallthrough());
  // relu_sign_count is only called without autograd (egp_fast.ops.relu_sign_count sends inputs
  // that need a gradient to the differentiable reference).
  m.impl("relu_sign_count", torch::CppFunction::makeFallthrough());
  m.impl("relu_sign_count_", torch::CppFunction::makeFallthrough());
  m.impl("zero_pruned_", torch::CppFunction::makeFallthrough());
}

namespace egp_fast {
void set_select_paths(int64_t bits);
std::vector<int64_t> select_path_counts(bool reset);
}  // namespace egp_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "egp_fast compiled kernels; the ops are registered as torch.ops.egp_fast.*";
  // Test hooks of the CPU select (csrc/select/select_cpu.cpp): not public API.
  m.def("_set_select_paths", &egp_fast::set_select_paths,
        "Which CPU select paths may run: bit 0 sampled, bit 1 two-pass (radix always); 3 = all");
  m.def("_select_path_counts", &egp_fast::select_path_counts, pybind11::arg("reset") = false,
        "Problems solved by the sampled, two-pass and radix paths since the last reset");
#ifdef EGP_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
