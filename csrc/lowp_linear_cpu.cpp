// x @ w.T on CPU for decode shapes (few rows of x) with bfloat16/float16 weights, widened in registers.
//
// Why: PyTorch's CPU bf16 matmul on CPUs without native bf16 (AVX2, no AVX512_BF16/AMX) runs at a small
// fraction of its fp32 rate (measured on an AVX2 EPYC: 1.2 vs 60 GFLOP/s at 512^3), so bf16 decode was
// compute-bound although its weights are half the bytes. Here each weight is read once from memory, widened
// to float32 in a register and used for every token of a block of rows of x:
// - bf16: 16 weights per 256-bit load; a bf16 is the high half of its float32, so the even columns are
//   `v << 16` and the odd ones `v & 0xffff0000`, one integer op per 8 weights. x is stored in that lane
//   order (per 16 columns: the 8 even ones, then the 8 odd ones), so the dot products need no shuffles.
// - fp16: F16C's vcvtph2ps, 8 at a time, x in natural order.
// - Register blocking: MB tokens by R weight rows of accumulators; a weight vector feeds MB FMAs, an x
//   vector R FMAs. Columns are walked in chunks so one tile's weights stay in L1 while every block of
//   tokens reuses them, and the chunk of x stays in L2.
// - Threads split the output rows (at::parallel_for over tiles of R rows).
//
// Run-time dispatch as in delta_cpu.cpp: the SIMD functions carry target attributes, so the file builds
// without -mavx2 and the wheel runs on any x86-64; other CPUs run the scalar loops.

#include "lowp_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "x86_avx2.h"

