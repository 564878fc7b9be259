// The fused soft-value kernel for CPUs (see soft_values_cpu.h for the math).
//
// Each OpenMP thread owns a contiguous range of rows and walks the whole vocabulary in tiles:
//   1. pack the weight tile [VB, D] into the SIMD path's layout (k-major, so a micro-kernel reads
//      a vector of columns per k step), with its bias;
//   2. for each micro-tile of MR rows: pack the hidden rows, compute the MR x VB logits with
//      broadcast-times-vector FMAs (vdpbf16ps on bf16 pairs where the CPU has AVX512_BF16), then fold
//      the tile into each row's running (max, sum, entropy sum, target logit), base 2, 1/alpha folded in.
// A row's arithmetic depends only on its own values and the fixed tiling (a function of D, V and the
// SIMD path), so results are deterministic and independent of the other rows and of the thread count.
// The SIMD paths are compiled with per-function target attributes: one binary serves every x86-64 CPU.
// Packing a weight tile also checks it for NaN and Inf (a bit test per value it copies anyway); a head that is
// not finite turns every value into NaN, so the caller needs no separate pass over the head.
#include "soft_values_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#define ENDOKERN_X86 1
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace endokern {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kStartMax = -3.0e38f;   // finite: 0 * (start - max) stays 0
constexpr float kFloorExp2 = -200.0f;   // exp2 below this is 0; keeps p * u finite for padded lanes
constexpr int64_t kPackedTileBytes = 256 * 1024;  // a packed weight tile stays in L2

// ---- scalar helpers ------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_as_float(const void* base, int dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base)[index];
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

inline float exp2_scalar(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

inline float softcap_scalar(float z, float cap) {
  const float y = z / cap;
  const float e = exp2_scalar(-2.0f * kLog2e * std::fabs(y));
  const float t = (1.0f - e) / (1.0f + e);
  return cap * (y < 0 ? -t : t);
}

template <class T>
struct AlignedBuffer {
  T* data = nullptr;
  explicit AlignedBuffer(size_t count) {
    const size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
    data = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (!data) throw std::bad_alloc();
    std::memset(data, 0, bytes);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

struct RowState {
  float max = kStartMax;  // of z * log2(e) / alpha
  float sum = 0.0f;       // sum 2^(u - max)
  float ent = 0.0f;       // sum 2^(u - max) * (u - max)
  float target = 0.0f;
  float lsum = 0.0f;      // sum of z (after bias and softcap, before 1/alpha), when asked
};

// Folds one row's tile maximum and tile sums into its running state (same for every path).
inline void fold(RowState& st, float new_max, float tile_sum, float tile_ent) {
  const float shift = st.max - new_max;
  const float rescale = exp2_scalar(shift);
  st.ent = rescale * (st.ent + st.sum * shift) + tile_ent;
  st.sum = st.sum * rescale + tile_sum;
  st.max = new_max;
}

// ---- packing shared by the fp32-compute paths (portable, AVX2, AVX-512) -----------------------------

// Whether an fp32 value is NaN or +-Inf (exponent all ones), from its bits: no branch, no FP compare.
inline uint32_t nonfinite_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
}

// P[k * vbp + c] = W[v0 + c][k] as fp32, zero for padded columns. Returns whether every value of the tile is
// finite: the pack reads each weight value anyway, so the NaN/Inf check of the LM head costs no extra pass.
bool pack_weight_f32(const Problem& pb, int64_t v0, int vb, int vbp, float* P) {
  uint32_t bad = 0;
  for (int c = 0; c < vbp; ++c) {
    if (c < vb) {
      const int64_t row = (v0 + c) * pb.weight_row_stride;
      if (pb.dtype == kFloat32) {
        const float* w = static_cast<const float*>(pb.weight) + row;
        for (int64_t k = 0; k < pb.d; ++k) {
          P[k * vbp + c] = w[k];
          bad |= nonfinite_bits(w[k]);
        }
      } else {
        for (int64_t k = 0; k < pb.d; ++k) {
          const float x = load_as_float(pb.weight, pb.dtype, row + k);
          P[k * vbp + c] = x;
          bad |= nonfinite_bits(x);
        }
      }
    } else {
      for (int64_t k = 0; k < pb.d; ++k) P[k * vbp + c] = 0.0f;
    }
  }
  return bad == 0;
}

// ptrs[r] -> hidden row r0 + r as fp32: the row itself for fp32 input, else converted into A[r * d ..];
// rows past `rows` read zeros from A.
void hidden_rows_f32(const Problem& pb, int64_t r0, int rows, int mr, float* A, const float** ptrs) {
  for (int r = 0; r < mr; ++r) {
    float* dst = A + r * pb.d;
    ptrs[r] = dst;
    if (r < rows) {
      const int64_t row = (r0 + r) * pb.hidden_row_stride;
      if (pb.dtype == kFloat32) {
        ptrs[r] = static_cast<const float*>(pb.hidden) + row;
      } else {
        for (int64_t k = 0; k < pb.d; ++k) dst[k] = load_as_float(pb.hidden, pb.dtype, row + k);
      }
    } else {
      std::memset(dst, 0, pb.d * sizeof(float));
    }
  }
}

// ---- portable path -------------------------------------------------------------------------------

struct Portable {
  static constexpr int MR = 4, NR = 16;
  using Packed = float;
  static int64_t depth(int64_t d) { return d; }
  static bool pack_weight(const Problem& pb, int64_t v0, int vb, int vbp, Packed* P) {
    return pack_weight_f32(pb, v0, vb, vbp, P);
  }
  static void hidden_rows(const Problem& pb, int64_t r0, int rows, Packed* A, const Packed** ptrs) {
    hidden_rows_f32(pb, r0, rows, MR, A, ptrs);
  }
  static void micro(const Packed* const* A, const Packed* P, int64_t depth, int vbp, float* L) {
    for (int c = 0; c < vbp; c += NR) {
      float acc[MR][NR] = {};
      for (int64_t k = 0; k < depth; ++k) {
        const float* p = P + k * vbp + c;
        for (int r = 0; r < MR; ++r) {
          const float a = A[r][k];
          for (int j = 0; j < NR; ++j) acc[r][j] += a * p[j];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NR; ++j) L[r * vbp + c + j] = acc[r][j];
    }
  }
  // z: one row of the logits tile (vbp entries, the first vb real); bias: the tile's padded bias.
  static void epilogue(float* z, int vb, int vbp, const float* bias, float cap, float scale, bool with_ent,
                       bool with_sum, RowState& st) {
    float tile_max = -std::numeric_limits<float>::infinity();
    float zsum = 0.0f;
    for (int c = 0; c < vb; ++c) {
      float x = z[c];
      if (bias) x += bias[c];
      if (cap > 0) x = softcap_scalar(x, cap);
      z[c] = x;
      tile_max = std::max(tile_max, x * scale);
      if (with_sum) zsum += x;
    }
    if (with_sum) st.lsum += zsum;
    const float new_max = std::max(st.max, tile_max);
    float sum = 0.0f, ent = 0.0f;
    for (int c = 0; c < vb; ++c) {
      const float u = std::max(z[c] * scale - new_max, kFloorExp2);
      const float p = exp2_scalar(u);
      sum += p;
      if (with_ent) ent += p * u;
    }
    (void)vbp;
    fold(st, new_max, sum, ent);
  }
};

#ifdef ENDOKERN_X86

// ---- AVX2 + FMA path -----------------------------------------------------------------------------

#define ENDOKERN_AVX2 __attribute__((target("avx2,fma")))

ENDOKERN_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  // 2^f on [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7 (relative error < 1e-8)
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

ENDOKERN_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

ENDOKERN_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2 {
  static constexpr int MR = 4, NR = 16;
  using Packed = float;
  static int64_t depth(int64_t d) { return d; }
  static bool pack_weight(const Problem& pb, int64_t v0, int vb, int vbp, Packed* P) {
    return pack_weight_f32(pb, v0, vb, vbp, P);
  }
  static void hidden_rows(const Problem& pb, int64_t r0, int rows, Packed* A, const Packed** ptrs) {
    hidden_rows_f32(pb, r0, rows, MR, A, ptrs);
  }
  ENDOKERN_AVX2 static void micro(const Packed* const* A, const Packed* P, int64_t depth, int vbp, float* L) {
    for (int c = 0; c < vbp; c += NR) {
      __m256 acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < depth; ++k) {
        const __m256 b0 = _mm256_load_ps(P + k * vbp + c);
        const __m256 b1 = _mm256_load_ps(P + k * vbp + c + 8);
        for (int r = 0; r < MR; ++r) {
          const __m256 a = _mm256_broadcast_ss(A[r] + k);
          acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(L + r * vbp + c, acc[r][0]);
        _mm256_store_ps(L + r * vbp + c + 8, acc[r][1]);
      }
    }
  }
  ENDOKERN_AVX2 static void epilogue(float* z, int vb, int vbp, const float* bias, float cap, float scale,
                                     bool with_ent, bool with_sum, RowState& st) {
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 vzsum = _mm256_setzero_ps();  // sum of z over the full vectors, when asked
    const int full = vb - vb % 8;
    for (int c = 0; c < vbp; c += 8) {
      __m256 x = _mm256_load_ps(z + c);
      if (bias) x = _mm256_add_ps(x, _mm256_load_ps(bias + c));
      if (cap > 0) {
        const __m256 vcap = _mm256_set1_ps(cap);
        const __m256 y = _mm256_div_ps(x, vcap);
        const __m256 sign = _mm256_and_ps(y, _mm256_set1_ps(-0.0f));
        const __m256 ay = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), y);
        const __m256 e = exp2_avx2(_mm256_mul_ps(ay, _mm256_set1_ps(-2.0f * kLog2e)));
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        x = _mm256_mul_ps(vcap, _mm256_or_ps(t, sign));
      }
      _mm256_store_ps(z + c, x);
      if (c < full) {
        vmax = _mm256_max_ps(vmax, _mm256_mul_ps(x, vscale));
        if (with_sum) vzsum = _mm256_add_ps(vzsum, x);
      }
    }
    float tile_max = hmax_avx2(vmax);
    float zsum_tail = 0.0f;
    for (int c = full; c < vbp; ++c) {
      if (c < vb) {
        tile_max = std::max(tile_max, z[c] * scale);
        zsum_tail += z[c];
      } else {
        z[c] = -std::numeric_limits<float>::infinity();  // padded columns weigh nothing
      }
    }
    if (with_sum) st.lsum += hsum_avx2(vzsum) + zsum_tail;
    const float new_max = std::max(st.max, tile_max);
    const __m256 vnew = _mm256_set1_ps(new_max), floor = _mm256_set1_ps(kFloorExp2);
    __m256 vsum = _mm256_setzero_ps(), vent = _mm256_setzero_ps();
    for (int c = 0; c < vbp; c += 8) {
      const __m256 u = _mm256_max_ps(_mm256_fmsub_ps(_mm256_load_ps(z + c), vscale, vnew), floor);
      const __m256 p = exp2_avx2(u);
      vsum = _mm256_add_ps(vsum, p);
      if (with_ent) vent = _mm256_fmadd_ps(p, u, vent);
    }
    fold(st, new_max, hsum_avx2(vsum), hsum_avx2(vent));
  }
};

// ---- AVX-512 paths -------------------------------------------------------------------------------

#define ENDOKERN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define ENDOKERN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

ENDOKERN_AVX512 inline __m512 exp2_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kFloorExp2));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  // p * 2^n; below 2^-126 this flushes to 0 like exp2_scalar
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

