// The AVX-512 BF16 vector operations (see scalar.cpp for the contract), shared by the avx512_bf16 and amx_bf16
// backends; include inside the backend's anonymous namespace, after avx_extras.h.
struct Avx512Bf16Ops : AvxExtras {
  static constexpr int MR = 12, NV = 2;
  static constexpr bool kPairedOuterProducts = true;  // vdpbf16ps
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
  static bool transpose_words(const uint64_t* src, uint64_t* out) {
    __m512i r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_si512(src + 8 * i);
    for (int i = 0; i < 8; i += 2) {  // pairs of rows, 64-bit interleave within 128-bit lanes
      t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // then 128-bit lanes of two row pairs
      u[i] = _mm512_shuffle_i64x2(t[i], t[i + 2], 0x88);
      u[i + 1] = _mm512_shuffle_i64x2(t[i], t[i + 2], 0xdd);
      u[i + 2] = _mm512_shuffle_i64x2(t[i + 1], t[i + 3], 0x88);
      u[i + 3] = _mm512_shuffle_i64x2(t[i + 1], t[i + 3], 0xdd);
    }
    // u[0..3] hold rows 0-3 of columns {0,4}, {2,6}, {1,5}, {3,7}; u[4..7] the same for rows 4-7.
    const __m512i swap_middle = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
    static constexpr int kColumn[4][2] = {{0, 4}, {2, 6}, {1, 5}, {3, 7}};
    for (int i = 0; i < 4; ++i) {
      _mm512_storeu_si512(out + 8 * kColumn[i][0],
                          _mm512_shuffle_epi8(_mm512_shuffle_i64x2(u[i], u[i + 4], 0x88), swap_middle));
      _mm512_storeu_si512(out + 8 * kColumn[i][1],
                          _mm512_shuffle_epi8(_mm512_shuffle_i64x2(u[i], u[i + 4], 0xdd), swap_middle));
    }
    return true;
  }
};
