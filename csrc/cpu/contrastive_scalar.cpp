// The contrastive loss, portable build (the compiler's baseline vectors).
// Standard headers come before the target pragma: functions they define must keep the default target, or GCC 13
// refuses to inline them ("target specific option mismatch").
#include "cpu/contrastive_prelude.h"


#define BRCD_ISA scalar
#define BRCD_TILE_ROWS 4
#include "cpu/contrastive_impl.h"