ENDOKERN_AVX512 void epilogue_avx512(float* z, int vb, int vbp, const float* bias, float cap, float scale,
                                     bool with_ent, bool with_sum, RowState& st) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vzsum = _mm512_setzero_ps();  // sum of z over the real columns, when asked
  for (int c = 0; c < vbp; c += 16) {
    const int left = vb - c;
    const __mmask16 real = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    __m512 x = _mm512_load_ps(z + c);
    if (bias) x = _mm512_add_ps(x, _mm512_load_ps(bias + c));
    if (cap > 0) {
      const __m512 vcap = _mm512_set1_ps(cap);
      const __m512 y = _mm512_div_ps(x, vcap);
      const __m512 e = exp2_avx512(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f * kLog2e)));
      const __m512 one = _mm512_set1_ps(1.0f);
      __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
      const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
      t = _mm512_mask_sub_ps(t, negative, _mm512_setzero_ps(), t);
      x = _mm512_mul_ps(vcap, t);
    }
    if (with_sum) vzsum = _mm512_mask_add_ps(vzsum, real, vzsum, x);
    // padded columns weigh nothing
    x = _mm512_mask_blend_ps(real, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), x);
    _mm512_store_ps(z + c, x);
    vmax = _mm512_max_ps(vmax, _mm512_mul_ps(x, vscale));
  }
  if (with_sum) st.lsum += _mm512_reduce_add_ps(vzsum);
  const float new_max = std::max(st.max, _mm512_reduce_max_ps(vmax));
  const __m512 vnew = _mm512_set1_ps(new_max), floor = _mm512_set1_ps(kFloorExp2);
  __m512 vsum = _mm512_setzero_ps(), vent = _mm512_setzero_ps();
  for (int c = 0; c < vbp; c += 16) {
    const __m512 u = _mm512_max_ps(_mm512_fmsub_ps(_mm512_load_ps(z + c), vscale, vnew), floor);
    const __m512 p = exp2_avx512(u);
    vsum = _mm512_add_ps(vsum, p);
    if (with_ent) vent = _mm512_fmadd_ps(p, u, vent);
  }
  fold(st, new_max, _mm512_reduce_add_ps(vsum), _mm512_reduce_add_ps(vent));
}

