// C interface of kernels/sinkhorn.cu (no CUDA or torch headers, so host glue compiles with g++).
#pragma once
#include <cstdint>

extern "C" {
// Largest batch the persistent kernel supports (its sample potentials live in shared memory).
int64_t dinov3_fast_sinkhorn_max_batch();
// Both calls make `device` current for their duration and restore the caller's device; sizes
// outside 1 <= B <= max_batch, K >= 1, stride_b >= 0, n_iter >= 1 return cudaErrorInvalidValue.
// Bytes of device workspace the launch needs for (B, K) on `device`; returns a cudaError_t code.
int dinov3_fast_sinkhorn_workspace(int64_t B, int64_t K, int dtype, int device, int64_t* bytes);
// One cooperative launch running all n_iter Sinkhorn-Knopp rounds and the final write.
//   x: (B, K) logits of `dtype` (0 fp32, 1 bf16, 2 fp16), row stride stride_b, unit column stride
//   out: (B, K) fp32, contiguous; workspace: dinov3_fast_sinkhorn_workspace() bytes
//   scale: log2(e) / teacher_temp; stream: a cudaStream_t as an integer
// Returns a cudaError_t code (0 on success).
int dinov3_fast_sinkhorn_launch(const void* x, int dtype, float* out, void* workspace, int64_t workspace_bytes,
                                int64_t B, int64_t K, int64_t stride_b, float scale, int n_iter, int device,
                                uintptr_t stream);
const char* dinov3_fast_cuda_error_string(int code);
}
