#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "dinov3_fast native kernels: CPU (OpenMP) and CUDA launchers over raw pointers";
  dinov3_fast::bind_build_info(m);
  dinov3_fast::bind_koleo(m);
#ifdef DINOV3_FAST_WITH_CUDA
  dinov3_fast::bind_sinkhorn(m);
#endif
}
