// AMX-BF16 backend (Sapphire Rapids and later; compiled with -mamx-tile -mamx-bf16 and the AVX-512 BF16 flags):
// 16 x 32 bf16 A tiles times 32 x 16 B tiles into 16 x 16 fp32 tiles. The packed weight panels are B tiles as they
// lie, activation rows are A tiles with their row stride (the last tile of a GEMM with as many rows as are left).
// The fp32 path and the backward's few-rows product with transposed weights run on the AVX-512 BF16 vector
// micro-kernel. Linux grants AMX state per process; moe_layer.cpp asks for it before choosing this.
#include <immintrin.h>

#include "../plan.h"

namespace {
using namespace kt;
#include "portable_extras.h"
#include "avx_extras.h"
#include "avx512_bf16_ops.h"

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct Ops : Avx512Bf16Ops {
  // Tiles 0-3: C (2 x 2 blocks of 16 x 16 fp32), 4-5: A (16 rows x 32 bf16), 6-7: B (16 pair rows x 16 columns).
  template <int MT, int NT>
  static void tile_block(const bf16* A, size_t lda, const bf16* B, size_t bstride, int K, float* C, size_t ldc,
                         bool acc) {
    const int sa = static_cast<int>(lda * 2), sc = static_cast<int>(ldc * 4);
    float* C1 = C + 16 * ldc;
    if (acc) {
      _tile_loadd(0, C, sc);
      if (NT > 1) _tile_loadd(1, C + 16, sc);
      if (MT > 1) _tile_loadd(2, C1, sc);
      if (MT > 1 && NT > 1) _tile_loadd(3, C1 + 16, sc);
    } else {
      _tile_zero(0);
      if (NT > 1) _tile_zero(1);
      if (MT > 1) _tile_zero(2);
      if (MT > 1 && NT > 1) _tile_zero(3);
    }
    for (int k = 0; k < K; k += 32) {
      _tile_loadd(4, A + k, sa);
      if (MT > 1) _tile_loadd(5, A + 16 * lda + k, sa);
      _tile_loadd(6, B + static_cast<size_t>(k) * kPanel, 64);
      if (NT > 1) _tile_loadd(7, B + bstride + static_cast<size_t>(k) * kPanel, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (NT > 1) _tile_dpbf16ps(1, 4, 7);
      if (MT > 1) _tile_dpbf16ps(2, 5, 6);
      if (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, sc);
    if (NT > 1) _tile_stored(1, C + 16, sc);
    if (MT > 1) _tile_stored(2, C1, sc);
    if (MT > 1 && NT > 1) _tile_stored(3, C1 + 16, sc);
  }

  template <int MT>
  static void tile_row(const bf16* A, size_t lda, const bf16* B, size_t bstride, int K, int nblocks, float* C,
                       size_t ldc, bool acc) {
    int nb = 0;
    for (; nb + 2 <= nblocks; nb += 2)
      tile_block<MT, 2>(A, lda, B + nb * bstride, bstride, K, C + nb * kPanel, ldc, acc);
    if (nb < nblocks) tile_block<MT, 1>(A, lda, B + nb * bstride, bstride, K, C + nb * kPanel, ldc, acc);
  }

  // The backward packs transposed panels for the tiles even for a few rows: a tile multiply beats multiplying
  // transposed blocks on the vector unit as they are made (the measurement is in benchmarks/results/README.md).
  static constexpr bool kTilesTakeAllRows = true;

  // C and A tiles of `rows` rows (AMX multiplies only those), B tiles of 16 pair rows.
  static void configure(int rows) {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = static_cast<uint8_t>(t < 6 ? rows : 16);
    }
    _tile_loadconfig(&c);
  }

  // Every row: 16-row blocks in pairs, then one, then the rows left with tiles of that many rows, which cost a
  // fraction of a block (at qlen 128 an expert gets about 8 rows; the vector kernel took twice as long for them).
  static int gemm_tiles(const bf16* A, size_t lda, int M, int K, const bf16* B, size_t bstride, int nblocks,
                        float* C, size_t ldc, bool acc) {
    if (M == 0 || K % 32 != 0) return 0;
    configure(M < 16 ? M : 16);
    int m = 0;
    for (; m + 32 <= M; m += 32) tile_row<2>(A + m * lda, lda, B, bstride, K, nblocks, C + m * ldc, ldc, acc);
    if (m + 16 <= M) {
      tile_row<1>(A + m * lda, lda, B, bstride, K, nblocks, C + m * ldc, ldc, acc);
      m += 16;
    }
    if (m < M) {
      if (m > 0) configure(M - m);
      tile_row<1>(A + m * lda, lda, B, bstride, K, nblocks, C + m * ldc, ldc, acc);
    }
    _tile_release();
    return M;
  }
  static int gemm_tiles(const float*, size_t, int, int, const float*, size_t, int, float*, size_t, bool) { return 0; }
};

#include "../kernel_impl.h"
}  // namespace

KT_DEFINE_BACKEND(amx_bf16)
