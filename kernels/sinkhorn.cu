// Sinkhorn-Knopp teacher centering in one persistent launch (DINOv3, dinov3/loss/*.py).
//
// Same log-domain algorithm as dinov3_fast/ops/sinkhorn/triton.py: with y = logits * log2(e) / temp
// (recomputed on every pass, never stored), the output is exp2(y_bk + a_k + beta_b), where
//   prototype step  a_k    = -log2 sum_b exp2(y_bk + beta_b)
//   sample step     beta_b = -log2 sum_k exp2(y_bk + a_k)
// DINOv3's constants cancel exactly. Sums are shifted (first prototype step: the per-prototype max,
// later: the previous a_k; sample steps: the running max), so nothing overflows or underflows.
//
// Schedule: the grid is exactly as large as can be co-resident (occupancy x SMs) and is launched
// with cudaLaunchCooperativeKernel, which guarantees co-residency (or fails), so the grid-wide
// barrier cooperative_groups::grid_group::sync() is safe. Per round:
//   1. prototype step: each thread owns prototypes k (grid-stride) and loops over the B samples;
//      writes a_k.                                                                  -> grid.sync
//   2. sample step: work item (b, split) per block: online max/sum over its K range, block
//      reduction, writes one partial (m, s).                                         -> grid.sync
// Every block folds the (B, nsplit) partials into beta in shared memory before it needs them.
// Finally out = exp2(y + a + beta). When B x K fits in L2 (DINO teacher: 32 x 262,144 fp32 = 32 MiB)
// the 7 reads after the first come from L2.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "sinkhorn.h"

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatch = 2048;  // s_beta: 8 KiB of shared memory

struct SinkhornParams {
  const void* x;     // (B, K) logits, row stride stride_b
  float* out;        // (B, K) fp32
  float* a;          // (K,) prototype potentials
  float* part_m;     // (B, nsplit) running max of each sample-step partial
  float* part_s;     // (B, nsplit) shifted sum of each partial
  int64_t B, K, stride_b, cols_per_split;
  int nsplit, n_iter;
  float scale;
};

__device__ __forceinline__ float load_f32(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }

// Merge the shifted sum (m2, s2) into (m, s): s is relative to m. -inf shifts carry nothing.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  const float ref = (mn == -INFINITY) ? 0.f : mn;
  s = s * exp2f(m - ref) + s2 * exp2f(m2 - ref);
  m = mn;
}

// Block-wide merge of per-thread (m, s); the result is valid in thread 0.
__device__ void block_lse_reduce(float& m, float& s, float* red_m, float* red_s) {
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_down_sync(0xffffffffu, m, off);
    const float s2 = __shfl_down_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? red_m[lane] : -INFINITY;
    s = lane < kWarps ? red_s[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_down_sync(0xffffffffu, m, off);
      const float s2 = __shfl_down_sync(0xffffffffu, s, off);
      lse_merge(m, s, m2, s2);
    }
  }
  __syncthreads();
}

// beta_b = -(m + log2 s) over the nsplit partials of sample b, for every b, into shared memory.
__device__ void load_beta(const SinkhornParams& p, float* s_beta) {
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    float m = -INFINITY, s = 0.f;
    for (int j = 0; j < p.nsplit; ++j) lse_merge(m, s, p.part_m[b * p.nsplit + j], p.part_s[b * p.nsplit + j]);
    s_beta[b] = -(m + log2f(s));
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sinkhorn_persistent_kernel(SinkhornParams p) {
  cg::grid_group grid = cg::this_grid();
  __shared__ float s_beta[kMaxBatch];
  __shared__ float red_m[kWarps], red_s[kWarps];
  const T* x = static_cast<const T*>(p.x);
  const int64_t n_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  for (int it = 0; it < p.n_iter; ++it) {
    // ---- prototype step: a_k = -log2 sum_b exp2(y_bk + beta_b)
    if (it > 0) load_beta(p, s_beta);
    for (int64_t k = tid; k < p.K; k += n_threads) {
      float m, s = 0.f;
      if (it == 0) {
        m = -INFINITY;
        for (int64_t b = 0; b < p.B; ++b) {
          const float y = load_f32(x + b * p.stride_b + k) * p.scale;
          lse_merge(m, s, y, 1.f);
        }
      } else {
        const float a = p.a[k];
        m = -a;
#pragma unroll 4
        for (int64_t b = 0; b < p.B; ++b) s += exp2f(load_f32(x + b * p.stride_b + k) * p.scale + s_beta[b] + a);
      }
      p.a[k] = -(m + log2f(s));
    }
    grid.sync();
    // ---- sample step: partial (m, s) of sum_k exp2(y_bk + a_k) per (b, split)
    for (int64_t item = blockIdx.x; item < p.B * p.nsplit; item += gridDim.x) {
      const int64_t b = item / p.nsplit;
      const int64_t c0 = (item % p.nsplit) * p.cols_per_split;
      const int64_t c1 = c0 + p.cols_per_split < p.K ? c0 + p.cols_per_split : p.K;
      float m = -INFINITY, s = 0.f;
      for (int64_t k = c0 + threadIdx.x; k < c1; k += blockDim.x) {
        lse_merge(m, s, load_f32(x + b * p.stride_b + k) * p.scale + p.a[k], 1.f);
      }
      block_lse_reduce(m, s, red_m, red_s);
      if (threadIdx.x == 0) {
        p.part_m[item] = m;
        p.part_s[item] = s;
      }
    }
    grid.sync();
  }
  // ---- output: exp2(y + a + beta)
  load_beta(p, s_beta);
  for (int64_t i = tid; i < p.B * p.K; i += n_threads) {
    const int64_t b = i / p.K, k = i - b * p.K;
    p.out[i] = exp2f(load_f32(x + b * p.stride_b + k) * p.scale + p.a[k] + s_beta[b]);
  }
}

template <typename T>
cudaError_t plan(int64_t B, int64_t K, int device, int* grid, int* nsplit, int64_t* cols_per_split) {
  int sms = 0, per_sm = 0, coop = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err != cudaSuccess) return err;
  if (!coop) return cudaErrorNotSupported;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sinkhorn_persistent_kernel<T>, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorLaunchOutOfResources;
  *grid = per_sm * sms;
  const int64_t splits = *grid / B > 1 ? *grid / B : 1;
  *cols_per_split = (K + splits - 1) / splits;
  *nsplit = static_cast<int>((K + *cols_per_split - 1) / *cols_per_split);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch(const void* x, float* out, void* workspace, int64_t workspace_bytes, int64_t B, int64_t K,
                   int64_t stride_b, float scale, int n_iter, int device, cudaStream_t stream) {
  int grid = 0, nsplit = 0;
  int64_t cols = 0;
  cudaError_t err = plan<T>(B, K, device, &grid, &nsplit, &cols);
  if (err != cudaSuccess) return err;
  if (B > kMaxBatch || workspace_bytes < static_cast<int64_t>(sizeof(float)) * (K + 2 * B * nsplit)) {
    return cudaErrorInvalidValue;
  }
  SinkhornParams p;
  p.x = x;
  p.out = out;
  p.a = static_cast<float*>(workspace);
  p.part_m = p.a + K;
  p.part_s = p.part_m + B * nsplit;
  p.B = B;
  p.K = K;
  p.stride_b = stride_b;
  p.cols_per_split = cols;
  p.nsplit = nsplit;
  p.n_iter = n_iter;
  p.scale = scale;
  void* args[] = {&p};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(sinkhorn_persistent_kernel<T>), dim3(grid),
                                     dim3(kThreads), args, 0, stream);
}