struct Avx512 {
  static constexpr int MR = 8, NR = 32;
  using Packed = float;
  static int64_t depth(int64_t d) { return d; }
  static bool pack_weight(const Problem& pb, int64_t v0, int vb, int vbp, Packed* P) {
    return pack_weight_f32(pb, v0, vb, vbp, P);
  }
  static void hidden_rows(const Problem& pb, int64_t r0, int rows, Packed* A, const Packed** ptrs) {
    hidden_rows_f32(pb, r0, rows, MR, A, ptrs);
  }
  ENDOKERN_AVX512 static void micro(const Packed* const* A, const Packed* P, int64_t depth, int vbp, float* L) {
    for (int c = 0; c < vbp; c += NR) {
      __m512 acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t k = 0; k < depth; ++k) {
        const __m512 b0 = _mm512_load_ps(P + k * vbp + c);
        const __m512 b1 = _mm512_load_ps(P + k * vbp + c + 16);
        for (int r = 0; r < MR; ++r) {
          const __m512 a = _mm512_set1_ps(A[r][k]);
          acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        _mm512_store_ps(L + r * vbp + c, acc[r][0]);
        _mm512_store_ps(L + r * vbp + c + 16, acc[r][1]);
      }
    }
  }
  static void epilogue(float* z, int vb, int vbp, const float* bias, float cap, float scale, bool with_ent,
                       bool with_sum, RowState& st) {
    epilogue_avx512(z, vb, vbp, bias, cap, scale, with_ent, with_sum, st);
  }
};

