// Every header contrastive_impl.h needs, included before a translation unit sets its target pragma.
#pragma once
#include <immintrin.h>
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
