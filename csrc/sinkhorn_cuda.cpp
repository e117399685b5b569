// Host glue for the persistent Sinkhorn-Knopp kernel (kernels/sinkhorn.cu): pointers travel as
// integers, so no torch or CUDA header is needed here. Compiled into _C only with the CUDA kernels.
#ifdef DINOV3_FAST_WITH_CUDA
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "sinkhorn.h"

namespace dinov3_fast {

namespace {
void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string(what) + ": " + dinov3_fast_cuda_error_string(code));
  }
}
}  // namespace

void bind_sinkhorn(pybind11::module_& m) {
  m.def("sinkhorn_max_batch", &dinov3_fast_sinkhorn_max_batch,
        "Largest batch B the persistent Sinkhorn-Knopp kernel accepts.");
  m.def(
      "sinkhorn_workspace_bytes",
      [](int64_t B, int64_t K, int dtype, int device) {
        int64_t bytes = 0;
        check(dinov3_fast_sinkhorn_workspace(B, K, dtype, device, &bytes), "sinkhorn_workspace_bytes");
        return bytes;
      },
      "Device workspace (bytes) for a (B, K) launch; dtype 0 fp32, 1 bf16, 2 fp16.");
  m.def(
      "sinkhorn_knopp_cuda",
      [](uintptr_t x, int dtype, uintptr_t out, uintptr_t workspace, int64_t workspace_bytes, int64_t B,
         int64_t K, int64_t stride_b, float scale, int n_iter, int device, uintptr_t stream) {
        check(dinov3_fast_sinkhorn_launch(reinterpret_cast<const void*>(x), dtype, reinterpret_cast<float*>(out),
                                          reinterpret_cast<void*>(workspace), workspace_bytes, B, K, stride_b,
                                          scale, n_iter, device, stream),
              "sinkhorn_knopp_cuda");
      },
      "One cooperative launch of all Sinkhorn-Knopp rounds: x (B, K) -> out (B, K) fp32.");
}

}  // namespace dinov3_fast
#endif  // DINOV3_FAST_WITH_CUDA