// bf16 inputs with vdpbf16ps: weight and hidden stay bf16, packed as pairs along D (one uint32 per
// pair); each instruction adds two exact bf16 products per lane into fp32.
struct Avx512Bf16 {
  static constexpr int MR = 8, NR = 32;
  using Packed = uint32_t;
  static int64_t depth(int64_t d) { return (d + 1) / 2; }
  static bool pack_weight(const Problem& pb, int64_t v0, int vb, int vbp, Packed* P) {
    const int64_t pairs = depth(pb.d);
    const uint16_t* w = static_cast<const uint16_t*>(pb.weight);
    uint32_t bad = 0;  // a bf16 value is NaN or Inf when its exponent bits (0x7f80) are all ones
    for (int c = 0; c < vbp; ++c) {
      if (c < vb) {
        const uint16_t* row = w + (v0 + c) * pb.weight_row_stride;
        for (int64_t k = 0; k < pb.d / 2; ++k) {
          uint32_t pair;
          std::memcpy(&pair, row + 2 * k, 4);
          P[k * vbp + c] = pair;
          bad |= static_cast<uint32_t>((pair & 0x7f80u) == 0x7f80u) |
                 static_cast<uint32_t>((pair & 0x7f800000u) == 0x7f800000u);
        }
        if (pb.d % 2) {
          P[(pairs - 1) * vbp + c] = row[pb.d - 1];
          bad |= static_cast<uint32_t>((row[pb.d - 1] & 0x7f80u) == 0x7f80u);
        }
      } else {
        for (int64_t k = 0; k < pairs; ++k) P[k * vbp + c] = 0;
      }
    }
    return bad == 0;
  }
  // Rows are read in place as pairs when D is even; an odd D is copied with a zero pad.
  static void hidden_rows(const Problem& pb, int64_t r0, int rows, Packed* A, const Packed** ptrs) {
    const int64_t pairs = depth(pb.d);
    const uint16_t* h = static_cast<const uint16_t*>(pb.hidden);
    for (int r = 0; r < MR; ++r) {
      Packed* buf = A + r * pairs;
      ptrs[r] = buf;
      if (r < rows) {
        const uint16_t* row = h + (r0 + r) * pb.hidden_row_stride;
        if (pb.d % 2 == 0) {
          ptrs[r] = reinterpret_cast<const Packed*>(row);
        } else {
          uint16_t* dst = reinterpret_cast<uint16_t*>(buf);
          std::memcpy(dst, row, pb.d * sizeof(uint16_t));
          dst[pb.d] = 0;
        }
      } else {
        std::memset(buf, 0, pairs * 4);
      }
    }
  }
  ENDOKERN_AVX512BF16 static void micro(const Packed* const* A, const Packed* P, int64_t depth, int vbp, float* L) {
    for (int c = 0; c < vbp; c += NR) {
      __m512 acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t k = 0; k < depth; ++k) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512(P + k * vbp + c);
        const __m512bh b1 = (__m512bh)_mm512_load_si512(P + k * vbp + c + 16);
        for (int r = 0; r < MR; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r][k]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
      }
      for (int r = 0; r < MR; ++r) {
        _mm512_store_ps(L + r * vbp + c, acc[r][0]);
        _mm512_store_ps(L + r * vbp + c + 16, acc[r][1]);
      }
    }
  }
  static void epilogue(float* z, int vb, int vbp, const float* bias, float cap, float scale, bool with_ent,
                       bool with_sum, RowState& st) {
    epilogue_avx512(z, vb, vbp, bias, cap, scale, with_ent, with_sum, st);
  }
};