namespace multimoe_rt {
namespace {

constexpr int64_t kStep = 16;  // columns per inner step: one 256-bit load of 16-bit weights

// x (any of the three input dtypes, any strides) as float32 [M, kp], zero past column k. `interleave`: per 16
// columns, the even ones then the odd ones (the bf16 kernel's lane order).
template <typename T>
void pack_x(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t k, int64_t kp, bool interleave, float* dst) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * s0;
    float* d = dst + m * kp;
    // Interleaving scatters the last partial group over its whole 16 slots: zero all of them first.
    std::fill(d + (interleave ? k / kStep * kStep : k), d + kp, 0.f);
    if (!interleave) {
      for (int64_t c = 0; c < k; ++c) d[c] = static_cast<float>(xm[c * s1]);
    } else {
      for (int64_t c = 0; c < k; ++c) {
        const int64_t i = c % kStep;
        d[c - i + (i & 1) * 8 + i / 2] = static_cast<float>(xm[c * s1]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ scalar

template <typename W, typename O>
void rows_scalar(const float* x, int64_t M, int64_t k, const W* w, int64_t ws, int64_t n0, int64_t n1, O* out,
                 int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = w + n * ws;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * k;
      float acc = 0.f;
      for (int64_t c = 0; c < k; ++c) acc += xm[c] * static_cast<float>(wn[c]);
      out[m * N + n] = static_cast<O>(acc);
    }
  }
}

#ifdef MULTIMOE_X86_AVX2
// ------------------------------------------------------------------------------------------ AVX2

// The two halves (8 float32 each) of 16 weights at p, in the lane order x is packed in.
struct Bf16W {
  static constexpr bool kInterleaved = true;
  template <int H>
  static AVX2_INLINE __m256 half(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (H == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

struct F16W {
  static constexpr bool kInterleaved = false;
  template <int H>
  static AVX2_INLINE __m256 half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * H)));
  }
};

// MB tokens (x rows, stride xs) by R weight rows (wp[r]) over `steps` steps of 16 columns: adds the lane-wise
// partial sums into part[(m * R + r) * 8 ..] (stores them where `first`). Each half of a step loads its MB x
// vectors once and widens each weight row's half once. One token alone keeps even and odd sums apart: R
// chains would not cover the FMA latency.
template <typename W, int MB, int R>
AVX2_FN void micro(const float* x, int64_t xs, const uint16_t* const* wp, int64_t steps, float* part, bool first) {
  constexpr int A = MB == 1 ? 2 : 1;
  __m256 acc[A][R][MB];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[a][r][m] = _mm256_setzero_ps();
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = wp[r];
  for (int64_t s = 0; s < steps; ++s) {
    const float* xk = x + s * kStep;
    {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(xk + m * xs);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = W::template half<0>(w[r] + s * kStep);
        for (int m = 0; m < MB; ++m) acc[0][r][m] = _mm256_fmadd_ps(wv, xv[m], acc[0][r][m]);
      }
    }
    {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(xk + 8 + m * xs);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = W::template half<1>(w[r] + s * kStep);
        for (int m = 0; m < MB; ++m) acc[A - 1][r][m] = _mm256_fmadd_ps(wv, xv[m], acc[A - 1][r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[0][r][m];
      if (A == 2) t = _mm256_add_ps(t, acc[A - 1][r][m]);
      float* p = part + (m * R + r) * 8;
      _mm256_storeu_ps(p, first ? t : _mm256_add_ps(t, _mm256_loadu_ps(p)));
    }
}

// Every token of x (M rows) against R weight rows over `steps` steps, in blocks of two tokens. Two by four
// keeps its 8 accumulators, 4 weights and 2 x vectors in registers; 3 x 4 spilled accumulators and 3 x 3 / 4 x 2
// measured slower (AVX2 EPYC, bf16 weights, M = 4..64).
template <typename W, int R>
AVX2_INLINE void token_blocks(const float* x, int64_t M, int64_t xs, const uint16_t* const* wp, int64_t steps,
                              float* part, bool first) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) micro<W, 2, R>(x + m * xs, xs, wp, steps, part + m * R * 8, first);
  if (m < M) micro<W, 1, R>(x + m * xs, xs, wp, steps, part + m * R * 8, first);
}

// Output rows n..n+R-1 for every token: chunks of `chunk` steps (weights of the tile stay in L1 across the
// token blocks), then the last partial step from a zero-padded copy so no load reads past a row (or past the
// tensor, for its last row).
template <typename W, typename O, int R>
AVX2_FN void tile(const float* x, int64_t M, int64_t kp, int64_t k, const uint16_t* w, int64_t ws, int64_t n,
                  int64_t chunk, float* part, O* out, int64_t N) {
  const int64_t full = k / kStep;
  const uint16_t* wp[R];
  for (int r = 0; r < R; ++r) wp[r] = w + (n + r) * ws;
  bool first = true;
  for (int64_t s0 = 0; s0 < full; s0 += chunk) {
    const uint16_t* wc[R];
    for (int r = 0; r < R; ++r) wc[r] = wp[r] + s0 * kStep;
    token_blocks<W, R>(x + s0 * kStep, M, kp, wc, std::min(chunk, full - s0), part, first);
    first = false;
  }
  if (full * kStep < k) {
    alignas(32) uint16_t tail[R][kStep];
    const uint16_t* tp[R];
    for (int r = 0; r < R; ++r) {
      std::memset(tail[r], 0, sizeof(tail[r]));
      std::memcpy(tail[r], wp[r] + full * kStep, (k - full * kStep) * sizeof(uint16_t));
      tp[r] = tail[r];
    }
    token_blocks<W, R>(x + full * kStep, M, kp, tp, 1, part, first);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * N + n + r] = static_cast<O>(hsum(_mm256_loadu_ps(part + (m * R + r) * 8)));
}

constexpr int kTileRows = 4;

template <typename W, typename O>
AVX2_FN void rows_simd(const float* x, int64_t M, int64_t kp, int64_t k, const uint16_t* w, int64_t ws, int64_t n0,
                       int64_t n1, O* out, int64_t N) {
  // Per-thread partial sums of one tile, [M][R][8]: allocating per call would cost more than the tile at M=1.
  thread_local std::vector<float> part_buf;
  if (static_cast<int64_t>(part_buf.size()) < M * kTileRows * 8) part_buf.resize(M * kTileRows * 8);
  float* part = part_buf.data();
  // Columns per chunk: one token block's x chunk (8 KiB) and the tile's weights (8 KiB) in L1, all of x's chunk
  // in L2 up to M = 64 (256 KiB); each chunk costs a store of the partial sums, so not much smaller. One block
  // of tokens reads the weights once anyway: no chunking there.
  const int64_t chunk = M <= 2 ? k / kStep + 1 : 1024 / kStep;
  int64_t n = n0;
  for (; n + kTileRows <= n1; n += kTileRows) tile<W, O, kTileRows>(x, M, kp, k, w, ws, n, chunk, part, out, N);
  for (; n < n1; ++n) tile<W, O, 1>(x, M, kp, k, w, ws, n, chunk, part, out, N);
}
#endif  // MULTIMOE_X86_AVX2

// ------------------------------------------------------------------------------------------ op

template <typename O>
void run(const float* x, int64_t M, int64_t kp, int64_t k, const at::Tensor& w, bool simd, O* out, int64_t N) {
  const int64_t ws = w.stride(0);
  // Tiles of kTileRows rows per task unit, so a task boundary never splits a tile; ~64 rows per task.
  constexpr int64_t tr = 4;
  const int64_t tiles = (N + tr - 1) / tr;
  const auto for_rows = [&](auto&& f) {
    at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) { f(t0 * tr, std::min(t1 * tr, N)); });
  };
  const bool bf16 = w.scalar_type() == at::kBFloat16;
#ifdef MULTIMOE_X86_AVX2
  static_assert(tr == kTileRows, "tasks must split on tile boundaries");
  if (simd) {
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    if (bf16)
      for_rows([&](int64_t n0, int64_t n1) { rows_simd<Bf16W, O>(x, M, kp, k, wp, ws, n0, n1, out, N); });
    else
      for_rows([&](int64_t n0, int64_t n1) { rows_simd<F16W, O>(x, M, kp, k, wp, ws, n0, n1, out, N); });
    return;
  }
#endif
  (void)simd;
  if (bf16) {
    const auto* wp = w.data_ptr<c10::BFloat16>();
    for_rows([&](int64_t n0, int64_t n1) { rows_scalar(x, M, k, wp, ws, n0, n1, out, N); });
  } else {
    const auto* wp = w.data_ptr<c10::Half>();
    for_rows([&](int64_t n0, int64_t n1) { rows_scalar(x, M, k, wp, ws, n0, n1, out, N); });
  }
}

