// The numeric core: GEMM on packed panels, packing, and the work items of a forward and a backward pass.
// Written once; each backend file includes it inside an anonymous namespace after defining `struct Ops`, its
// vector operations (see backends/scalar.cpp for the contract), and so compiles it for its own ISA. The
// compute type T is bf16 (P = 2 values per 32-bit pair, fp32 accumulation) or float (P = 1).
//
// Forward of expert e on its rows X (gathered tokens), with LoRA on the fused gate_up and on down:
//   G = X Wg^T + s1 (X Agu^T) Bg^T      U = X Wu^T + s1 (X Agu^T) Bu^T      Z = silu(G) * U
//   D = Z Wd^T + s2 (Z Ad^T) Bd^T       y[t] = sum_j w[t,j] D[row(t,j)]
// Backward, with dY the rows of dy:  dZ' = dY Wd + s2 (dY Bd) Ad,  dw = <dZ', Z>,  dZ = w dZ',
//   dG = dZ dz/dg,  dU = dZ dz/du  (the derivatives saved by the forward),  dX = dG Wg + dU Wu + s1 (dG Bg + dU Bu) Agu,  plus the LoRA factor grads.

// --------------------------------------------------------------------------------------------- element types
template <class T> struct Elem;
template <> struct Elem<bf16> {
  static constexpr int P = 2;
  static inline bf16 from(float v) { return f32_to_bf16(v); }
  static inline float to(bf16 v) { return bf16_to_f32(v); }
};
template <> struct Elem<float> {
  static constexpr int P = 1;
  static inline float from(float v) { return v; }
  static inline float to(float v) { return v; }
};

inline int imin(int a, int b) { return a < b ? a : b; }

