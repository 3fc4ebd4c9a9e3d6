// The three storage dtypes every kernel supports (float64 is left to the PyTorch path).
#pragma once

#include <ATen/Dispatch.h>

#define LATENTDIFF_DISPATCH(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
