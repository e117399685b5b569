// Reports how the extension was built, so dinov3_fast.backends() can say why a backend is missing.
#include "bindings.h"

#ifdef DINOV3_FAST_OPENMP
#include <omp.h>
#endif

namespace dinov3_fast {

void bind_build_info(pybind11::module_& m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef DINOV3_FAST_OPENMP
    info["openmp"] = true;
    info["omp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["omp_max_threads"] = 1;
#endif
#ifdef DINOV3_FAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = DINOV3_FAST_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    return info;
  });
}

}  // namespace dinov3_fast