inline float load_io(const void* p, DType dt, size_t i) {
  return dt == DType::bf16 ? bf16_to_f32(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// exp with a Cephes-style polynomial (relative error ~1e-7): plain code the compiler vectorises for the ISA.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.f;
  return y * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

template <class T>
struct Core {
  static constexpr int P = Elem<T>::P;
  static constexpr int kRowChunk = 240;  // rows per GEMM call: bounds scratch, a multiple of every Ops::MR
  static constexpr int kStreamAhead = 16;  // k-pairs (cache lines of a panel) a streaming GEMM prefetches ahead

  // ------------------------------------------------------------------------------------------- GEMM
  // C[M][16*nblocks] (+)= A[M][K] * B, B packed with K (a multiple of 16) rows per panel; bstride = elements from
  // one 16-column panel to the next. pf (or null): panels to prefetch into L2 meanwhile, one line per panel and step.
  template <int M, int NV>
  static void micro(const T* A, size_t lda, const T* B, size_t bstride, int kpairs, float* C, size_t ldc, bool acc,
                    const T* pf) {
    typename Ops::V c[M][NV];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] = acc ? Ops::load(C + m * ldc + v * kPanel) : Ops::zero();
    for (int kp = 0; kp < kpairs; ++kp) {
      if (pf)
        for (int v = 0; v < NV; ++v) __builtin_prefetch(pf + v * bstride + static_cast<size_t>(kp) * kPanel * P, 0, 2);
      decltype(Ops::load_b(B)) b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Ops::load_b(B + v * bstride + static_cast<size_t>(kp) * kPanel * P);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        auto a = Ops::load_a(A + m * lda + kp * P);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[m][v] = Ops::madd(c[m][v], b[v], a);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) Ops::store(C + m * ldc + v * kPanel, c[m][v]);
  }

  // f(std::integral_constant<int, n>{}) for the run-time n in 1 .. N: register-blocked kernels are instantiated for
  // every block size they may meet.
  template <int N, class F>
  static void with_size(int n, F&& f) {
    if constexpr (N > 0) {
      if (n == N) return f(std::integral_constant<int, N>{});
      with_size<N - 1>(n, f);
    }
  }

  static void gemm(const T* A, size_t lda, int M, int K, const T* B, size_t bstride, int nblocks, float* C,
                   size_t ldc, bool acc) {
    const int kpairs = K / P;
    // A backend with matrix tiles computes the rows it takes; the vector micro-kernel does the rest.
    const int tiled = Ops::gemm_tiles(A, lda, M, K, B, bstride, nblocks, C, ldc, acc);
    for (int nb = 0; nb < nblocks; nb += Ops::NV) {
      const int nv = imin(Ops::NV, nblocks - nb);
      // With several row blocks, the first prefetches the next group of panels (when it is a whole one) for them
      // to find in L2. A single row block streams its panels from memory as it multiplies: it prefetches them
      // kStreamAhead k-pairs ahead, since the hardware prefetcher stops at every 4 KB page (measured on two Xeon
      // cores at qlen 128: the forward's gate_up phase took 13-22 % less).
      const T* pf = M - tiled > Ops::MR ? (nb + 2 * Ops::NV <= nblocks ? B + (nb + Ops::NV) * bstride : nullptr)
                                        : B + nb * bstride + static_cast<size_t>(kStreamAhead) * kPanel * P;
      for (int m = tiled; m < M; m += Ops::MR)
        with_size<Ops::NV>(nv, [&](auto v) {
          with_size<Ops::MR>(imin(Ops::MR, M - m), [&](auto rows) {
            micro<decltype(rows)::value, decltype(v)::value>(A + m * lda, lda, B + nb * bstride, bstride, kpairs,
                                                             C + m * ldc + nb * kPanel, ldc, acc,
                                                             m == tiled ? pf : nullptr);
          });
        });
    }
  }

  // ------------------------------------------------------------------------------------------- packing
  static size_t packed_size(int N, int K) { return round_up(N, kPad) * round_up(K, kPad); }
  static int panels(int N) { return (N + kPanel - 1) / kPanel; }  // the panels a GEMM with N outputs computes

  // dst[c * ld + r] = src[r * ls + c] for r < rows, c < cols (8 at most), of 32-bit values: fp32, or the bf16 pairs
  // of packed panels, which the portable loop copies as bytes.
  static void transpose_tile(const float* src, size_t ls, int rows, int cols, float* dst, size_t ld) {
    if (rows == 8 && cols == 8 && Ops::transpose_floats(src, ls, dst, ld)) return;
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) std::memcpy(dst + c * ld + r, src + r * ls + c, 4);
  }

  // Element (n, k) of a panel-packed [Np][Kp] matrix.
  static size_t packed_index(int n, int k, int Kp) {
    return (static_cast<size_t>(n / kPanel) * (Kp / P) + k / P) * kPanel * P + (n % kPanel) * P + k % P;
  }

  // Loops walk the source along its contiguous dimension: walking 16 rows at once, as the panel order would,
  // touches rows a power of two apart, which share one cache set (bf16 walks 8, within an L1 set's 8 or more ways).
  template <class S>
  static void pack_from(const S* src, ptrdiff_t sn, ptrdiff_t sk, int N, int K, T* dst) {
    const int Kp = static_cast<int>(round_up(K, kPad));
    std::memset(dst, 0, sizeof(T) * packed_size(N, K));  // the padding
    if constexpr (P == 2) {
      if (sk == 1) return pack_pairs_from_rows(src, sn, N, K, Kp, dst);
      return pack_pairs_from_columns(src, sn, sk, N, K, Kp, dst);
    } else if (sk == 1) {
      for (int n = 0; n < N; ++n) {
        const S* row = src + n * sn;
        T* out = dst + packed_index(n, 0, Kp);
        for (int k = 0; k < K; ++k) out[k * kPanel] = Elem<T>::from(Elem<S>::to(row[k]));
      }
    } else {  // each panel row takes 16 consecutive n of one k, contiguous when sn == 1
      for (int n0 = 0; n0 < N; n0 += kPanel) {
        const int nn = imin(kPanel, N - n0);
        for (int k = 0; k < K; ++k) {
          const S* col = src + k * sk + n0 * sn;
          T* out = dst + packed_index(n0, k, Kp);
          for (int i = 0; i < nn; ++i) out[i] = Elem<T>::from(Elem<S>::to(col[i * sn]));
        }
      }
    }
  }

  // For bf16 the panel rows are 32-bit words, one (k, k + 1) pair of one n each: with rows of the source contiguous
  // along k, 8 rows x 8 pairs are an 8 x 8 transpose of words.
  template <class S>
  static void pack_pairs_from_rows(const S* src, ptrdiff_t sn, int N, int K, int Kp, T* dst) {
    const int kpairs = (K + 1) / 2;
    for (int n0 = 0; n0 < N; n0 += 8) {
      const int nn = imin(8, N - n0);
      float* words = reinterpret_cast<float*>(dst + packed_index(n0, 0, Kp));  // as floats for transpose_tile
      for (int kp0 = 0; kp0 < kpairs; kp0 += 8) {
        const int np = imin(8, kpairs - kp0);
        const int nk = imin(16, K - 2 * kp0);
        float tile[8][8];
        for (int i = 0; i < nn; ++i) {
          const S* row = src + (n0 + i) * sn + 2 * kp0;
          T values[16] = {};  // little-endian: value 2c is the low half of word c
          if (nk == 16) {
            for (int c = 0; c < 16; ++c) values[c] = Elem<T>::from(Elem<S>::to(row[c]));  // a vector conversion
          } else {
            for (int c = 0; c < nk; ++c) values[c] = Elem<T>::from(Elem<S>::to(row[c]));
          }
          std::memcpy(tile[i], values, sizeof values);
        }
        transpose_tile(tile[0], 8, nn, np, words + kp0 * kPanel, kPanel);
      }
    }
  }

  // The other bf16 case: each word interleaves two source rows k, k + 1, walked along n (contiguous when sn == 1).
  template <class S>
  static void pack_pairs_from_columns(const S* src, ptrdiff_t sn, ptrdiff_t sk, int N, int K, int Kp, T* dst) {
    for (int n0 = 0; n0 < N; n0 += kPanel) {
      const int nn = imin(kPanel, N - n0);
      for (int k = 0; k < K; k += 2) {
        const S* even = src + k * sk + n0 * sn;
        T* out = dst + packed_index(n0, k, Kp);
        if (k + 1 < K) {
          const S* odd = even + sk;
          for (int i = 0; i < nn; ++i) {
            out[2 * i] = Elem<T>::from(Elem<S>::to(even[i * sn]));
            out[2 * i + 1] = Elem<T>::from(Elem<S>::to(odd[i * sn]));
          }
        } else {  // the odd values are padding, zeroed already
          for (int i = 0; i < nn; ++i) out[2 * i] = Elem<T>::from(Elem<S>::to(even[i * sn]));
        }
      }
    }
  }

  static void pack(const void* src, DType st, ptrdiff_t sn, ptrdiff_t sk, int N, int K, T* dst) {
    if (st == DType::bf16)
      pack_from(static_cast<const bf16*>(src), sn, sk, N, K, dst);
    else
      pack_from(static_cast<const float*>(src), sn, sk, N, K, dst);
  }

  // The panels of W^T for W's columns k0 .. k0 + 16 nblocks, from W packed as [Np][Kp]: 16 output columns each
  // (pstride elements apart), reduction over n. For bf16, the 4 values of W rows n, n+1 x columns k, k+1 are one
  // 64-bit word in both layouts, with the middle two values swapped: each 16 rows of a panel are an 8 x 8 transpose
  // of such words. The walk goes down W's panels, each time reading the 16 nblocks contiguous bytes of the columns
  // and prefetching those a few panels ahead: the runs are short and far apart, too far for the hardware prefetcher.
  static void pack_transposed_panels(const T* W, int Np, int Kp, int k0, int nblocks, size_t pstride, T* dst) {
    const size_t wstride = static_cast<size_t>(Kp) * kPanel;  // elements from one panel of W to the next
    const T* base = W + static_cast<size_t>(k0) * kPanel;
    for (int nb = 0; nb < Np / kPanel; ++nb) {
      prefetch_ahead(base, nb, Np / kPanel, wstride, nblocks);
      for (int b = 0; b < nblocks; ++b)
        transposed_block(base + nb * wstride + b * kPanel * kPanel, dst + b * pstride + nb * kPanel * kPanel);
    }
  }

  // The blocks columns x 16 rows that panel nb + 4 of W (of npanels, wstride elements apart) holds at base's
  // columns, into the cache ahead of their use.
  static void prefetch_ahead(const T* base, int nb, int npanels, size_t wstride, int blocks) {
    constexpr int kAhead = 4;
    if (nb + kAhead >= npanels) return;
    const char* ahead = reinterpret_cast<const char*>(base + (nb + kAhead) * wstride);
    for (size_t off = 0; off < static_cast<size_t>(blocks) * kPanel * kPanel * sizeof(T); off += 64)
      __builtin_prefetch(ahead + off);
  }

  // 16 rows of W (one panel) x 16 of its columns (src), transposed into the 16 x 16 block of W^T's panel at out.
  static void transposed_block(const T* src, T* out) {
    if constexpr (P == 2) {
      const uint64_t* s = reinterpret_cast<const uint64_t*>(src);
      uint64_t* o = reinterpret_cast<uint64_t*>(out);
      if (Ops::transpose_words(s, o)) return;
      for (int q = 0; q < 8; ++q)
        for (int kp = 0; kp < 8; ++kp) {
          const uint64_t w = s[kp * 8 + q];
          o[q * 8 + kp] = (w & 0xffff00000000ffffull) | ((w >> 16) & 0x00000000ffff0000ull) |
                          ((w << 16) & 0x0000ffff00000000ull);
        }
    } else {
      for (int kk = 0; kk < kPanel; ++kk)
        for (int nn = 0; nn < kPanel; ++nn) out[nn * kPanel + kk] = src[kk * kPanel + nn];
    }
  }

  // C[M][16 NV] = sum_s A_s[M][Np] * (W_s^T panels for W_s's columns k0 .. k0 + 16 NV), for few rows: each 16 x 16
  // block of the transposed panels is made right before the multiply-adds that use it, so it never leaves L1 and
  // the shuffles overlap the arithmetic; W's next blocks are prefetched as in pack_transposed_panels.
  template <int M, int NV>
  static void micro_transposed(const T* const* A, const T* const* W, int sources, size_t lda, int Np, int Kp, int k0,
                               float* C, size_t ldc) {
    const size_t wstride = static_cast<size_t>(Kp) * kPanel;
    typename Ops::V c[M][NV];
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NV; ++v) c[m][v] = Ops::zero();
    alignas(64) T block[NV][kPanel * kPanel];
    for (int s = 0; s < sources; ++s) {
      const T* base = W[s] + static_cast<size_t>(k0) * kPanel;
      for (int nb = 0; nb < Np / kPanel; ++nb) {
        prefetch_ahead(base, nb, Np / kPanel, wstride, NV);
        for (int v = 0; v < NV; ++v) transposed_block(base + nb * wstride + v * kPanel * kPanel, block[v]);
        const T* a = A[s] + nb * kPanel;
        for (int kp = 0; kp < kPanel / P; ++kp) {
          decltype(Ops::load_b(block[0])) b[NV];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) b[v] = Ops::load_b(block[v] + kp * kPanel * P);
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const auto av = Ops::load_a(a + m * lda + kp * P);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) c[m][v] = Ops::madd(c[m][v], b[v], av);
          }
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NV; ++v) Ops::store(C + m * ldc + v * kPanel, c[m][v]);
  }

  // The backward's product with transposed weights for at most Ops::MR rows: C[M][16 nblocks] = sum_s A_s W_s^T,
  // columns c0 .. of the W_s (one or two sources, accumulated).
  static void gemm_transposed(const T* const* A, const T* const* W, int sources, size_t lda, int M, int Np, int Kp,
                              int c0, int nblocks, float* C, size_t ldc) {
    for (int nb = 0; nb < nblocks; nb += Ops::NV)
      with_size<Ops::NV>(imin(Ops::NV, nblocks - nb), [&](auto v) {
        with_size<Ops::MR>(M, [&](auto rows) {
          micro_transposed<decltype(rows)::value, decltype(v)::value>(A, W, sources, lda, Np, Kp, c0 + nb * kPanel,
                                                                      C + nb * kPanel, ldc);
        });
      });
  }

  // ------------------------------------------------------------------------------------------- helpers
  struct Rows {
    int e, begin, count;
  };
  static Rows expert_rows(const Plan& p, int e) {
    return {e, static_cast<int>(p.offsets[e]), static_cast<int>(p.offsets[e + 1] - p.offsets[e])};
  }
  static const T* w_ptr(const void* base, size_t stride, int e) { return static_cast<const T*>(base) + e * stride; }
  static T* lora_pk(const Plan& p, int e) { return static_cast<T*>(p.lora_pk) + e * p.lora_pk_stride; }
  static T* scratch_T(const Plan& p, int worker) {
    return reinterpret_cast<T*>(p.scratch + static_cast<size_t>(worker) * p.scratch_bytes);
  }
  static float* scratch_f32(const Plan& p, int worker, size_t skip_T) {  // fp32 area after skip_T elements of T
    return reinterpret_cast<float*>(p.scratch + static_cast<size_t>(worker) * p.scratch_bytes +
                                    round_up(skip_T * sizeof(T), 64));
  }

  // The reduction depth of a product with a scaled LoRA intermediate (rank values of rp, the rest zeros): the vector
  // micro-kernel needs whole k-pairs only (rank 8 padded to 32 would be 4x the multiply-adds), a tile unit 32-deep steps.
  static int lora_depth(int rank, int rp) {
    return Ops::kTilesTakeAllRows && P == 2 ? rp : static_cast<int>(round_up(rank, P));
  }

  // sum_i a[i] b[i] for n a multiple of 16, in 16 partial sums: a reduction the compiler vectorises without
  // reassociating.
  static float dot(const float* a, const T* b, int n) {
    float lanes[kPanel] = {};
    for (int i = 0; i < n; i += kPanel)
      for (int l = 0; l < kPanel; ++l) lanes[l] += a[i + l] * Elem<T>::to(b[i + l]);
    float sum = 0.f;
    for (int l = 0; l < kPanel; ++l) sum += lanes[l];
    return sum;
  }

  // dst[r][0:rp] = T(scale * src[r][0:rank]), zero padded: the scaled LoRA intermediate as a GEMM operand.
  static void scale_rows(const float* src, int rows, int rank, int rp, float scale, T* dst) {
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < rp; ++j) dst[r * rp + j] = Elem<T>::from(j < rank ? scale * src[r * rp + j] : 0.f);
  }

  // Gather rows of an io tensor [T][H] for slots row_src into dst [rows][Hp] (zero padded).
  static void gather_rows(const Plan& p, const void* src, const Rows& rows, T* dst) {
    for (int r = 0; r < rows.count; ++r) {
      const size_t t = static_cast<size_t>(p.row_src[rows.begin + r] / p.k);
      T* out = dst + static_cast<size_t>(rows.begin + r) * p.ldh;
      if (p.io == DType::bf16 && P == 2) {
        std::memcpy(out, static_cast<const bf16*>(src) + t * p.H, sizeof(T) * p.H);
      } else {
        for (int h = 0; h < p.H; ++h) out[h] = Elem<T>::from(load_io(src, p.io, t * p.H + h));
      }
      for (int h = p.H; h < p.Hp; ++h) out[h] = Elem<T>::from(0.f);
    }
  }

  // out[t] = sum_j rows_out[t*k + j] for one block of 16 tokens.
  static void reduce_slots(const Plan& p, size_t block, void* out, int worker) {
    const int t0 = static_cast<int>(block) * 16, t1 = imin(p.T, t0 + 16);
    float* acc = scratch_f32(p, worker, 0);
    for (int t = t0; t < t1; ++t) {
      const T* src = static_cast<const T*>(p.rows_out) + static_cast<size_t>(t) * p.k * p.Hp;
      const uint8_t* present = p.slot_present ? p.slot_present + static_cast<size_t>(t) * p.k : nullptr;
      int j = 0;
      while (present && j < p.k && !present[j]) ++j;
      if (j == p.k) {
        for (int h = 0; h < p.H; ++h) acc[h] = 0.f;
      } else {
        for (int h = 0; h < p.H; ++h) acc[h] = Elem<T>::to(src[static_cast<size_t>(j) * p.Hp + h]);
      }
      for (++j; j < p.k; ++j)
        if (!present || present[j])
          for (int h = 0; h < p.H; ++h) acc[h] += Elem<T>::to(src[static_cast<size_t>(j) * p.Hp + h]);
      if (p.io == DType::bf16) {
        bf16* o = static_cast<bf16*>(out) + static_cast<size_t>(t) * p.H;
        for (int h = 0; h < p.H; ++h) o[h] = f32_to_bf16(acc[h]);
      } else {
        std::memcpy(static_cast<float*>(out) + static_cast<size_t>(t) * p.H, acc, sizeof(float) * p.H);
      }
    }
  }

  // outer_grad's operands: where the backend asks for them, pairs of bf16 rows (r, r + 1) in one multiply-add (half
  // the multiply-adds of fp32 on a backend that multiplies pairs in one instruction), with the coefficients rounded
  // to bf16 as a bf16 GEMM's operands are; elsewhere single rows widened to fp32.
  static constexpr bool kPairedRows = P == 2 && Ops::kPairedOuterProducts;
  using OuterT = std::conditional_t<kPairedRows, T, float>;
  static constexpr int Q = kPairedRows ? 2 : 1;  // rows per multiply-add

  // grad[j][i] (+)= scale * sum_r row_scale[r] * coef[r][j] * rows[r][i] for j < rank, i < n (grad rows gj apart;
  // acc: add, else overwrite): a product reducing over the rows. For each chunk of rows, the scaled coefficients of
  // all ranks (of a group of up to kGroup) are computed once into L1 as broadcast operands. Then for each vector block
  // of columns, blocks of J ranks x NC vectors stay in registers while the chunk's rows stream past, Q at a time as
  // one panel row; the rank blocks follow each other, so the rows' line is read from memory once. Rows are read in
  // whole vectors (rows are padded past n to a multiple of kPad); only the n columns are written.
  static void outer_grad(const float* coef, int ldcoef, const float* row_scale, const T* rows, size_t ldrows,
                         int count, int rank, int n, float scale, float* grad, size_t gj, bool acc) {
    constexpr int J = 4 * Ops::NV, NC = Ops::NV, kScaled = 4096, kGroup = 64;  // kGroup: ranks per pass, J | kGroup
    alignas(64) OuterT scaled[kScaled];  // [row / Q][ranks][row % Q]
    for (int g0 = 0; g0 < rank; g0 += kGroup) {
      const int group = imin(kGroup, rank - g0), ranks = static_cast<int>(round_up(group, J));
      const int chunk = imin(256, kScaled / ranks / Q * Q);  // rows
      for (int r0 = 0; r0 < count; r0 += chunk) {
        const int nr = imin(chunk, count - r0);
        const bool add = acc || r0 > 0;
        for (int r = 0; r < static_cast<int>(round_up(nr, Q)); ++r) {  // an odd count's padding row: zeros
          const bool live = r < nr;
          const float s = live ? (row_scale ? scale * row_scale[r0 + r] : scale) : 0.f;
          for (int j = 0; j < ranks; ++j)
            scaled[(r / Q * ranks + j) * Q + r % Q] =
                Elem<OuterT>::from(live && j < group ? s * coef[(r0 + r) * ldcoef + g0 + j] : 0.f);
        }
        for (int i0 = 0; i0 < n; i0 += NC * kPanel)
          for (int j0 = 0; j0 < group; j0 += J)
            outer_grad_block<J, NC>(scaled + j0 * Q, ranks * Q, rows + r0 * ldrows + i0, ldrows, nr,
                                    imin(J, group - j0), imin(NC * kPanel, n - i0), grad + (g0 + j0) * gj + i0, gj,
                                    add);
      }
    }
  }

  // One register block of outer_grad: grad[j][i] (+)= sum_r scaled[r][j] * rows[r][i] for j < nj, i < ni, with the
  // Q entries of a group of rows side by side and the groups ld apart. The rows' lines are prefetched kAhead rows
  // ahead: rows a page or more apart are too many streams for the hardware prefetcher.
  template <int J, int NC>
  static void outer_grad_block(const OuterT* scaled, int ld, const T* rows, size_t ldrows, int count, int nj, int ni,
                               float* grad, size_t gj, bool add) {
    constexpr int kAhead = 16;
    typename Ops::V sum[J][NC];
    for (int jj = 0; jj < J; ++jj)
      for (int v = 0; v < NC; ++v) sum[jj][v] = Ops::zero();
    for (int r = 0; r < count; r += Q) {
      for (int q = 0; q < Q; ++q)
        if (r + q + kAhead < count)
          for (size_t off = 0; off < NC * kPanel * sizeof(T); off += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(rows + (r + q + kAhead) * ldrows) + off);
      alignas(64) OuterT operand[NC * kPanel * Q];  // rows r .. r + Q - 1 as one panel row
      const T* row = rows + r * ldrows;
      if constexpr (kPairedRows) {  // 32-bit words, value 2l in the low half; an odd count's last row pairs with 0
        uint32_t words[NC * kPanel];
        if (r + 1 < count) {
          for (int l = 0; l < NC * kPanel; ++l) words[l] = row[l] | static_cast<uint32_t>(row[ldrows + l]) << 16;
        } else {
          for (int l = 0; l < NC * kPanel; ++l) words[l] = row[l];
        }
        std::memcpy(operand, words, sizeof words);
      } else {
        for (int l = 0; l < NC * kPanel; ++l) operand[l] = Elem<T>::to(row[l]);  // a vector conversion
      }
      decltype(Ops::load_b(operand)) b[NC];
      for (int v = 0; v < NC; ++v) b[v] = Ops::load_b(operand + v * kPanel * Q);
      const OuterT* a = scaled + r / Q * ld;
      for (int jj = 0; jj < J; ++jj) {
        const auto av = Ops::load_a(a + jj * Q);
        for (int v = 0; v < NC; ++v) sum[jj][v] = Ops::madd(sum[jj][v], b[v], av);
      }
    }
    for (int jj = 0; jj < nj; ++jj) {
      float* g = grad + jj * gj;
      if (!add && ni == NC * kPanel) {
        for (int v = 0; v < NC; ++v) Ops::store(g + v * kPanel, sum[jj][v]);
        continue;
      }
      alignas(64) float sums[NC * kPanel];
      for (int v = 0; v < NC; ++v) Ops::store(sums + v * kPanel, sum[jj][v]);
      for (int l = 0; l < ni; ++l) g[l] = add ? g[l] + sums[l] : sums[l];
    }
  }

  // The expert rows and column block of an item of a phase split by (active expert, block of `cols`).
  struct BlockItem {
    Rows rows;
    int block;
  };
  static BlockItem block_item(const Plan& p, size_t item, int cols) {
    const size_t blocks = static_cast<size_t>(p.column_blocks(cols));
    return {expert_rows(p, p.items[item / blocks]), static_cast<int>(item % blocks)};
  }

  // ------------------------------------------------------------------------------------------- forward
  // Phases: 0 LoRA B factors to expert-major, 1 gather X (+ X Agu^T) per expert, 2 gate/up + activation per
  //         (expert, I block), 3 Z Ad^T per expert, 4 down per (expert, H block), 5 sum over slots per token block.
  static void forward_item(const Plan& p, int phase, size_t item, int worker) {
    switch (phase) {
      case 0: return lora_b_to_expert_major(p, item);
      case 1: return fwd_gather(p, expert_rows(p, p.items[item]), worker);
      case 2: {
        const BlockItem b = block_item(p, item, p.Ip);
        return fwd_gate_up(p, b.rows, b.block, worker);
      }
      case 3: return fwd_down_lora(p, expert_rows(p, p.items[item]), worker);
      case 4: {
        const BlockItem b = block_item(p, item, p.Hp);
        return fwd_down(p, b.rows, b.block, worker);
      }
      case 5: return reduce_slots(p, item, p.y, worker);
    }
  }

  // PEFT's B [out][E*r] has rank-major columns (j*E + e), so one expert's factor is spread over the whole matrix.
  // Items: blocks of 16 rows of gate_up's B, then of down's; each moves its rows between B and Bt [E][r][out] (fp32)
  // in 8 x 8 tiles (8 rows x 8 experts), so that both sides are read and written in runs.
  static int lora_row_blocks(int out, int rank) { return rank ? (out + 15) / 16 : 0; }

  // The rows of one item: which factor, and two groups of up to 8 rows of B that are 8 consecutive entries of a Bt
  // row: rows o0 .. o0 + 7 and o0 + 8 .. o0 + 15, or for an interleaved (gate, up, gate, up, ...) gate_up the even
  // rows, which are gate's, and the odd ones, up's.
  struct RowGroup {
    int first, step, count, to;  // B rows first + i * step (i < count) are Bt entries to + i
  };
  struct LoraBlock {
    bool gu;
    int rank, out, o0;
    RowGroup groups[2];
  };
  static LoraBlock lora_block(const Plan& p, size_t item) {
    const int gu_blocks = lora_row_blocks(2 * p.I, p.gu.rank);
    LoraBlock b;
    b.gu = static_cast<int>(item) < gu_blocks;
    b.rank = b.gu ? p.gu.rank : p.dn.rank;
    b.out = b.gu ? 2 * p.I : p.H;
    b.o0 = 16 * (b.gu ? static_cast<int>(item) : static_cast<int>(item) - gu_blocks);
    const bool interleaved = b.gu && p.gu_interleaved;
    const int end = imin(b.out, b.o0 + 16);
    for (int h = 0; h < 2; ++h) {
      RowGroup& g = b.groups[h];
      g.first = b.o0 + (interleaved ? h : 8 * h);
      g.step = interleaved ? 2 : 1;
      g.count = end > g.first ? imin(8, (end - g.first + g.step - 1) / g.step) : 0;
      g.to = interleaved ? gate_up_row(p, g.first) : g.first;
    }
    return b;
  }

  // Row of the gate-block-then-up-block order for row o of an interleaved (gate, up, gate, up, ...) gate_up.
  static int gate_up_row(const Plan& p, int o) { return (o & 1) ? p.I + o / 2 : o / 2; }

  static void lora_b_to_expert_major(const Plan& p, size_t item) {
    const LoraBlock b = lora_block(p, item);
    const LoraRef& l = b.gu ? p.gu : p.dn;
    float* Bt = b.gu ? p.gu_Bt : p.dn_Bt;
    if (l.dtype == DType::bf16)
      copy_b_block(b, static_cast<const bf16*>(l.B), p.E, Bt);
    else
      copy_b_block(b, static_cast<const float*>(l.B), p.E, Bt);
  }

  // Bt[e][j][g.to + i] = B[g.first + i * g.step][j*E + e] for the rows of one block. The tiles go through L1 so that
  // each expert's entries from both groups are stored back to back: its whole 64-byte run in one go.
  template <class S>
  static void copy_b_block(const LoraBlock& b, const S* B, int E, float* Bt) {
    const size_t cols = static_cast<size_t>(E) * b.rank;
    for (int j = 0; j < b.rank; ++j)
      for (int e0 = 0; e0 < E; e0 += 8) {
        const int ne = imin(8, E - e0);
        float runs[2][8][8];  // [group][expert][row of the group]
        for (int h = 0; h < 2; ++h) {
          const RowGroup& g = b.groups[h];
          if (!g.count) continue;  // the second group of a last block of at most 8 rows
          const S* src = B + static_cast<size_t>(g.first) * cols + static_cast<size_t>(j) * E + e0;
          if constexpr (std::is_same_v<S, float>) {
            transpose_tile(src, g.step * cols, g.count, ne, runs[h][0], 8);
          } else {  // the conversion transposes as it goes
            for (int i = 0; i < g.count; ++i)
              for (int c = 0; c < ne; ++c) runs[h][c][i] = Elem<S>::to(src[i * g.step * cols + c]);
          }
        }
        for (int c = 0; c < ne; ++c) {
          float* dst = Bt + (static_cast<size_t>(e0 + c) * b.rank + j) * b.out;
          for (int h = 0; h < 2; ++h) {
            const RowGroup& g = b.groups[h];
            if (g.count == 8) {
              std::memcpy(dst + g.to, runs[h][c], sizeof runs[h][c]);  // a fixed size: two vector stores, no call
            } else {
              for (int i = 0; i < g.count; ++i) dst[g.to + i] = runs[h][c][i];
            }
          }
        }
      }
  }

  // The reverse for the B gradients of the experts that had rows: grad[o][j*E + e] += Gt[e][j][o]. When
  // overwriting, grad[o][j*E + e] = Gt[e][j][o] or 0 for an expert without rows, and row block b of a factor's B
  // also zeroes that factor's A gradient rows of the experts without rows among e = b, b + blocks, ...
  static void lora_grad_b_to_peft(const Plan& p, size_t item) {
    const LoraBlock b = lora_block(p, item);
    const float* Gt = b.gu ? p.gu_Gt : p.dn_Gt;
    const size_t cols = static_cast<size_t>(p.E) * b.rank, ldt = static_cast<size_t>(b.rank) * b.out;
    float* grad = b.gu ? p.gu_grad.B : p.dn_grad.B;
    for (int j = 0; j < b.rank; ++j)
      for (int e0 = 0; e0 < p.E; e0 += 8) {
        const int ne = imin(8, p.E - e0);
        bool had_rows[8];  // Gt of the others is stale: transposed with the rest, never used
        for (int c = 0; c < ne; ++c) had_rows[c] = p.offsets[e0 + c + 1] > p.offsets[e0 + c];
        for (const RowGroup& g : b.groups) {
          if (!g.count) continue;
          float tile[8][8];  // [row of the group][expert]
          transpose_tile(Gt + (static_cast<size_t>(e0) * b.rank + j) * b.out + g.to, ldt, ne, g.count, tile[0], 8);
          for (int i = 0; i < g.count; ++i) {
            float* dst = grad + static_cast<size_t>(g.first + i * g.step) * cols + static_cast<size_t>(j) * p.E + e0;
            if (p.grad_accumulate) {
              for (int c = 0; c < ne; ++c)
                if (had_rows[c]) dst[c] += tile[i][c];
            } else {
              for (int c = 0; c < ne; ++c) dst[c] = had_rows[c] ? tile[i][c] : 0.f;
            }
          }
        }
      }
    if (p.grad_accumulate) return;
    const int blocks = lora_row_blocks(b.out, b.rank), block = b.o0 / 16;
    const size_t in = b.gu ? p.H : p.I;
    float* gradA = b.gu ? p.gu_grad.A : p.dn_grad.A;
    for (int e = block; e < p.E; e += blocks)
      if (p.offsets[e + 1] == p.offsets[e]) std::memset(gradA + e * b.rank * in, 0, sizeof(float) * b.rank * in);
  }

  static void fwd_gather(const Plan& p, const Rows& rows, int worker) {
    T* X = static_cast<T*>(p.X);
    gather_rows(p, p.x, rows, X);
    const int r1 = p.gu.rank;
    if (r1 == 0) return;
    const int e = rows.e;
    T* pkA = scratch_T(p, worker);
    pack(static_cast<const char*>(p.gu.A) + elem_offset(p.gu.dtype, static_cast<size_t>(e) * r1 * p.H), p.gu.dtype,
         p.H, 1, r1, p.H, pkA);
    float* ag = p.ag + static_cast<size_t>(rows.begin) * p.r1p;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
      gemm(X + static_cast<size_t>(rows.begin + r0) * p.ldh, p.ldh, imin(kRowChunk, rows.count - r0), p.Hp, pkA,
           static_cast<size_t>(p.Hp) * kPanel, panels(r1), ag + static_cast<size_t>(r0) * p.r1p, p.r1p, false);
    scale_rows(ag, rows.count, r1, p.r1p, p.gu.scaling, static_cast<T*>(p.ag_s) + static_cast<size_t>(rows.begin) * p.r1p);
    // Bg and Bu of this expert as [I][r1] operands for the gate/up items.
    T* pk = lora_pk(p, e);
    const float* Bt = p.gu_Bt + static_cast<size_t>(e) * r1 * 2 * p.I;
    pack(Bt, DType::f32, 1, 2 * p.I, p.I, r1, pk);
    pack(Bt + p.I, DType::f32, 1, 2 * p.I, p.I, r1, pk + packed_size(p.I, r1));
  }

  static size_t elem_offset(DType dt, size_t n) { return n * (dt == DType::bf16 ? 2 : 4); }

  static void fwd_gate_up(const Plan& p, const Rows& rows, int block, int worker) {
    const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Ip - c0), nblocks = ncols / kPanel;
    const size_t wstride = static_cast<size_t>(p.Hp) * kPanel;
    const T* wg = w_ptr(p.wg, p.w_gu_stride, rows.e) + (c0 / kPanel) * wstride;
    const T* wu = w_ptr(p.wu, p.w_gu_stride, rows.e) + (c0 / kPanel) * wstride;
    const T* X = static_cast<const T*>(p.X);
    const T* ag_s = static_cast<const T*>(p.ag_s);
    const size_t lstride = static_cast<size_t>(p.r1p) * kPanel;
    const T* lg = p.gu.rank ? lora_pk(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
    const T* lu = p.gu.rank ? lg + packed_size(p.I, p.gu.rank) : nullptr;
    float* cg = scratch_f32(p, worker, 0);
    float* cu = cg + kRowChunk * p.col_block;
    T* Z = static_cast<T*>(p.Z);
    T* zg = static_cast<T*>(p.dz_dg);
    T* zu = static_cast<T*>(p.dz_du);
    const int ld = p.col_block;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
      const int m = imin(kRowChunk, rows.count - r0);
      const size_t row = static_cast<size_t>(rows.begin + r0);
      gemm(X + row * p.ldh, p.ldh, m, p.Hp, wg, wstride, nblocks, cg, ld, false);
      gemm(X + row * p.ldh, p.ldh, m, p.Hp, wu, wstride, nblocks, cu, ld, false);
      if (lg) {
        gemm(ag_s + row * p.r1p, p.r1p, m, lora_depth(p.gu.rank, p.r1p), lg, lstride, nblocks, cg, ld, true);
        gemm(ag_s + row * p.r1p, p.r1p, m, lora_depth(p.gu.rank, p.r1p), lu, lstride, nblocks, cu, ld, true);
      }
      const float* bg = p.gu_bias ? p.gu_bias + static_cast<size_t>(rows.e) * 2 * p.Ip + c0 : nullptr;
      for (int r = 0; r < m; ++r) {
        const size_t o = (row + r) * p.ldi + c0;
        float* g = cg + r * ld;
        float* u = cu + r * ld;
        if (bg)
          for (int c = 0; c < ncols; ++c) {
            g[c] += bg[c];
            u[c] += bg[p.Ip + c];
          }
        // z and, for the backward, its exact fp32 derivatives (clamp masks decided on fp32 values, not on rounded
        // saved pre-activations, which would flip them near the limits).
        if (p.act == Activation::swiglu) {
          for (int c = 0; c < ncols; ++c) {
            const float s = 1.f / (1.f + fast_exp(-g[c]));
            const float silu = g[c] * s;
            Z[o + c] = Elem<T>::from(silu * u[c]);
            g[c] = u[c] * s * (1.f + g[c] * (1.f - s));
            u[c] = silu;
          }
        } else {
          const float alpha = p.alpha, limit = p.limit;
          for (int c = 0; c < ncols; ++c) {
            const float gc = g[c] < limit ? g[c] : limit;
            const float uc = u[c] < -limit ? -limit : (u[c] > limit ? limit : u[c]);
            const float s = 1.f / (1.f + fast_exp(-alpha * gc));
            Z[o + c] = Elem<T>::from((uc + 1.f) * gc * s);
            const float du = u[c] >= -limit && u[c] <= limit ? gc * s : 0.f;  // clamps pass the gradient inside
            g[c] = g[c] <= limit ? (uc + 1.f) * s * (1.f + alpha * gc * (1.f - s)) : 0.f;  // their closed interval
            u[c] = du;
          }
        }
        if (p.save)
          for (int c = 0; c < ncols; ++c) {
            zg[o + c] = Elem<T>::from(g[c]);
            zu[o + c] = Elem<T>::from(u[c]);
          }
      }
    }
  }

  static void fwd_down_lora(const Plan& p, const Rows& rows, int worker) {
    const int r2 = p.dn.rank, e = rows.e;
    T* pkA = scratch_T(p, worker);
    pack(static_cast<const char*>(p.dn.A) + elem_offset(p.dn.dtype, static_cast<size_t>(e) * r2 * p.I), p.dn.dtype,
         p.I, 1, r2, p.I, pkA);
    const T* Z = static_cast<const T*>(p.Z);
    float* ad = p.ad + static_cast<size_t>(rows.begin) * p.r2p;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
      gemm(Z + static_cast<size_t>(rows.begin + r0) * p.ldi, p.ldi, imin(kRowChunk, rows.count - r0), p.Ip, pkA,
           static_cast<size_t>(p.Ip) * kPanel, panels(r2), ad + static_cast<size_t>(r0) * p.r2p, p.r2p, false);
    scale_rows(ad, rows.count, r2, p.r2p, p.dn.scaling, static_cast<T*>(p.ad_s) + static_cast<size_t>(rows.begin) * p.r2p);
    pack(p.dn_Bt + static_cast<size_t>(e) * r2 * p.H, DType::f32, 1, p.H, p.H, r2, lora_pk(p, e));
  }

  static void fwd_down(const Plan& p, const Rows& rows, int block, int worker) {
    const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Hp - c0), nblocks = ncols / kPanel;
    const size_t wstride = static_cast<size_t>(p.Ip) * kPanel;
    const T* wd = w_ptr(p.wd, p.w_d_stride, rows.e) + (c0 / kPanel) * wstride;
    const size_t lstride = static_cast<size_t>(p.r2p) * kPanel;
    const T* ld_pk = p.dn.rank ? lora_pk(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
    const T* Z = static_cast<const T*>(p.Z);
    const T* ad_s = static_cast<const T*>(p.ad_s);
    float* c = scratch_f32(p, worker, 0);
    const int ld = p.col_block;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
      const int m = imin(kRowChunk, rows.count - r0);
      const size_t row = static_cast<size_t>(rows.begin + r0);
      gemm(Z + row * p.ldi, p.ldi, m, p.Ip, wd, wstride, nblocks, c, ld, false);
      if (ld_pk) gemm(ad_s + row * p.r2p, p.r2p, m, lora_depth(p.dn.rank, p.r2p), ld_pk, lstride, nblocks, c, ld, true);
      const float* bd = p.d_bias ? p.d_bias + static_cast<size_t>(rows.e) * p.Hp + c0 : nullptr;
      for (int r = 0; r < m; ++r) {
        const float w = p.row_weight[row + r];
        T* out = static_cast<T*>(p.rows_out) + static_cast<size_t>(p.row_src[row + r]) * p.Hp + c0;
        const float* src = c + r * ld;
        if (bd) {
          for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(w * (src[j] + bd[j]));
        } else {
          for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(w * src[j]);
        }
      }
    }
  }

  // ------------------------------------------------------------------------------------------- backward
  // Phases: 0 LoRA B factors to expert-major, 1 gather dY (+ dY Bd) per expert, 2 dZ' and the activation backward
  //         per (expert, I block), 3 dw, down LoRA grads, (dG Bg + dU Bu) and gate_up LoRA grads per expert,
  //         4 dX per (expert, H block), 5 sum over slots per token block, 6 B grads back to PEFT's layout.
  static void backward_item(const Plan& p, int phase, size_t item, int worker) {
    switch (phase) {
      case 0: return lora_b_to_expert_major(p, item);
      case 1: return bwd_gather(p, expert_rows(p, p.items[item]), worker);
      case 2: {
        const BlockItem b = block_item(p, item, p.Ip);
        return bwd_down(p, b.rows, b.block, worker);
      }
      case 3: return bwd_lora_grads(p, expert_rows(p, p.items[item]), worker);
      case 4: {
        const BlockItem b = block_item(p, item, p.Hp);
        return bwd_gate_up(p, b.rows, b.block, worker);
      }
      case 5: return reduce_slots(p, item, p.dx, worker);
      case 6: return lora_grad_b_to_peft(p, item);
    }
  }

  static void bwd_gather(const Plan& p, const Rows& rows, int worker) {
    T* dY = static_cast<T*>(p.dY);
    gather_rows(p, p.dy, rows, dY);
    const int r2 = p.dn.rank, e = rows.e;
    if (r2 == 0) return;
    // bdy = dY Bd: Bd^T as a [r2][H] operand.
    T* pk = scratch_T(p, worker);
    pack(p.dn_Bt + static_cast<size_t>(e) * r2 * p.H, DType::f32, p.H, 1, r2, p.H, pk);
    float* bdy = p.bdy + static_cast<size_t>(rows.begin) * p.r2p;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
      gemm(dY + static_cast<size_t>(rows.begin + r0) * p.ldh, p.ldh, imin(kRowChunk, rows.count - r0), p.Hp, pk,
           static_cast<size_t>(p.Hp) * kPanel, panels(r2), bdy + static_cast<size_t>(r0) * p.r2p, p.r2p, false);
    scale_rows(bdy, rows.count, r2, p.r2p, p.dn.scaling,
               static_cast<T*>(p.bdy_s) + static_cast<size_t>(rows.begin) * p.r2p);
    // Ad^T as an [I][r2] operand for the dZ' items.
    pack(static_cast<const char*>(p.dn.A) + elem_offset(p.dn.dtype, static_cast<size_t>(e) * r2 * p.I), p.dn.dtype,
         1, p.I, p.I, r2, lora_pk(p, e));
  }

  // Whether the backward's product with transposed weights for `count` rows (with no backward copy) transposes
  // each block right before its multiply-adds (gemm_transposed) rather than into panels in scratch: for one row
  // block on the vector unit.
  static bool transposes_as_used(bool copy, int count) {
    return !copy && !Ops::kTilesTakeAllRows && count <= Ops::MR;
  }

  static void bwd_down(const Plan& p, const Rows& rows, int block, int worker) {
    const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Ip - c0), nblocks = ncols / kPanel;
    const T* wd = w_ptr(p.wd, p.w_d_stride, rows.e);
    const size_t pstride = static_cast<size_t>(p.Hp) * kPanel;
    // The backward copy's panels as they lie; else blocks transposed as they are used, or panels in scratch.
    const bool copy = p.wd_t != nullptr, few = transposes_as_used(copy, rows.count);
    T* scratch = scratch_T(p, worker);
    if (!copy && !few) pack_transposed_panels(wd, p.Hp, p.Ip, c0, nblocks, pstride, scratch);
    float* c = scratch_f32(p, worker, nblocks * pstride);
    const int ld = p.col_block;
    const T* panels = copy ? w_ptr(p.wd_t, p.w_d_stride, rows.e) + (c0 / kPanel) * pstride : scratch;
    const size_t lstride = static_cast<size_t>(p.r2p) * kPanel;
    const T* la = p.dn.rank ? lora_pk(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
    const T* dY = static_cast<const T*>(p.dY);
    const T* bdy_s = static_cast<const T*>(p.bdy_s);
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
      const int m = imin(kRowChunk, rows.count - r0);
      const size_t row = static_cast<size_t>(rows.begin + r0);
      const T* a = dY + row * p.ldh;
      if (few)
        gemm_transposed(&a, &wd, 1, p.ldh, m, p.Hp, p.Ip, c0, nblocks, c, ld);
      else
        gemm(a, p.ldh, m, p.Hp, panels, pstride, nblocks, c, ld, false);
      if (la) gemm(bdy_s + row * p.r2p, p.r2p, m, lora_depth(p.dn.rank, p.r2p), la, lstride, nblocks, c, ld, true);
      activation_backward(p, c, ld, row, m, block, c0, ncols);
    }
  }

  // For rows row .. row + m - 1 and the columns c0 .. c0 + ncols of I block `block`, with dZ' in c (rows ld apart),
  // while it is in cache: dG and dU, and the block's share of dw (<dZ', Z> of the row, summed by phase 3).
  static void activation_backward(const Plan& p, const float* c, int ld, size_t row, int m, int block, int c0,
                                  int ncols) {
    const T* Z = static_cast<const T*>(p.Z);
    const T* zg = static_cast<const T*>(p.dz_dg);
    const T* zu = static_cast<const T*>(p.dz_du);
    T* dG = static_cast<T*>(p.dG);
    T* dU = static_cast<T*>(p.dU);
    const int blocks = p.column_blocks(p.Ip);
    for (int r = 0; r < m; ++r) {
      const size_t o = (row + r) * p.ldi + c0;
      const float* dz = c + r * ld;
      p.dw_parts[(row + r) * blocks + block] = dot(dz, Z + o, ncols);
      const float w = p.row_weight[row + r];
      for (int i = 0; i < ncols; ++i) {
        const float d = w * dz[i];
        dG[o + i] = Elem<T>::from(d * Elem<T>::to(zg[o + i]));
        dU[o + i] = Elem<T>::from(d * Elem<T>::to(zu[o + i]));
      }
    }
  }

  static void bwd_lora_grads(const Plan& p, const Rows& rows, int worker) {
    const T* Z = static_cast<const T*>(p.Z);
    const T* dG = static_cast<const T*>(p.dG);
    const T* dU = static_cast<const T*>(p.dU);
    const int blocks = p.column_blocks(p.Ip);
    for (int r = 0; r < rows.count; ++r) {
      const size_t row = static_cast<size_t>(rows.begin + r);
      float dwr = 0.f;
      for (int b = 0; b < blocks; ++b) dwr += p.dw_parts[row * blocks + b];
      if (p.d_bias) {  // the down bias is part of the expert output the routing weight scales
        const float* bd = p.d_bias + static_cast<size_t>(rows.e) * p.Hp;
        dwr += dot(bd, static_cast<const T*>(p.dY) + row * p.ldh, p.Hp);
      }
      p.dw[p.row_src[row]] = dwr;
    }
    const int e = rows.e;
    const float* wrow = p.row_weight + rows.begin;
    if (const int r2 = p.dn.rank) {
      const float* bdy = p.bdy + static_cast<size_t>(rows.begin) * p.r2p;
      const float* ad = p.ad + static_cast<size_t>(rows.begin) * p.r2p;
      // dAd[e*r2 + j][i] (+)= s2 sum_r w_r bdy[r][j] Z[r][i];
      // dBd[h][j*E + e] (via Gt[e][j][h]) = s2 sum_r w_r ad[r][j] dY[r][h]
      float* dA = p.dn_grad.A + static_cast<size_t>(e) * r2 * p.I;
      outer_grad(bdy, p.r2p, wrow, Z + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r2, p.I,
                 p.dn.scaling, dA, p.I, p.grad_accumulate);
      float* Gt = p.dn_Gt + static_cast<size_t>(e) * r2 * p.H;
      outer_grad(ad, p.r2p, wrow, static_cast<const T*>(p.dY) + static_cast<size_t>(rows.begin) * p.ldh, p.ldh,
                 rows.count, r2, p.H, p.dn.scaling, Gt, p.H, false);
    }
    if (const int r1 = p.gu.rank) {
      // gbg = dG Bg + dU Bu (Bg^T, Bu^T as [r1][I] operands), then its scaled copy for the dX items.
      T* pkg = scratch_T(p, worker);
      T* pku = pkg + packed_size(p.r1p, p.Ip);
      const float* Bt = p.gu_Bt + static_cast<size_t>(e) * r1 * 2 * p.I;
      pack(Bt, DType::f32, 2 * p.I, 1, r1, p.I, pkg);
      pack(Bt + p.I, DType::f32, 2 * p.I, 1, r1, p.I, pku);
      float* gbg = p.gbg + static_cast<size_t>(rows.begin) * p.r1p;
      const size_t pstride = static_cast<size_t>(p.Ip) * kPanel;
      for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
        const int m = imin(kRowChunk, rows.count - r0);
        const size_t row = static_cast<size_t>(rows.begin + r0);
        gemm(dG + row * p.ldi, p.ldi, m, p.Ip, pkg, pstride, panels(r1), gbg + r0 * p.r1p, p.r1p, false);
        gemm(dU + row * p.ldi, p.ldi, m, p.Ip, pku, pstride, panels(r1), gbg + r0 * p.r1p, p.r1p, true);
      }
      scale_rows(gbg, rows.count, r1, p.r1p, p.gu.scaling,
                 static_cast<T*>(p.gbg_s) + static_cast<size_t>(rows.begin) * p.r1p);
      const float* ag = p.ag + static_cast<size_t>(rows.begin) * p.r1p;
      // dAgu[e*r1 + j][h] (+)= s1 sum_r gbg[r][j] X[r][h];
      // dBgu[o][j*E + e] (via Gt[e][j][o]) = s1 sum_r ag[r][j] dG|dU[r][o]
      float* dA = p.gu_grad.A + static_cast<size_t>(e) * r1 * p.H;
      outer_grad(gbg, p.r1p, nullptr, static_cast<const T*>(p.X) + static_cast<size_t>(rows.begin) * p.ldh, p.ldh,
                 rows.count, r1, p.H, p.gu.scaling, dA, p.H, p.grad_accumulate);
      float* Gt = p.gu_Gt + static_cast<size_t>(e) * r1 * 2 * p.I;
      outer_grad(ag, p.r1p, nullptr, dG + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r1, p.I,
                 p.gu.scaling, Gt, 2 * p.I, false);
      outer_grad(ag, p.r1p, nullptr, dU + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r1, p.I,
                 p.gu.scaling, Gt + p.I, 2 * p.I, false);
      // Agu^T as an [H][r1] operand for the dX items.
      pack(static_cast<const char*>(p.gu.A) + elem_offset(p.gu.dtype, static_cast<size_t>(e) * r1 * p.H),
           p.gu.dtype, 1, p.H, p.H, r1, lora_pk(p, e));
    }
  }

  static void bwd_gate_up(const Plan& p, const Rows& rows, int block, int worker) {
    const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Hp - c0), nblocks = ncols / kPanel;
    const size_t pstride = static_cast<size_t>(p.Ip) * kPanel;
    const T* w[2] = {w_ptr(p.wg, p.w_gu_stride, rows.e), w_ptr(p.wu, p.w_gu_stride, rows.e)};
    // As in bwd_down.
    const bool copy = p.wg_t != nullptr, few = transposes_as_used(copy, rows.count);
    T* scratch = scratch_T(p, worker);
    const size_t at = (c0 / kPanel) * pstride;
    const T* pg = copy ? w_ptr(p.wg_t, p.w_gu_stride, rows.e) + at : scratch;
    const T* pu = copy ? w_ptr(p.wu_t, p.w_gu_stride, rows.e) + at : scratch + nblocks * pstride;
    if (!copy && !few) {
      pack_transposed_panels(w[0], p.Ip, p.Hp, c0, nblocks, pstride, scratch);
      pack_transposed_panels(w[1], p.Ip, p.Hp, c0, nblocks, pstride, scratch + nblocks * pstride);
    }
    const size_t lstride = static_cast<size_t>(p.r1p) * kPanel;
    const T* la = p.gu.rank ? lora_pk(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
    const T* dG = static_cast<const T*>(p.dG);
    const T* dU = static_cast<const T*>(p.dU);
    const T* gbg_s = static_cast<const T*>(p.gbg_s);
    float* c = scratch_f32(p, worker, 2 * static_cast<size_t>(nblocks) * pstride);
    const int ld = p.col_block;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
      const int m = imin(kRowChunk, rows.count - r0);
      const size_t row = static_cast<size_t>(rows.begin + r0);
      const T* a[2] = {dG + row * p.ldi, dU + row * p.ldi};
      if (few) {
        gemm_transposed(a, w, 2, p.ldi, m, p.Ip, p.Hp, c0, nblocks, c, ld);
      } else {
        gemm(a[0], p.ldi, m, p.Ip, pg, pstride, nblocks, c, ld, false);
        gemm(a[1], p.ldi, m, p.Ip, pu, pstride, nblocks, c, ld, true);
      }
      if (la) gemm(gbg_s + row * p.r1p, p.r1p, m, lora_depth(p.gu.rank, p.r1p), la, lstride, nblocks, c, ld, true);
      for (int r = 0; r < m; ++r) {
        T* out = static_cast<T*>(p.rows_out) + static_cast<size_t>(p.row_src[row + r]) * p.Hp + c0;
        for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(c[r * ld + j]);
      }
    }
  }
};

// The Backend table entries, dispatching on the compute type.
inline void backend_pack(DType compute, const void* src, DType st, ptrdiff_t sn, ptrdiff_t sk, int N, int K,
                         void* dst) {
  if (compute == DType::bf16)
    Core<bf16>::pack(src, st, sn, sk, N, K, static_cast<bf16*>(dst));
  else
    Core<float>::pack(src, st, sn, sk, N, K, static_cast<float*>(dst));
}

inline void backend_forward_item(DType compute, const Plan& p, int phase, size_t item, int worker) {
  if (compute == DType::bf16)
    Core<bf16>::forward_item(p, phase, item, worker);
  else
    Core<float>::forward_item(p, phase, item, worker);
}

inline void backend_backward_item(DType compute, const Plan& p, int phase, size_t item, int worker) {
  if (compute == DType::bf16)
    Core<bf16>::backward_item(p, phase, item, worker);
  else
    Core<float>::backward_item(p, phase, item, worker);
}
