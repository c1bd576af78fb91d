// Python module multimoe_rt._C and the torch.library ops multimoe_rt::align_cpu, ::sign1_matmul,
// ::int4_matmul, ::lowp_linear, ::lowp_linear_scalar (and ::align_cuda where built with CUDA). The module is
// imported for its side effect of registering the ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "align.h"
#include "delta_cpu.h"
#include "lowp_linear.h"

TORCH_LIBRARY_FRAGMENT(multimoe_rt, m) {
  m.def("align_cpu(Tensor slot_ids, int num_slots, int block_m) -> (Tensor, Tensor, Tensor)");
  m.impl("align_cpu", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::align_cpu));
  m.def("sign1_matmul(Tensor x, Tensor bits, Tensor scale, int k) -> Tensor");
  m.impl("sign1_matmul", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::sign1_matmul));
  m.def("int4_matmul(Tensor x, Tensor codes, Tensor scales, int k, int group) -> Tensor");
  m.impl("int4_matmul", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::int4_matmul));
  m.def("lowp_linear(Tensor x, Tensor w) -> Tensor");
  m.impl("lowp_linear", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::lowp_linear));
  m.def("lowp_linear_scalar(Tensor x, Tensor w) -> Tensor");
  m.impl("lowp_linear_scalar", c10::DispatchKey::CPU, TORCH_FN(multimoe_rt::lowp_linear_scalar));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "multimoe_rt C++ ops; the ops live in torch.ops.multimoe_rt";
#ifdef MULTIMOE_WITH_CUDA
  mod.attr("has_cuda_ops") = true;
#else
  mod.attr("has_cuda_ops") = false;
#endif
  mod.def("align_padded_size", &multimoe_rt::align_padded_size, "P_max of the align contract");
  mod.def("set_delta_cpu_kernel", &multimoe_rt::set_delta_cpu_kernel,
          "force the CPU delta kernels: auto, scalar, direct or lut (tests, benchmarks)");
  mod.def("delta_cpu_kernel", &multimoe_rt::delta_cpu_kernel, "the forced CPU delta kernel, or auto");
  mod.def("delta_cpu_isa", &multimoe_rt::delta_cpu_isa, "what the CPU delta ops run on auto: avx2 or scalar");
}
