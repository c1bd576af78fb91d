// CPU kernels for the delta terms of delta_moe.moe_torch_delta: out[m, n] = sum_c x[m, c] * D[n, c], with D
// read from delta.py's packed layouts while multiplying, never materialised.
//
// Why these kernels: at decode a delta is meant to cost its bytes (K/8 per row for sign1, about K/2 for int4),
// not a dense matrix's.
// - sign1 "direct": signs expanded to +-1 floats 8 at a time from a [256][8] table, one FMA per 8 columns
//   per token. Cheapest for one or two tokens, but its FMAs grow with the tokens while the bytes do not.
// - sign1 "lut": for a block of byte columns j and 8 tokens at once (one per AVX2 lane), precompute the 256
//   signed sums sum_i +-x[8j+i]; a delta row then costs one 8-lane load and add per byte of bits for up to
//   8 tokens. The table block (32 byte columns, 256 KiB) is sized to stay in L2 while every row reads it.
// - int4 "direct": 8 codes dequantised in registers (broadcast, variable shift, mask, convert, one FMA with
//   the group scale, exact as delta.int4_decode's (q - 8) * scale), then one FMA per token.
// Rows are register-blocked (several output rows share each load of x) and split across torch threads.
//
// Run-time dispatch: the AVX2 functions carry target attributes, so this file builds without -mavx2 and the
// wheel runs on any x86-64; __builtin_cpu_supports picks them. Other CPUs run the portable scalar loops.

#include "delta_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "x86_avx2.h"

namespace multimoe_rt {
namespace {

enum Kernel : int { kAuto = 0, kScalar = 1, kDirect = 2, kLut = 3 };
std::atomic<int> g_kernel{kAuto};

// Up to this many tokens the sign1 direct kernel beats the table (measured on an AVX2 EPYC at the mid shape:
// direct 2x faster at 1-2 tokens, the table 1.3x faster at 4 and 2x at 16).
constexpr int64_t kSign1DirectMaxM = 3;
constexpr int64_t kLutBytes = 32;       // byte columns per sign1 table block: 32 * 256 entries * 32 B = 256 KiB
constexpr int64_t kMaxGroup = 1024;     // int4 group sizes the tail buffer holds
constexpr int64_t kRowGrain = 32;       // output rows per parallel task

// Whether this call runs the AVX2 kernels: on "auto" where the CPU has them, else as forced.
bool use_avx2(int forced) { return forced == kAuto ? cpu_has_avx2() : forced != kScalar; }

// x as float32 [M, kp], zero past column k: padded columns then add nothing whatever the packed bits there.
at::Tensor padded_fp32(const at::Tensor& x, int64_t kp) {
  at::Tensor xf = at::empty({x.size(0), kp}, x.options().dtype(at::kFloat));
  if (kp > x.size(1)) xf.narrow(1, x.size(1), kp - x.size(1)).zero_();
  xf.narrow(1, 0, x.size(1)).copy_(x);
  return xf;
}

// ------------------------------------------------------------------------------------------ scalar

void sign1_rows_scalar(const float* x, int64_t M, int64_t kp, const uint8_t* bits, int64_t bstride,
                       const float* scale, int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t nb = kp / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* b = bits + n * bstride;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * kp;
      float s = 0.f;
      for (int64_t j = 0; j < nb; ++j)
        for (int i = 0; i < 8; ++i) s += ((b[j] >> i) & 1) ? xm[8 * j + i] : -xm[8 * j + i];
      out[m * N + n] = scale[n] * s;
    }
  }
}

template <typename S>
void int4_rows_scalar(const float* x, int64_t M, int64_t kp, int64_t k, const uint8_t* codes, int64_t cstride,
                      const S* scales, int64_t sstride, int64_t group, int64_t n0, int64_t n1, float* out,
                      int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = codes + n * cstride;
    const S* s = scales + n * sstride;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * kp;
      float acc = 0.f;
      for (int64_t col = 0; col < k; ++col) {
        const int q = ((col & 1) ? (c[col / 2] >> 4) : (c[col / 2] & 15)) - 8;
        acc += static_cast<float>(q) * static_cast<float>(s[col / group]) * xm[col];
      }
      out[m * N + n] = acc;
    }
  }
}

