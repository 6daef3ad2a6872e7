// Vector types for the fused CPU optimizer kernels: one interface, three widths.
//
// The kernels are written once (fused_body.inc) against a "V" with:
//   V::W                        lanes;  V::T  the register type (float for Scalar)
//   S, Lane                     the maths type (float, or double for the *D types) and the
//                               one-lane type that runs the tail of a vector loop
//   set1(x), sqrt(x)            broadcast, IEEE square root (correctly rounded, as sqrtf)
//   fma(a, b, c)                a*b + c rounded once
//   load(const P*), store(P*, T) for P in {float, BF16, _Float16}: widen to fp32 / round back
//                               (the *D types: P = double only)
//   stream(float*, T)           non-temporal store (write-only outputs of huge buffers)
// and GCC's vector operators (+ - * / unary -) on T. The compiler never forms an FMA on its
// own (the build uses -std=c++17, i.e. -ffp-contract=off); the kernels call fma() exactly
// where torch's CPU ops fuse (add with alpha, lerp, addcmul: intrinsics in torch's vector
// body, compiler contraction in its scalar remainder), so results match torch.optim bit for
// bit — except where torch's CPU sqrt is not correctly rounded. Our scalar tail uses fma()
// too, so every element of a call gets the same formula whatever its position or thread.
//
// Why hand-written intrinsics rather than auto-vectorised loops: sqrtf sets errno, so GCC
// refuses to vectorise a loop containing it unless -fno-math-errno is on, and that flag
// cannot be set per file (optimize attributes do not reach the inlined builtin).
//
// Rounding to 16-bit types is round-to-nearest-even everywhere: bf16 by bit manipulation
// (NaN -> 0x7FC0, as c10::BFloat16), fp16 by the hardware (F16C) or _Float16.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define PT_X86 1
#else
#define PT_X86 0
#endif

