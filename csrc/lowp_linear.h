// Decode-shaped linear layers with bfloat16/float16 weights on CPU: x @ w.T read straight from the 16-bit
// weights, widened to float32 in registers. Why: on CPUs without native bf16 matmul (AVX2 without AVX512_BF16
// or AMX) PyTorch's bf16 CPU matmul runs far below its fp32 rate, so a bf16 decode step was compute-bound by
// the library although it reads half the bytes.
#pragma once

#include <ATen/ATen.h>

namespace multimoe_rt {

// x [M, K] (float32, bfloat16 or float16); w [N, K] bfloat16 or float16 with adjacent columns (rows may be
// strided, e.g. a slab slot or a column slice). Returns x @ w.T as [M, N] in x's dtype, accumulated in float32.
at::Tensor lowp_linear(const at::Tensor& x, const at::Tensor& w);

// The same function by the portable scalar loops whatever the CPU: the reference the SIMD kernel is tested
// against on machines that have it, and what CPUs without AVX2/FMA/F16C run.
at::Tensor lowp_linear_scalar(const at::Tensor& x, const at::Tensor& w);

}  // namespace multimoe_rt