#ifdef MULTIMOE_X86_AVX2
// ------------------------------------------------------------------------------------------ AVX2

struct SignTable {
  alignas(32) float v[256][8];  // v[byte][i] = +1 where bit i of byte is set, else -1
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) v[b][i] = ((b >> i) & 1) ? 1.f : -1.f;
  }
};

const SignTable& sign_table() {
  static const SignTable t;
  return t;
}

// MB tokens by R output rows, all of K. A sets of R * MB accumulators stay in registers; for one token two
// sets (even and odd bytes) keep enough independent FMA chains in flight to cover the FMA latency.
template <int MB, int R>
AVX2_FN void sign1_direct_tile(const float* x, int64_t kp, const uint8_t* bits, int64_t bstride,
                               const float* scale, int64_t n, float* out, int64_t N, const float (*tab)[8]) {
  constexpr int A = MB == 1 ? 2 : 1;
  const int64_t nb = kp / 8;
  __m256 acc[A][R][MB];
  const uint8_t* b[R];
  for (int r = 0; r < R; ++r) {
    b[r] = bits + (n + r) * bstride;
    for (int a = 0; a < A; ++a)
      for (int m = 0; m < MB; ++m) acc[a][r][m] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  // Eight bytes of bits per row in one load, then bytes by shifting: byte loads would double the loads.
  for (; j + 8 <= nb; j += 8) {
    uint64_t w[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(&w[r], b[r] + j, 8);
      // The next tile's bits, a line at a time (see int4_direct_tile).
      if (j % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(b[r] + R * bstride + j), _MM_HINT_T0);
    }
    for (int i = 0; i < 8; ++i) {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * kp + 8 * (j + i));
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_load_ps(tab[(w[r] >> (8 * i)) & 255]);
        for (int m = 0; m < MB; ++m) acc[i % A][r][m] = _mm256_fmadd_ps(s, xv[m], acc[i % A][r][m]);
      }
    }
  }
  for (; j < nb; ++j) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * kp + 8 * j);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_load_ps(tab[b[r][j]]);
      for (int m = 0; m < MB; ++m) acc[0][r][m] = _mm256_fmadd_ps(s, xv[m], acc[0][r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[0][r][m];
      if (A == 2) t = _mm256_add_ps(t, acc[A - 1][r][m]);
      out[m * N + n + r] = scale[n + r] * hsum(t);
    }
}

template <int MB>
AVX2_FN void sign1_direct_rows(const float* x, int64_t kp, const uint8_t* bits, int64_t bstride,
                               const float* scale, int64_t n0, int64_t n1, float* out, int64_t N) {
  constexpr int R = MB <= 2 ? 4 : 2;
  const float(*tab)[8] = sign_table().v;
  int64_t n = n0;
  for (; n + R <= n1; n += R) sign1_direct_tile<MB, R>(x, kp, bits, bstride, scale, n, out, N, tab);
  for (; n < n1; ++n) sign1_direct_tile<MB, 1>(x, kp, bits, bstride, scale, n, out, N, tab);
}

AVX2_FN void sign1_direct(const float* x, int64_t M, int64_t kp, const uint8_t* bits, int64_t bstride,
                          const float* scale, int64_t n0, int64_t n1, float* out, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * kp;
    float* om = out + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: sign1_direct_rows<1>(xm, kp, bits, bstride, scale, n0, n1, om, N); break;
      case 2: sign1_direct_rows<2>(xm, kp, bits, bstride, scale, n0, n1, om, N); break;
      case 3: sign1_direct_rows<3>(xm, kp, bits, bstride, scale, n0, n1, om, N); break;
      default: sign1_direct_rows<4>(xm, kp, bits, bstride, scale, n0, n1, om, N); break;
    }
  }
}

