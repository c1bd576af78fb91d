// Python module multimoe_rt._C and the torch.library ops multimoe_rt::align_cpu (and ::align_cuda
// where built with CUDA). The module is imported for its side effect of registering the ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "align.h"

TORCH_LIBRARY_FRAGMENT(multimoe_rt, m) {
  m.def("align_cpu(Tensor slot_ids, int num_slots, int block_m) -> (Tensor, Tensor, Tensor)");
  m.impl("align_cpu", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::align_cpu));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "multimoe_rt C++ ops; the ops live in torch.ops.multimoe_rt";
#ifdef MULTIMOE_WITH_CUDA
  mod.attr("has_cuda_ops") = true;
#else
  mod.attr("has_cuda_ops") = false;
#endif
  mod.def("align_padded_size", &multimoe_rt::align_padded_size, "P_max of the align contract");
}
