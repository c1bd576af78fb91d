// Fused delta terms on CPU: x @ D.T for a compressed delta D (delta.py's sign1 and int4 codecs), read
// straight from the packed bits/codes, so no call ever materialises a whole delta.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace multimoe_rt {

// x [M, k] (float32, bfloat16 or float16); bits uint8 [N, ceil(k/8)]; scale [N] (floating).
// Returns x @ (scale[:, None] * (2 * bit - 1)).T as float32 [M, N].
at::Tensor sign1_matmul(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& scale, int64_t k);

// x [M, k]; codes uint8 [N, ceil(k/2)] (low nibble = even column); scales [N, ceil(k/group)] (floating).
// Returns x @ ((code - 8) * scales[n, col // group]).T as float32 [M, N].
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t k,
                       int64_t group);

// Which kernels the ops use: "auto" (the CPU's best: avx2 where the CPU has AVX2+FMA, else scalar), or one
// forced for tests and benchmarks: "scalar", "direct" (AVX2 register-blocked FMA), "lut" (AVX2 table lookup,
// sign1 only; int4 then runs "direct"). Forcing an AVX2 kernel on a CPU without AVX2 raises.
void set_delta_cpu_kernel(const std::string& name);
std::string delta_cpu_kernel();
// What this CPU runs under "auto": "avx2" or "scalar".
std::string delta_cpu_isa();

}  // namespace multimoe_rt