// Sizes the launcher can take. Checked before anything divides by them: plan() divides by B and
// by cols_per_split (0 when K is 0), a host SIGFPE; with n_iter < 1 no round writes the partials
// that the final pass reads, and the output would be the workspace's garbage.
bool valid_problem(int64_t B, int64_t K, int64_t stride_b, int n_iter) {
  return B >= 1 && B <= kMaxBatch && K >= 1 && stride_b >= 0 && n_iter >= 1;
}

// Makes `device` current for the queries and the launch, and restores the caller's device after:
// the occupancy query reads the current device (not the one passed to plan()), and a bare
// cudaSetDevice would leave the calling thread on `device` once the call returns.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = -1;
    err_ = cudaGetDevice(&current);
    if (err_ != cudaSuccess || current == device) return;  // nothing to switch, nothing to restore
    err_ = cudaSetDevice(device);
    if (err_ == cudaSuccess) restore_ = current;
  }
  ~DeviceGuard() {
    if (restore_ >= 0) cudaSetDevice(restore_);
  }
  cudaError_t error() const { return err_; }

 private:
  int restore_ = -1;
  cudaError_t err_ = cudaSuccess;
};

}  // namespace

extern "C" int64_t dinov3_fast_sinkhorn_max_batch() { return kMaxBatch; }

extern "C" int dinov3_fast_sinkhorn_workspace(int64_t B, int64_t K, int dtype, int device, int64_t* bytes) {
  *bytes = 0;
  if (!valid_problem(B, K, /*stride_b=*/K, /*n_iter=*/1)) return static_cast<int>(cudaErrorInvalidValue);  // sizes only
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return static_cast<int>(guard.error());
  int grid = 0, nsplit = 0;
  int64_t cols = 0;
  cudaError_t err = dtype == 0   ? plan<float>(B, K, device, &grid, &nsplit, &cols)
                    : dtype == 1 ? plan<__nv_bfloat16>(B, K, device, &grid, &nsplit, &cols)
                    : dtype == 2 ? plan<__half>(B, K, device, &grid, &nsplit, &cols)
                                 : cudaErrorInvalidValue;
  *bytes = static_cast<int64_t>(sizeof(float)) * (K + 2 * B * nsplit);
  return static_cast<int>(err);
}

extern "C" int dinov3_fast_sinkhorn_launch(const void* x, int dtype, float* out, void* workspace,
                                           int64_t workspace_bytes, int64_t B, int64_t K, int64_t stride_b,
                                           float scale, int n_iter, int device, uintptr_t stream) {
  if (!valid_problem(B, K, stride_b, n_iter) || x == nullptr || out == nullptr || workspace == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return static_cast<int>(guard.error());
  cudaError_t err = cudaSuccess;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: err = launch<float>(x, out, workspace, workspace_bytes, B, K, stride_b, scale, n_iter, device, s); break;
    case 1:
      err = launch<__nv_bfloat16>(x, out, workspace, workspace_bytes, B, K, stride_b, scale, n_iter, device, s);
      break;
    case 2: err = launch<__half>(x, out, workspace, workspace_bytes, B, K, stride_b, scale, n_iter, device, s); break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

extern "C" const char* dinov3_fast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
