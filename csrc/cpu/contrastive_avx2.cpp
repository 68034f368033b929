// The contrastive loss, AVX2 + FMA build.
// Standard headers come before the target pragma: functions they define must keep the default target, or GCC 13
// refuses to inline them ("target specific option mismatch").
#include "cpu/contrastive_prelude.h"

#pragma GCC target("avx2,fma")
#define BRCD_ISA avx2
#define BRCD_TILE_ROWS 4
#include "cpu/contrastive_impl.h"