// table[j][byte] (8 lanes: tokens m0..m0+7) = sum_i (bit i of byte ? +1 : -1) * x[m][8(j0+j)+i], for j < nj.
// Built as two 16-entry nibble tables, each from two 4-entry pair tables, so every entry is a balanced sum
// of its eight terms (no cancellation from incremental updates).
AVX2_FN void sign1_lut_build(const float* x, int64_t M, int64_t kp, int64_t m0, int64_t j0, int64_t nj,
                             float* table) {
  const int64_t lanes = std::min<int64_t>(8, M - m0);
  for (int64_t j = 0; j < nj; ++j) {
    alignas(32) float col[8][8] = {};  // col[i][lane] = x[m0 + lane][8 (j0 + j) + i]
    for (int64_t l = 0; l < lanes; ++l)
      for (int i = 0; i < 8; ++i) col[i][l] = x[(m0 + l) * kp + 8 * (j0 + j) + i];
    __m256 half[2][16];
    for (int h = 0; h < 2; ++h) {
      const __m256 a = _mm256_load_ps(col[4 * h]), b = _mm256_load_ps(col[4 * h + 1]);
      const __m256 c = _mm256_load_ps(col[4 * h + 2]), d = _mm256_load_ps(col[4 * h + 3]);
      const __m256 zero = _mm256_setzero_ps();
      const __m256 na = _mm256_sub_ps(zero, a), nc = _mm256_sub_ps(zero, c);
      const __m256 ab[4] = {_mm256_sub_ps(na, b), _mm256_sub_ps(a, b), _mm256_add_ps(na, b), _mm256_add_ps(a, b)};
      const __m256 cd[4] = {_mm256_sub_ps(nc, d), _mm256_sub_ps(c, d), _mm256_add_ps(nc, d), _mm256_add_ps(c, d)};
      for (int nib = 0; nib < 16; ++nib) half[h][nib] = _mm256_add_ps(ab[nib & 3], cd[nib >> 2]);
    }
    float* t = table + j * 256 * 8;
    for (int byte = 0; byte < 256; ++byte)
      _mm256_store_ps(t + byte * 8, _mm256_add_ps(half[0][byte & 15], half[1][byte >> 4]));
  }
}

// acc[n][lane] += sum_{j < nj} table[j][bits[n][j0 + j]][lane] for rows n0..n1.
AVX2_FN void sign1_lut_rows(const uint8_t* bits, int64_t bstride, int64_t j0, int64_t nj, const float* table,
                            int64_t n0, int64_t n1, float* acc) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* b = bits + n * bstride + j0;
    // Four partial sums hide the add latency behind the table loads.
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t j = 0;
    for (; j + 4 <= nj; j += 4) {
      s0 = _mm256_add_ps(s0, _mm256_load_ps(table + ((j + 0) * 256 + b[j + 0]) * 8));
      s1 = _mm256_add_ps(s1, _mm256_load_ps(table + ((j + 1) * 256 + b[j + 1]) * 8));
      s2 = _mm256_add_ps(s2, _mm256_load_ps(table + ((j + 2) * 256 + b[j + 2]) * 8));
      s3 = _mm256_add_ps(s3, _mm256_load_ps(table + ((j + 3) * 256 + b[j + 3]) * 8));
    }
    for (; j < nj; ++j) s0 = _mm256_add_ps(s0, _mm256_load_ps(table + (j * 256 + b[j]) * 8));
    float* a = acc + n * 8;
    _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))));
  }
}

// A buffer of 32-byte aligned floats kept per calling thread: a fresh table per call would cost page faults
// comparable to the work at decode sizes.
float* aligned_scratch(std::vector<float>& buf, int64_t floats) {
  if (static_cast<int64_t>(buf.size()) < floats + 8) buf.assign(floats + 8, 0.f);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 31) & ~uintptr_t{31});
}

