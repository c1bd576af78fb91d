// Binds the torch-free CUDA launcher (align_cuda.cu) to tensors as multimoe_rt::align_cuda.
// Compiled only where PyTorch has CUDA (its CUDA headers are missing from CPU builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "align.h"

extern "C" int multimoe_align_cuda(const void* slot_ids, int slot_is_int64, int64_t num_pairs, int64_t num_slots,
                                   int32_t block_m, int32_t* counts, int32_t* sorted_ids, int32_t* block_slot,
                                   int64_t p_max, int32_t* num_padded, cudaStream_t stream);

namespace multimoe_rt {

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_cuda(const at::Tensor& slot_ids, int64_t num_slots,
                                                          int64_t block_m) {
  TORCH_CHECK(slot_ids.dim() == 2, "multimoe_rt::align_cuda: slot_ids must be [T, K], got ", slot_ids.sizes());
  TORCH_CHECK(slot_ids.is_cuda(), "multimoe_rt::align_cuda: slot_ids must be on CUDA, got ", slot_ids.device());
  TORCH_CHECK(slot_ids.scalar_type() == at::kInt || slot_ids.scalar_type() == at::kLong,
              "multimoe_rt::align_cuda: slot_ids must be int32 or int64, got ", slot_ids.scalar_type());
  TORCH_CHECK(num_slots >= 1 && block_m >= 1 && block_m < (int64_t{1} << 30),
              "multimoe_rt::align_cuda: bad num_slots (", num_slots, ") or block_m (", block_m, ")");
  const c10::cuda::CUDAGuard guard(slot_ids.device());
  const int64_t num_pairs = slot_ids.numel();
  const int64_t p_max = align_padded_size(num_pairs, num_slots, block_m);
  auto opts = slot_ids.options().dtype(at::kInt);
  at::Tensor flat = slot_ids.contiguous();
  at::Tensor sorted_ids = at::empty({p_max}, opts);
  at::Tensor block_slot = at::empty({p_max / block_m}, opts);
  at::Tensor num_padded = at::empty({1}, opts);
  at::Tensor counts = at::empty({num_slots}, opts);
  const int err = multimoe_align_cuda(flat.data_ptr(), flat.scalar_type() == at::kLong, num_pairs, num_slots,
                                      static_cast<int32_t>(block_m), counts.data_ptr<int32_t>(),
                                      sorted_ids.data_ptr<int32_t>(), block_slot.data_ptr<int32_t>(), p_max,
                                      num_padded.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "multimoe_rt::align_cuda: launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {sorted_ids, block_slot, num_padded};
}

}  // namespace multimoe_rt

TORCH_LIBRARY_FRAGMENT(multimoe_rt, m) {
  m.def("align_cuda(Tensor slot_ids, int num_slots, int block_m) -> (Tensor, Tensor, Tensor)");
  m.impl("align_cuda", c10::DispatchKey::CUDA, TORCH_FN(multimoe_rt::align_cuda));
}
