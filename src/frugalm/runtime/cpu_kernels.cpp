// frugalm's CPU kernels (why each exists: cpu_kernels.py).
// frugalm::int8_rows: a few rows of bfloat16 activations times int8 weights with one scale per
// output row. Same contract and rounding as ATen's _weight_int8pack_mm (bfloat16 in and out,
// float32 accumulation).
// frugalm::codes_attention: one query token's attention over a packed KV cache's codes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;         // weight rows per block: the four share each load of x
constexpr int64_t kAhead = 4096;     // prefetch distance in bytes of weights
constexpr int64_t kChunk = 1 << 15;  // at least this many weight bytes per thread's share

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// out[r] = sum_k x[k] * w[r * K + k] for r < rows. The vector loop takes whole blocks of kRows
// rows and 16 (AVX-512) or 8 (AVX2) columns; the scalar loop the rest.
inline void dot_rows(const float* x, const int8_t* w, int64_t K, int64_t rows, float* out) {
  int64_t k = 0;
  float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512F__)
  if (rows == kRows) {
    __m512 v[kRows];
    for (int64_t r = 0; r < kRows; ++r) v[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int64_t r = 0; r < kRows; ++r) {
        const int8_t* p = w + r * K + k;
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + kAhead, _MM_HINT_T0);
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        v[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), xv, v[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_reduce_add_ps(v[r]);
  }
#elif defined(__AVX2__)
  if (rows == kRows) {
    __m256 v[kRows];
    for (int64_t r = 0; r < kRows; ++r) v[r] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int64_t r = 0; r < kRows; ++r) {
        const int8_t* p = w + r * K + k;
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + kAhead, _MM_HINT_T0);
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        v[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), xv, v[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) acc[r] = sum8(v[r]);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float s = acc[r];
    for (int64_t j = k; j < K; ++j) s += x[j] * static_cast<float>(w[r * K + j]);
    out[r] = s;
  }
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && scale.numel() == w.size(0),
              "int8_rows: x [M, K], w [N, K] and scale [N] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kBFloat16,
              "int8_rows: bfloat16 x, int8 w and bfloat16 scale expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_rows: CPU tensors expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  std::vector<float> xf(M * K);  // each activation widened once, not once per weight row
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  const int8_t* wp = wc.data_ptr<int8_t>();
  const c10::BFloat16* sp = sc.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, kRows * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float out[kRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kRows, rows = std::min(kRows, N - n);
      for (int64_t m = 0; m < M; ++m) {
        dot_rows(xf.data() + m * K, wp + n * K, K, rows, out);
        for (int64_t r = 0; r < rows; ++r)
          yp[m * N + n + r] = c10::BFloat16(out[r] * static_cast<float>(sp[n + r]));
      }
    }
  });
  return y;
}


// --- attention over a packed KV cache's codes (runtime/kv_cache._codes_step_attention) --------
// One query token per sequence (M query heads per KV head) attends over [past as codes, window
// in float]: a past key is s (c - z), so q . k = s (q . c) - s z sum(q), and the values mix as
// sum_t p_t s_t c_t - sum_t p_t s_t z_t. Each (sequence, KV head, span of tokens) is one task:
// it widens each code row to float once (for all M queries), scores, softmaxes within the span,
// and mixes; the spans' partial results are then combined (flash-decoding's split softmax). So
// the past is read once, as bytes, and the whole step is one call instead of ~17 small ops.

constexpr int64_t kSpan = 256;  // tokens per task

// e^x for x <= 0 (0 at -inf): Cephes' expf polynomial, ~1e-7 relative, in plain arithmetic the
// compiler vectorizes (std::exp is a scalar libm call here).
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : y * scale;
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes (the compiler leaves the scalar one unvectorized)
inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), y);
}
#endif

// p[j] = e^(p[j] - base) for j < n; returns their sum
inline float exp_in_place(float* p, int64_t n, float base) {
  int64_t j = 0;
  float l = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 b = _mm512_set1_ps(base);
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + j), b));
    _mm512_storeu_ps(p + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  l = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - base);
    l += p[j];
  }
  return l;
}

// row[0..D) = the codes of one head vector, widened: int8 one per byte, int4 two (low nibble first)
inline void widen(const uint8_t* c, int64_t D, int64_t bits, float* row) {
  if (bits == 8) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(c[d]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < D / 2; ++j) {
      row[2 * j] = static_cast<float>(c[j] & 0x0F);
      row[2 * j + 1] = static_cast<float>(c[j] >> 4);
    }
  }
}

