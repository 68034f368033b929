// The contrastive loss, portable build (the compiler's baseline vectors).

#define BRCD_ISA scalar
#define BRCD_TILE_ROWS 4
#include "cpu/contrastive_impl.h"
