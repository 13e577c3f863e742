// The optional parts of a backend's Ops (see scalar.cpp) that AVX provides, for the backends compiled with it (AVX2,
// AVX-512, AMX): include inside the backend's anonymous namespace, after portable_extras.h, and derive Ops from it.
struct AvxExtras : PortableExtras {
  static bool transpose_floats(const float* src, size_t ls, float* dst, size_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
    for (int i = 0; i < 8; i += 2) {  // rows i, i+1 interleaved: columns {0,1}, {4,5} | {2,3}, {6,7}
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4)  // then pairs of those: one column of 4 rows in each 128-bit lane
      for (int h = 0; h < 2; ++h) {
        r[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0x44);
        r[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0xee);
      }
    for (int c = 0; c < 4; ++c) {  // r[c] holds rows 0-3 of columns c, c + 4; r[c + 4] rows 4-7
      _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
      _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
    }
    return true;
  }
};