// One int8 code row (D = 16 C) against M queries, and mixed into M accumulators, widened once in
// registers: what the loops below compile to only with per-token overheads that cost ~5x.
#if defined(__AVX512F__)
template <int C>
void score_row8(const uint8_t* c, const float* q, int64_t M, float* dots) {
  __m512 r[C];
  for (int k = 0; k < C; ++k)
    r[k] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * k))));
  for (int64_t m = 0; m < M; ++m) {
    const float* qm = q + m * 16 * C;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qm), r[0]);
    for (int k = 1; k < C; ++k) a = _mm512_fmadd_ps(_mm512_loadu_ps(qm + 16 * k), r[k], a);
    dots[m] = _mm512_reduce_add_ps(a);
  }
}

template <int C>
void mix_row8(const uint8_t* c, const float* w, int64_t M, float* acc) {
  __m512 r[C];
  for (int k = 0; k < C; ++k)
    r[k] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * k))));
  for (int64_t m = 0; m < M; ++m) {
    const __m512 wm = _mm512_set1_ps(w[m]);
    float* a = acc + m * 16 * C;
    for (int k = 0; k < C; ++k) _mm512_storeu_ps(a + 16 * k, _mm512_fmadd_ps(wm, r[k], _mm512_loadu_ps(a + 16 * k)));
  }
}
#endif

using ScoreRow = void (*)(const uint8_t*, const float*, int64_t, float*);
using MixRow = void (*)(const uint8_t*, const float*, int64_t, float*);

// The register-widened row functions for this head size, or nulls (the generic loops).
std::pair<ScoreRow, MixRow> row_kernels(int64_t D, int64_t bits) {
#if defined(__AVX512F__)
  if (bits == 8) switch (D) {
      case 16: return {&score_row8<1>, &mix_row8<1>};
      case 32: return {&score_row8<2>, &mix_row8<2>};
      case 64: return {&score_row8<4>, &mix_row8<4>};
      case 128: return {&score_row8<8>, &mix_row8<8>};
      case 256: return {&score_row8<16>, &mix_row8<16>};
      default: break;
    }
#endif
  return {nullptr, nullptr};
}