void sign1_lut(const float* x, int64_t M, int64_t kp, const uint8_t* bits, int64_t bstride, const float* scale,
               int64_t N, float* out) {
  thread_local std::vector<float> table_buf, acc_buf;
  float* table = aligned_scratch(table_buf, kLutBytes * 256 * 8);
  float* acc = aligned_scratch(acc_buf, N * 8);
  const int64_t nb = kp / 8;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    std::fill(acc, acc + N * 8, 0.f);
    for (int64_t j0 = 0; j0 < nb; j0 += kLutBytes) {
      const int64_t nj = std::min(kLutBytes, nb - j0);
      sign1_lut_build(x, M, kp, m0, j0, nj, table);
      at::parallel_for(0, N, kRowGrain * 4, [&](int64_t b, int64_t e) {
        sign1_lut_rows(bits, bstride, j0, nj, table, b, e, acc);
      });
    }
    const int64_t lanes = std::min<int64_t>(8, M - m0);
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t n = 0; n < N; ++n) out[(m0 + l) * N + n] = scale[n] * acc[n * 8 + l];
  }
}

// The 8 codes q (0..15) of the 4 bytes at p as floats, column order (low nibble first).
AVX2_INLINE __m256 int4_codes8(const uint8_t* p, __m256i shifts, __m256i mask) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shifts), mask));
}

