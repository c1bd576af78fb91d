// What the CPU kernels share for their AVX2 paths: the target attributes, the run-time check and a horizontal sum.
// The kernels are compiled for AVX2 + FMA + F16C by function attributes, not by -mavx2, so the wheel runs on any
// x86-64 and __builtin_cpu_supports picks them; other CPUs run the portable scalar loops.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MULTIMOE_X86_AVX2 1
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#endif

namespace multimoe_rt {

inline bool cpu_has_avx2() {
#ifdef MULTIMOE_X86_AVX2
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

#ifdef MULTIMOE_X86_AVX2
AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace multimoe_rt