at::Tensor lowp_linear_impl(const at::Tensor& x, const at::Tensor& w, bool allow_simd, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": x and w must be CPU tensors, got ", x.device(),
              " and ", w.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D [N, K], got shape ", w.sizes());
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf, op, ": w must be bfloat16 or float16, got ", wt,
              " (float32 weights take torch's matmul)");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x [M, K] and w [N, K] disagree on K: x ", x.sizes(), ", w ",
              w.sizes());
  const int64_t M = x.size(0), k = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (k == 0) return out.zero_();
  // Rows may be strided (a slab slot, a column slice); columns must be adjacent for the vector loads.
  const at::Tensor wc = (k == 1 || w.stride(1) == 1) ? w : w.contiguous();
  const bool simd = allow_simd && cpu_has_avx2();
  const int64_t kp = simd ? (k + kStep - 1) / kStep * kStep : k;
  at::Tensor xf = at::empty({M, kp}, x.options().dtype(at::kFloat));
  const bool interleave = simd && wt == at::kBFloat16;
  float* xp = xf.data_ptr<float>();
  if (xt == at::kFloat) pack_x(x.data_ptr<float>(), x.stride(0), x.stride(1), M, k, kp, interleave, xp);
  else if (xt == at::kBFloat16) pack_x(x.data_ptr<c10::BFloat16>(), x.stride(0), x.stride(1), M, k, kp, interleave, xp);
  else pack_x(x.data_ptr<c10::Half>(), x.stride(0), x.stride(1), M, k, kp, interleave, xp);
  if (xt == at::kFloat) run(xp, M, kp, k, wc, simd, out.data_ptr<float>(), N);
  else if (xt == at::kBFloat16) run(xp, M, kp, k, wc, simd, out.data_ptr<c10::BFloat16>(), N);
  else run(xp, M, kp, k, wc, simd, out.data_ptr<c10::Half>(), N);
  return out;
}

}  // namespace

at::Tensor lowp_linear(const at::Tensor& x, const at::Tensor& w) {
  return lowp_linear_impl(x, w, true, "multimoe_rt::lowp_linear");
}

at::Tensor lowp_linear_scalar(const at::Tensor& x, const at::Tensor& w) {
  return lowp_linear_impl(x, w, false, "multimoe_rt::lowp_linear_scalar");
}

}  // namespace multimoe_rt
