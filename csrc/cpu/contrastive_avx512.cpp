// The contrastive loss, AVX-512 build.
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define BRCD_ISA avx512
#define BRCD_TILE_ROWS 8
#include "cpu/contrastive_impl.h"
