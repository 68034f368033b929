// The contrastive loss, AVX2 + FMA build.
#pragma GCC target("avx2,fma")
#define BRCD_ISA avx2
#define BRCD_TILE_ROWS 4
#include "cpu/contrastive_impl.h"