#endif  // ENDOKERN_X86

// ---- the driver shared by every path -------------------------------------------------------------

template <class Path>
void run(const Problem& pb, int threads) {
  using Packed = typename Path::Packed;
  constexpr int MR = Path::MR, NR = Path::NR;
  const int64_t depth = Path::depth(pb.d);
  // Vocabulary tile: as wide as fits kPackedTileBytes, a multiple of NR. Depends on D only.
  int64_t vb_max = kPackedTileBytes / (depth * static_cast<int64_t>(sizeof(Packed)));
  vb_max = std::max<int64_t>(NR, std::min<int64_t>(1024, vb_max / NR * NR));
  const int64_t micro_tiles = (pb.n + MR - 1) / MR;
  const float scale = kLog2e / pb.alpha;
  const float cap = pb.softcap;
  int team = threads > 0 ? threads : 1;
#ifdef _OPENMP
  if (threads <= 0) team = omp_get_max_threads();
#endif
  team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(team, micro_tiles)));

#pragma omp parallel num_threads(team)
  {
    int tid = 0, nthreads = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nthreads = omp_get_num_threads();
#endif
    const int64_t t0 = micro_tiles * tid / nthreads, t1 = micro_tiles * (tid + 1) / nthreads;
    const int64_t row_begin = t0 * MR, row_end = std::min(pb.n, t1 * MR);
    if (row_begin < row_end) {
      AlignedBuffer<Packed> P(static_cast<size_t>(depth * vb_max));
      AlignedBuffer<Packed> A(static_cast<size_t>(MR * depth));
      AlignedBuffer<float> L(static_cast<size_t>(MR * vb_max));
      AlignedBuffer<float> bias_tile(static_cast<size_t>(vb_max));
      std::vector<RowState> state(static_cast<size_t>(row_end - row_begin));
      bool weight_finite = true;  // every thread with rows packs (so reads) the whole head
      for (int64_t v0 = 0; v0 < pb.v; v0 += vb_max) {
        const int vb = static_cast<int>(std::min<int64_t>(vb_max, pb.v - v0));
        const int vbp = (vb + NR - 1) / NR * NR;
        weight_finite &= Path::pack_weight(pb, v0, vb, vbp, P.data);
        if (pb.bias) {
          std::memcpy(bias_tile.data, pb.bias + v0, vb * sizeof(float));
          std::memset(bias_tile.data + vb, 0, (vbp - vb) * sizeof(float));
        }
        for (int64_t r0 = row_begin; r0 < row_end; r0 += MR) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, row_end - r0));
          const Packed* row_ptrs[MR];
          Path::hidden_rows(pb, r0, rows, A.data, row_ptrs);
          Path::micro(row_ptrs, P.data, depth, vbp, L.data);
          for (int r = 0; r < rows; ++r) {
            RowState& st = state[r0 - row_begin + r];
            float* z = L.data + r * vbp;
            Path::epilogue(z, vb, vbp, pb.bias ? bias_tile.data : nullptr, cap, scale, pb.with_entropy,
                           pb.with_logit_sum, st);
            const int64_t t = pb.targets[r0 + r] - v0;  // epilogue left biased, softcapped z in place
            if (pb.targets[r0 + r] >= 0 && t >= 0 && t < vb) st.target += z[t];
          }
        }
      }
      for (int64_t i = row_begin; i < row_end; ++i) {
        const RowState& st = state[i - row_begin];
        const float log2_sum = std::log2(st.sum);
        // a NaN or Inf in the head makes every value NaN, which the caller reports (never a plausible number)
        pb.value[i] = weight_finite ? pb.alpha * kLn2 * (st.max + log2_sum) : std::numeric_limits<float>::quiet_NaN();
        pb.target_logit[i] = st.target;
        if (pb.with_entropy && pb.entropy) pb.entropy[i] = kLn2 * (log2_sum - st.ent / st.sum);
        if (pb.with_logit_sum && pb.logit_sum) pb.logit_sum[i] = st.lsum;
      }
    }
  }
}

}  // namespace

