// Host-side registration hooks: each op's csrc/<op>.cpp defines one bind_<op>() that adds its
// functions to the _C module. Functions take raw pointers (as integers), sizes and, for CUDA
// launches, a stream handle, so no torch header is ever included.
#pragma once
#include <pybind11/pybind11.h>

namespace dinov3_fast {
void bind_build_info(pybind11::module_& m);
void bind_koleo(pybind11::module_& m);
#ifdef DINOV3_FAST_WITH_CUDA
void bind_sinkhorn(pybind11::module_& m);
#endif
}  // namespace dinov3_fast
