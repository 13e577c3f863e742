// The AVX-512 BF16 vector operations (see scalar.cpp for the contract), shared by the avx512_bf16 and amx_bf16
// backends; include inside the backend's anonymous namespace.
struct Avx512Bf16Ops {
  static constexpr int MR = 12, NV = 2;
  using V = __m512;

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __m512bh load_b(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512 load_b(const float* p) { return _mm512_loadu_ps(p); }
  static __m512bh load_a(const bf16* p) {
    int32_t pair;
    std::memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static __m512 load_a(const float* p) { return _mm512_set1_ps(*p); }
  static V madd(V c, __m512bh b, __m512bh a) { return _mm512_dpbf16_ps(c, a, b); }
  static V madd(V c, __m512 b, __m512 a) { return _mm512_fmadd_ps(a, b, c); }
  template <class T>
  static int gemm_tiles(const T*, size_t, int, int, const T*, size_t, int, float*, size_t, bool) {
    return 0;
  }
};