bool simd_supported(int simd) {
  switch (simd) {
    case kPortable: return true;
#ifdef ENDOKERN_X86
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case kAvx512Bf16: return simd_supported(kAvx512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return false;
  }
}

int best_simd() {
  for (int s = kAvx512Bf16; s > kPortable; --s)
    if (simd_supported(s)) return s;
  return kPortable;
}

const char* simd_name(int simd) {
  switch (simd) {
    case kPortable: return "portable";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    case kAvx512Bf16: return "avx512_bf16";
    default: return "unknown";
  }
}

void soft_values(const Problem& pb, int simd, int threads) {
  if (!simd_supported(simd)) throw std::invalid_argument(std::string("SIMD path not supported: ") + simd_name(simd));
  if (pb.dtype != kFloat32 && pb.dtype != kFloat16 && pb.dtype != kBFloat16)
    throw std::invalid_argument("dtype must be float32, float16 or bfloat16");
  if (pb.n <= 0) return;
  if (pb.d <= 0 || pb.v <= 0) throw std::invalid_argument("D and V must be positive");
  if (!(pb.alpha > 0)) throw std::invalid_argument("alpha must be > 0");
  switch (simd) {
#ifdef ENDOKERN_X86
    // vdpbf16ps only for bf16 inputs; fp32 and fp16 inputs take the fp32 FMA kernel of that width
    case kAvx512Bf16: pb.dtype == kBFloat16 ? run<Avx512Bf16>(pb, threads) : run<Avx512>(pb, threads); break;
    case kAvx512: run<Avx512>(pb, threads); break;
    case kAvx2: run<Avx2>(pb, threads); break;
#endif
    default: run<Portable>(pb, threads); break;
  }
}

}  // namespace endokern