// One group of columns (words * 8) for R rows whose codes start at cp[r], scales sv[r]:
// acc += s * (sum q x - 8 sum x), lane-wise; x8[m] holds the lane-wise 8 * sum x of this group (per call, not
// per row). The scale and the offset thus cost once per group and row instead of once per 8 codes; for one
// token two sets of partial sums (even and odd words) keep enough FMA chains in flight.
template <int MB, int R>
AVX2_INLINE void int4_group(const float* xg, int64_t kp, const uint8_t* const* cp, const float* sv,
                            const float* x8, int64_t x8_stride, int64_t words, __m256 (&acc)[R][MB]) {
  constexpr int A = MB == 1 ? 2 : 1;
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(15);
  __m256 part[A][R][MB];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) part[a][r][m] = _mm256_setzero_ps();
  for (int64_t w = 0; w < words; ++w) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(xg + m * kp + 8 * w);
    const int a = A == 2 ? static_cast<int>(w & 1) : 0;
    for (int r = 0; r < R; ++r) {
      const __m256 q = int4_codes8(cp[r] + 4 * w, shifts, mask);
      for (int m = 0; m < MB; ++m) part[a][r][m] = _mm256_fmadd_ps(q, xv[m], part[a][r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(sv[r]);
    for (int m = 0; m < MB; ++m) {
      __m256 p = part[0][r][m];
      if (A == 2) p = _mm256_add_ps(p, part[A - 1][r][m]);
      acc[r][m] = _mm256_fmadd_ps(s, _mm256_sub_ps(p, _mm256_loadu_ps(x8 + m * x8_stride)), acc[r][m]);
    }
  }
}

template <int MB, int R, typename S>
AVX2_FN void int4_direct_tile(const float* x, const float* x8, int64_t kp, int64_t k, const uint8_t* codes,
                              int64_t cstride, const S* scales, int64_t sstride, int64_t group, int64_t n, float* out,
                              int64_t N) {
  const int64_t gbytes = group / 2, words = group / 8, G = kp / group;
  const int64_t row_bytes = (k + 1) / 2;
  const int64_t full = row_bytes / gbytes;  // groups whose bytes all lie inside the row
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* cp[R];
  float sv[R];
  for (int64_t g = 0; g < full; ++g) {
    for (int r = 0; r < R; ++r) {
      cp[r] = codes + (n + r) * cstride + g * gbytes;
      sv[r] = static_cast<float>(scales[(n + r) * sstride + g]);
      // The next tile's codes, one cache line at a time as this tile reaches the same column: the hardware
      // prefetcher alone left a cold (DRAM-resident) delta at half the speed of a cached one.
      if ((g * gbytes) % 64 < gbytes) _mm_prefetch(reinterpret_cast<const char*>(cp[r] + R * cstride), _MM_HINT_T0);
    }
    int4_group<MB, R>(x + g * group, kp, cp, sv, x8 + g * 8, G * 8, words, acc);
  }
  if (full < G) {
    // The last group is cut short by the row's end: copy its bytes so no load reads past the row (or past
    // the tensor, for the last row). Its missing codes multiply zero-padded x.
    alignas(32) uint8_t tail[R][kMaxGroup / 2];
    const int64_t have = row_bytes - full * gbytes;
    for (int r = 0; r < R; ++r) {
      std::memset(tail[r], 0, gbytes);
      std::memcpy(tail[r], codes + (n + r) * cstride + full * gbytes, have);
      cp[r] = tail[r];
      sv[r] = static_cast<float>(scales[(n + r) * sstride + full]);
    }
    int4_group<MB, R>(x + full * group, kp, cp, sv, x8 + full * 8, G * 8, words, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) out[m * N + n + r] = hsum(acc[r][m]);
}

template <int MB, typename S>
AVX2_FN void int4_direct_rows(const float* x, const float* x8, int64_t kp, int64_t k, const uint8_t* codes,
                              int64_t cstride, const S* scales, int64_t sstride, int64_t group, int64_t n0,
                              int64_t n1, float* out, int64_t N) {
  constexpr int R = MB == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    int4_direct_tile<MB, R>(x, x8, kp, k, codes, cstride, scales, sstride, group, n, out, N);
  for (; n < n1; ++n) int4_direct_tile<MB, 1>(x, x8, kp, k, codes, cstride, scales, sstride, group, n, out, N);
}

// x8 [M, G * 8]: lane l of group g holds 8 * sum_w x[m, g * group + 8 w + l].
template <typename S>
AVX2_FN void int4_direct(const float* x, const float* x8, int64_t M, int64_t kp, int64_t k, const uint8_t* codes,
                         int64_t cstride, const S* scales, int64_t sstride, int64_t group, int64_t n0, int64_t n1,
                         float* out, int64_t N) {
  const int64_t x8_stride = kp / group * 8;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * kp;
    const float* x8m = x8 + m0 * x8_stride;
    float* om = out + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: int4_direct_rows<1>(xm, x8m, kp, k, codes, cstride, scales, sstride, group, n0, n1, om, N); break;
      case 2: int4_direct_rows<2>(xm, x8m, kp, k, codes, cstride, scales, sstride, group, n0, n1, om, N); break;
      case 3: int4_direct_rows<3>(xm, x8m, kp, k, codes, cstride, scales, sstride, group, n0, n1, om, N); break;
      default: int4_direct_rows<4>(xm, x8m, kp, k, codes, cstride, scales, sstride, group, n0, n1, om, N); break;
    }
  }
}
#endif  // MULTIMOE_X86_AVX2

// ------------------------------------------------------------------------------------------ checks

void check_x(const char* op, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, k], got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", t, " (other dtypes take the torch path)");
  TORCH_CHECK(k >= 0 && x.size(1) == k, op, ": x has ", x.size(1), " columns but k = ", k);
}

void check_packed(const char* op, const char* name, const at::Tensor& t, int64_t cols, const char* rule) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kByte, op, ": ", name, " must be uint8, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, op, ": ", name, " must be [N, ", rule, " = ", cols, "], got shape ",
              t.sizes());
}