namespace pipetrain::optim {

// bfloat16 storage: the top 16 bits of an fp32.
struct BF16 {
  uint16_t bits;
};

#define PT_INLINE inline __attribute__((always_inline))

PT_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

PT_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (f != f) return 0x7FC0;  // canonical quiet NaN, as c10::BFloat16
  // Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// One lane: the reference order of operations, and the tail of every vector loop.
struct Scalar {
  using T = float;
  using S = float;      // the maths type: fp32 for fp32/bf16/fp16 storage
  using Lane = Scalar;  // the one-lane twin that runs a vector loop's tail
  static constexpr int W = 1;
  static PT_INLINE T set1(float x) { return x; }
  static PT_INLINE T sqrt(T x) { return __builtin_sqrtf(x); }
  static PT_INLINE T fma(T a, T b, T c) { return __builtin_fmaf(a, b, c); }
  static PT_INLINE T load(const float* p) { return *p; }
  static PT_INLINE T load(const BF16* p) { return bf16_to_f32(p->bits); }
  static PT_INLINE T load(const _Float16* p) { return static_cast<float>(*p); }
  static PT_INLINE void store(float* p, T x) { *p = x; }
  static PT_INLINE void store(BF16* p, T x) { p->bits = f32_to_bf16(x); }
  static PT_INLINE void store(_Float16* p, T x) { *p = static_cast<_Float16>(x); }
  template <class P>
  static PT_INLINE void stream(P* p, T x) { store(p, x); }
};

// fp64: parameters, gradients, state and outputs are all double and so is the maths (as
// torch.optim on float64 tensors). Only double storage exists for these types.
struct ScalarD {
  using T = double;
  using S = double;
  using Lane = ScalarD;
  static constexpr int W = 1;
  static PT_INLINE T set1(double x) { return x; }
  static PT_INLINE T sqrt(T x) { return __builtin_sqrt(x); }
  static PT_INLINE T fma(T a, T b, T c) { return __builtin_fma(a, b, c); }
  static PT_INLINE T load(const double* p) { return *p; }
  static PT_INLINE void store(double* p, T x) { *p = x; }
  static PT_INLINE void stream(double* p, T x) { *p = x; }
};

#if PT_X86
// The wide types are compiled for their ISA by target pragmas: every function defined in the
// region (these members, and the kernel bodies fused_optim.cpp includes inside the same
// pragmas) carries the target, so always_inline chains never cross a target boundary.
#define PT_AVX2 PT_INLINE
#define PT_AVX512 PT_INLINE
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

struct Avx2 {
  using T = __m256;
  using S = float;
  using Lane = Scalar;
  static constexpr int W = 8;
  static PT_AVX2 T set1(float x) { return _mm256_set1_ps(x); }
  static PT_AVX2 T sqrt(T x) { return _mm256_sqrt_ps(x); }
  static PT_AVX2 T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static PT_AVX2 T load(const float* p) { return _mm256_loadu_ps(p); }
  static PT_AVX2 T load(const BF16* p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static PT_AVX2 T load(const _Float16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static PT_AVX2 void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static PT_AVX2 __m128i to_bf16(T x) {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_srli_epi32(r, 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 8 x u32 (each <= 0xFFFF) -> 8 x u16: packus works per 128-bit lane, then gather
    // the two useful quadwords (0 and 2) into the low half.
    __m256i packed = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static PT_AVX2 void store(BF16* p, T x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(x));
  }
  static PT_AVX2 void store(_Float16* p, T x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Non-temporal: only for 32-byte-aligned fp32 outputs (the caller checks alignment).
  static PT_AVX2 void stream(float* p, T x) { _mm256_stream_ps(p, x); }
  static PT_AVX2 void stream(BF16* p, T x) { store(p, x); }
  static PT_AVX2 void stream(_Float16* p, T x) { store(p, x); }
};

struct Avx2D {
  using T = __m256d;
  using S = double;
  using Lane = ScalarD;
  static constexpr int W = 4;
  static PT_AVX2 T set1(double x) { return _mm256_set1_pd(x); }
  static PT_AVX2 T sqrt(T x) { return _mm256_sqrt_pd(x); }
  static PT_AVX2 T fma(T a, T b, T c) { return _mm256_fmadd_pd(a, b, c); }
  static PT_AVX2 T load(const double* p) { return _mm256_loadu_pd(p); }
  static PT_AVX2 void store(double* p, T x) { _mm256_storeu_pd(p, x); }
  static PT_AVX2 void stream(double* p, T x) { _mm256_stream_pd(p, x); }
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
struct Avx512 {
  using T = __m512;
  using S = float;
  using Lane = Scalar;
  static constexpr int W = 16;
  static PT_AVX512 T set1(float x) { return _mm512_set1_ps(x); }
  static PT_AVX512 T sqrt(T x) { return _mm512_sqrt_ps(x); }
  static PT_AVX512 T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static PT_AVX512 T load(const float* p) { return _mm512_loadu_ps(p); }
  static PT_AVX512 T load(const BF16* p) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static PT_AVX512 T load(const _Float16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static PT_AVX512 void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static PT_AVX512 void store(BF16* p, T x) {
    __m512i b = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static PT_AVX512 void store(_Float16* p, T x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static PT_AVX512 void stream(float* p, T x) { _mm512_stream_ps(p, x); }
  static PT_AVX512 void stream(BF16* p, T x) { store(p, x); }
  static PT_AVX512 void stream(_Float16* p, T x) { store(p, x); }
};

struct Avx512D {
  using T = __m512d;
  using S = double;
  using Lane = ScalarD;
  static constexpr int W = 8;
  static PT_AVX512 T set1(double x) { return _mm512_set1_pd(x); }
  static PT_AVX512 T sqrt(T x) { return _mm512_sqrt_pd(x); }
  static PT_AVX512 T fma(T a, T b, T c) { return _mm512_fmadd_pd(a, b, c); }
  static PT_AVX512 T load(const double* p) { return _mm512_loadu_pd(p); }
  static PT_AVX512 void store(double* p, T x) { _mm512_storeu_pd(p, x); }
  static PT_AVX512 void stream(double* p, T x) { _mm512_stream_pd(p, x); }
};
#pragma GCC pop_options
#endif  // PT_X86

}  // namespace pipetrain::optim