// q float [B, H, M, D] (scaled); codes uint8 [2, B, H, S, D * bits / 8] (keys, values); scale and
// shift float [2, B, H, S] (s and s z per token); keys, values float [B, H, R, D] (the window);
// mask: none or additive float [B, 1 or H, 1 or M, S + R]. Returns float [B, H, M, D].
at::Tensor codes_attention(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& keys, const at::Tensor& values,
                           const std::optional<at::Tensor>& mask, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "codes_attention: bits 8 or 4");
  TORCH_CHECK(q.dim() == 4 && codes.dim() == 5 && scale.dim() == 4 && shift.dim() == 4 && keys.dim() == 4 &&
                  values.dim() == 4 && codes.stride(4) == 1,
              "codes_attention: q [B, H, M, D], codes [2, B, H, S, D*bits/8], scale/shift [2, B, H, S], window [B, H, R, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && codes.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                  shift.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat,
              "codes_attention: float32 tensors and uint8 codes expected");
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), M = qc.size(2), D = qc.size(3);
  const int64_t S = codes.size(3), R = kc.size(2), T = S + R;
  TORCH_CHECK(codes.size(4) * 8 / bits == D && kc.size(3) == D && scale.size(3) == S && shift.size(3) == S,
              "codes_attention: shapes disagree");
  at::Tensor mc;
  int64_t mb = 0, mh = 0, mm = 0;  // the mask's strides over batch, heads and queries (0: broadcast)
  if (mask.has_value()) {
    mc = mask->contiguous();
    TORCH_CHECK(mc.scalar_type() == at::kFloat && mc.dim() == 4 && mc.size(3) == T, "codes_attention: mask [B, 1|H, 1|M, S+R] float");
    mb = mc.size(0) == 1 ? 0 : mc.stride(0);
    mh = mc.size(1) == 1 ? 0 : mc.stride(1);
    mm = mc.size(2) == 1 ? 0 : mc.stride(2);
  }
  const float* qp = qc.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* scp = scale.data_ptr<float>();
  const float* shp = shift.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const float* mp = mask.has_value() ? mc.data_ptr<float>() : nullptr;
  const int64_t cs[4] = {codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3)};
  const int64_t ss[4] = {scale.stride(0), scale.stride(1), scale.stride(2), scale.stride(3)};
  const int64_t hs[4] = {shift.stride(0), shift.stride(1), shift.stride(2), shift.stride(3)};
  const int64_t spans = (T + kSpan - 1) / kSpan, tasks = B * H * spans;
  std::vector<float> part_max(tasks * M), part_sum(tasks * M), part_acc(tasks * M * D);

  const auto [score_row, mix_row] = row_kernels(D, bits);
  at::parallel_for(0, tasks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(D), score(M * kSpan), sk(kSpan), zk(kSpan), sv(kSpan), zv(kSpan), qsum(M), dots(M), w(M);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / spans, b = bh / H, h = bh % H, t0 = (i % spans) * kSpan;
      const int64_t n = std::min(kSpan, T - t0), np = std::clamp<int64_t>(S - t0, 0, n);  // tokens, of which past
      const float* qh = qp + bh * M * D;
      const int64_t ct = cs[3];
      const uint8_t* ck = cp + b * cs[1] + h * cs[2] + t0 * ct;
      const uint8_t* cv = ck + cs[0];
      {  // the span's per-token factors, gathered once
        const float* s0 = scp + b * ss[1] + h * ss[2] + t0 * ss[3];
        const float* z0 = shp + b * hs[1] + h * hs[2] + t0 * hs[3];
        const int64_t st = ss[3], zt = hs[3];
        for (int64_t j = 0; j < np; ++j) {
          sk[j] = s0[j * st], zk[j] = z0[j * zt];
          sv[j] = s0[ss[0] + j * st], zv[j] = z0[hs[0] + j * zt];
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += qh[m * D + d];
        qsum[m] = sum;
      }
      for (int64_t j = 0; j < n; ++j) {  // raw scores q . c (past) and q . k (window)
        const float* r = row.data();
        if (j < np && score_row) {
          score_row(ck + j * ct, qh, M, dots.data());
        } else {
          if (j < np) widen(ck + j * ct, D, bits, row.data());
          else r = kp + (bh * R + t0 + j - S) * D;
          for (int64_t m = 0; m < M; ++m) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qh[m * D + d] * r[d];
            dots[m] = dot;
          }
        }
        for (int64_t m = 0; m < M; ++m) score[m * kSpan + j] = dots[m];
      }
      float* mx = part_max.data() + i * M;
      float* sum = part_sum.data() + i * M;
      float* acc = part_acc.data() + i * M * D;
      std::fill(acc, acc + M * D, 0.f);
      for (int64_t m = 0; m < M; ++m) {  // scales, mask, the span's softmax numerators
        float* p = score.data() + m * kSpan;
        const float qs = qsum[m];
#pragma omp simd
        for (int64_t j = 0; j < np; ++j) p[j] = sk[j] * p[j] - zk[j] * qs;
        if (mp) {
          const float* mr = mp + b * mb + h * mh + m * mm + t0;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] += mr[j];
        }
        float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < n; ++j) top = p[j] > top ? p[j] : top;
        const float base = std::isinf(top) ? 0.f : top;  // a wholly masked span adds nothing
        const float l = exp_in_place(p, n, base);
        float corr = 0.f;
#pragma omp simd reduction(+ : corr)
        for (int64_t j = 0; j < np; ++j) {
          corr += p[j] * zv[j];
          p[j] *= sv[j];  // the past's weights now carry their value scale
        }
        mx[m] = top, sum[m] = l;
        for (int64_t d = 0; d < D; ++d) acc[m * D + d] = -corr;
      }
      for (int64_t j = 0; j < n; ++j) {  // mix the values
        for (int64_t m = 0; m < M; ++m) w[m] = score[m * kSpan + j];
        if (j < np && mix_row) {
          mix_row(cv + j * ct, w.data(), M, acc);
          continue;
        }
        const float* r = row.data();
        if (j < np) widen(cv + j * ct, D, bits, row.data());
        else r = vp + (bh * R + t0 + j - S) * D;
        for (int64_t m = 0; m < M; ++m) {
          float* a = acc + m * D;
          const float wm = w[m];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += wm * r[d];
        }
      }
    }
  });

  at::Tensor out = at::empty({B, H, M, D}, qc.options());  // the spans combined
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t m = 0; m < M; ++m) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < spans; ++c) top = std::max(top, part_max[(bh * spans + c) * M + m]);
      float denom = 0.f;
      float* o = op + (bh * M + m) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t k = (bh * spans + c) * M + m;
        if (std::isinf(part_max[k])) continue;
        const float w = std::exp(part_max[k] - top);
        denom += w * part_sum[k];
        for (int64_t d = 0; d < D; ++d) o[d] += w * part_acc[k * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= denom;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY(frugalm, m) {
  m.def("int8_rows(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("codes_attention(Tensor q, Tensor codes, Tensor scale, Tensor shift, Tensor keys, Tensor values, Tensor? mask, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(frugalm, CPU, m) {
  m.impl("int8_rows", &int8_rows);
  m.impl("codes_attention", &codes_attention);
}
