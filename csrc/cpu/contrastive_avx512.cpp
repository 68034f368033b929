// The contrastive loss, AVX-512 build.
// Standard headers come before the target pragma: functions they define must keep the default target, or GCC 13
// refuses to inline them ("target specific option mismatch").
#include "cpu/contrastive_prelude.h"

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define BRCD_ISA avx512
#define BRCD_TILE_ROWS 8
#define BRCD_VSCALEF 1  // AVX-512F's scale by a power of two (see exp_shifted_line)
#include "cpu/contrastive_impl.h"