void check_scale(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", s);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Rows may be strided (a slice of a pool), bytes within a row must be adjacent.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace

// ------------------------------------------------------------------------------------------ ops

at::Tensor sign1_matmul(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& scale, int64_t k) {
  const char* op = "multimoe_rt::sign1_matmul";
  check_x(op, x, k);
  check_packed(op, "bits", bits, (k + 7) / 8, "ceil(k/8)");
  const int64_t M = x.size(0), N = bits.size(0);
  check_scale(op, "scale", scale, {N});
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  if (k == 0) return out.zero_();
  const int64_t kp = (k + 7) / 8 * 8;
  const at::Tensor xf = padded_fp32(x, kp);
  const at::Tensor b = unit_inner_stride(bits);
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const uint8_t* bp = b.data_ptr<uint8_t>();
  const int64_t bstride = b.stride(0);
  const float* sp = s.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int forced = g_kernel.load();
#ifdef MULTIMOE_X86_AVX2
  if (use_avx2(forced)) {
    if (forced == kLut || (forced == kAuto && M > kSign1DirectMaxM)) {
      sign1_lut(xp, M, kp, bp, bstride, sp, N, op_);
      return out;
    }
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      sign1_direct(xp, M, kp, bp, bstride, sp, n0, n1, op_, N);
    });
    return out;
  }
#endif
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
    sign1_rows_scalar(xp, M, kp, bp, bstride, sp, n0, n1, op_, N);
  });
  return out;
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t k,
                       int64_t group) {
  const char* op = "multimoe_rt::int4_matmul";
  check_x(op, x, k);
  TORCH_CHECK(group >= 8 && group % 8 == 0 && group <= kMaxGroup, op,
              ": group must be a multiple of 8 in [8, ", kMaxGroup, "], got ", group);
  check_packed(op, "codes", codes, (k + 1) / 2, "ceil(k/2)");
  const int64_t M = x.size(0), N = codes.size(0), G = (k + group - 1) / group;
  check_scale(op, "scales", scales, {N, G});
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  if (k == 0) return out.zero_();
  const int64_t kp = G * group;
  const at::Tensor xf = padded_fp32(x, kp);
  const at::Tensor c = unit_inner_stride(codes);
  const at::Tensor s = unit_inner_stride(scales);
  const float* xp = xf.data_ptr<float>();
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const int64_t cstride = c.stride(0), sstride = s.stride(0);
  float* op_ = out.data_ptr<float>();
  const bool avx2 = use_avx2(g_kernel.load());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "int4_matmul", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
#ifdef MULTIMOE_X86_AVX2
    if (avx2) {  // int4 has one AVX2 kernel: "lut" runs it too
      // 8 * the lane-wise sums of x per group, [M, G, 8]: the -8 of every code, applied once per group.
      const at::Tensor x8 = xf.view({M, G, group / 8, 8}).sum(2).mul_(8.f).contiguous();
      const float* x8p = x8.data_ptr<float>();
      at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
        int4_direct(xp, x8p, M, kp, k, cp, cstride, sp, sstride, group, n0, n1, op_, N);
      });
      return;
    }
#endif
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      int4_rows_scalar(xp, M, kp, k, cp, cstride, sp, sstride, group, n0, n1, op_, N);
    });
  });
  return out;
}

void set_delta_cpu_kernel(const std::string& name) {
  int k;
  if (name == "auto") k = kAuto;
  else if (name == "scalar") k = kScalar;
  else if (name == "direct") k = kDirect;
  else if (name == "lut") k = kLut;
  else TORCH_CHECK(false, "set_delta_cpu_kernel: unknown kernel '", name, "' (auto, scalar, direct, lut)");
  TORCH_CHECK(k == kAuto || k == kScalar || cpu_has_avx2(), "set_delta_cpu_kernel: '", name,
              "' needs a CPU with AVX2 and FMA, this one has ", delta_cpu_isa());
  g_kernel.store(k);
}

std::string delta_cpu_kernel() {
  static const char* names[] = {"auto", "scalar", "direct", "lut"};
  return names[g_kernel.load()];
}

std::string delta_cpu_isa() { return cpu_has_avx2() ? "avx2" : "scalar"; }

}  // namespace multimoe_rt
