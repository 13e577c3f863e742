// AVX-512 BF16 backend (Zen 4/5, Cooper Lake and later; compiled with -mavx512f -mavx512bf16 ...): one
// vdpbf16ps multiplies 16 columns x 2 reduction values per instruction.
#include <immintrin.h>

#include "../plan.h"

namespace {
using namespace kt;
#include "portable_extras.h"
#include "avx_extras.h"
#include "avx512_bf16_ops.h"
using Ops = Avx512Bf16Ops;
#include "../kernel_impl.h"
}  // namespace

KT_DEFINE_BACKEND(avx512_bf16)
