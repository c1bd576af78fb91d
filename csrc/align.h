// Declarations shared by the CPU op and the bindings.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace multimoe_rt {

int64_t align_padded_size(int64_t num_pairs, int64_t num_slots, int64_t block_m);

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_cpu(const at::Tensor& slot_ids, int64_t num_slots,
                                                         int64_t block_m);

#ifdef MULTIMOE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> align_cuda(const at::Tensor& slot_ids, int64_t num_slots,
                                                          int64_t block_m);
#endif

}  // namespace multimoe_rt
