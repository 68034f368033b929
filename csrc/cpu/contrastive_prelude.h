// Every header contrastive_impl.h needs, included before a translation unit sets its target pragma.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/contrastive.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX-512 build's exponential (exp_shifted_line)
#endif
