// KoLeo nearest-neighbour search on the CPU: blocked, OpenMP over query blocks, no n x n matrix.
//
// Input: y (M, D) row-major L2-normalised rows (fp32 or fp64); queries are rows [q0, q0 + nq).
// Output: idx (nq, topk) int64, the candidates with the largest dot product, best first.
// Semantics are DINOv3's: a query's own entry competes with value -1 (the reference fills the
// diagonal with -1), NaN compares above everything (as torch.max / torch.topk), and among equal
// dots the lowest index wins (torch.max's rule).
//
// A 4 x 4 register-blocked dot kernel fills kBlock x kBlock tiles of dots (fp32 accumulation for
// fp32, fp64 for fp64), which then update each query's running top-k; only one tile per thread is
// ever in memory. The fp32 dot kernel is compiled for AVX-512, AVX2 and baseline x86-64
// (target_clones), since the build passes no -march.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"

namespace dinov3_fast {
namespace {

constexpr int64_t kBlock = 64;  // query and candidate tile edge
constexpr double kPdistEps = 1e-8;  // nn.PairwiseDistance(2, eps=1e-8)

// dots[r * ldd + c] = <q_r, c_c> for r < nr, c < nc; q and c are row-major with row stride D.
// Every dot goes through the same 4 x 4 block (ragged edges re-read the last row or column and
// drop the copies), so equal rows give bitwise-equal dots wherever they sit: ties are real ties.
template <typename T>
__attribute__((always_inline)) inline void dot_tile(const T* __restrict q, int64_t nr, const T* __restrict c,
                                                    int64_t nc, int64_t D, T* __restrict dots, int64_t ldd) {
  for (int64_t r = 0; r < nr; r += 4) {
    const T* q0 = q + r * D;
    const T* q1 = q + std::min(r + 1, nr - 1) * D;
    const T* q2 = q + std::min(r + 2, nr - 1) * D;
    const T* q3 = q + std::min(r + 3, nr - 1) * D;
    for (int64_t j = 0; j < nc; j += 4) {
      const T* c0 = c + j * D;
      const T* c1 = c + std::min(j + 1, nc - 1) * D;
      const T* c2 = c + std::min(j + 2, nc - 1) * D;
      const T* c3 = c + std::min(j + 3, nc - 1) * D;
      T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
      for (int64_t d = 0; d < D; ++d) {
        const T v0 = c0[d], v1 = c1[d], v2 = c2[d], v3 = c3[d];
        s00 += q0[d] * v0; s01 += q0[d] * v1; s02 += q0[d] * v2; s03 += q0[d] * v3;
        s10 += q1[d] * v0; s11 += q1[d] * v1; s12 += q1[d] * v2; s13 += q1[d] * v3;
        s20 += q2[d] * v0; s21 += q2[d] * v1; s22 += q2[d] * v2; s23 += q2[d] * v3;
        s30 += q3[d] * v0; s31 += q3[d] * v1; s32 += q3[d] * v2; s33 += q3[d] * v3;
      }
      const T acc[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
      for (int64_t rr = 0; rr < std::min<int64_t>(4, nr - r); ++rr)
        for (int64_t cc = 0; cc < std::min<int64_t>(4, nc - j); ++cc) dots[(r + rr) * ldd + j + cc] = acc[rr][cc];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void dot_tile_fast(const float* q, int64_t nr, const float* c, int64_t nc, int64_t D, float* dots, int64_t ldd) {
  dot_tile<float>(q, nr, c, nc, D, dots, ldd);
}

void dot_tile_fast(const double* q, int64_t nr, const double* c, int64_t nc, int64_t D, double* dots, int64_t ldd) {
  dot_tile<double>(q, nr, c, nc, D, dots, ldd);
}

// Running top-k of one query, kept sorted best first under (value desc, index asc).
template <typename T>
struct TopK {
  T* val;
  int64_t* idx;
  int64_t k;

  static bool better(T v, int64_t j, T w, int64_t i) { return v > w || (v == w && j < i); }

  void offer(T v, int64_t j) {
    if (std::isnan(v)) v = std::numeric_limits<T>::infinity();  // NaN ranks above every number
    if (!better(v, j, val[k - 1], idx[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && better(v, j, val[p - 1], idx[p - 1])) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = j;
  }
};

// Queries are a sub-range of the candidates (the distributed form): each thread owns whole query
// blocks and sweeps every candidate tile.
template <typename T>
void search_rows(const T* y, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk, int64_t* out) {
  const int64_t n_blocks = (nq + kBlock - 1) / kBlock;
#pragma omp parallel
  {
    std::vector<T> dots(kBlock * kBlock);
    std::vector<T> best_val(kBlock * topk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * kBlock, nr = std::min(kBlock, nq - r0);
      std::fill(best_val.begin(), best_val.end(), -std::numeric_limits<T>::infinity());
      std::fill(out + r0 * topk, out + (r0 + nr) * topk, M);  // sentinel index M: worse than any candidate
      for (int64_t c0 = 0; c0 < M; c0 += kBlock) {
        const int64_t nc = std::min(kBlock, M - c0);
        dot_tile_fast(y + (q0 + r0) * D, nr, y + c0 * D, nc, D, dots.data(), kBlock);
        for (int64_t r = 0; r < nr; ++r) {
          TopK<T> best{best_val.data() + r * topk, out + (r0 + r) * topk, topk};
          const int64_t self = q0 + r0 + r;
          for (int64_t j = 0; j < nc; ++j) best.offer(c0 + j == self ? T(-1) : dots[r * kBlock + j], c0 + j);
        }
      }
    }
  }
}

// Every row queries every row: y y^T is symmetric, so only tiles (I, J >= I) are formed and each
// updates the rows of I (over J's columns) and the rows of J (over I's rows): half the FLOPs.
// Each thread keeps a top-k list for all M rows; the lists are merged at the end. The merge rule
// is a total order, so the result does not depend on the thread count or schedule.
template <typename T>
void search_all(const T* y, int64_t M, int64_t D, int64_t topk, int64_t* out) {
  const int64_t n_blocks = (M + kBlock - 1) / kBlock;
  std::vector<T> best_val(M * topk, -std::numeric_limits<T>::infinity());
  std::fill(out, out + M * topk, M);
#pragma omp parallel
  {
    std::vector<T> dots(kBlock * kBlock);
    std::vector<T> val(M * topk, -std::numeric_limits<T>::infinity());
    std::vector<int64_t> idx(M * topk, M);
    auto row = [&](int64_t i) { return TopK<T>{val.data() + i * topk, idx.data() + i * topk, topk}; };
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const int64_t i0 = bi * kBlock, ni = std::min(kBlock, M - i0);
      for (int64_t bj = bi; bj < n_blocks; ++bj) {
        const int64_t j0 = bj * kBlock, nj = std::min(kBlock, M - j0);
        dot_tile_fast(y + i0 * D, ni, y + j0 * D, nj, D, dots.data(), kBlock);
        for (int64_t r = 0; r < ni; ++r) {
          TopK<T> best = row(i0 + r);
          for (int64_t c = 0; c < nj; ++c) best.offer(bi == bj && r == c ? T(-1) : dots[r * kBlock + c], j0 + c);
        }
        if (bi == bj) continue;
        for (int64_t c = 0; c < nj; ++c) {
          TopK<T> best = row(j0 + c);
          for (int64_t r = 0; r < ni; ++r) best.offer(dots[r * kBlock + c], i0 + r);
        }
      }
    }
#pragma omp critical
    for (int64_t i = 0; i < M; ++i) {
      TopK<T> merged{best_val.data() + i * topk, out + i * topk, topk};
      for (int64_t s = 0; s < topk && idx[i * topk + s] < M; ++s) merged.offer(val[i * topk + s], idx[i * topk + s]);
    }
  }
}

template <typename T>
void search(const T* y, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk, int64_t* out) {
  if (q0 == 0 && nq == M)
    search_all(y, M, D, topk, out);
  else
    search_rows(y, M, D, q0, nq, topk, out);
}

// Per (query, slot) pair: d = ||u||, y_q.u and y_j.u with u = y_q - y_j + 1e-8, into stats (3, nq, topk).
template <typename T>
void pair_stats(const T* y, int64_t D, int64_t q0, int64_t nq, int64_t topk, const int64_t* idx, T* stats) {
  const int64_t pairs = nq * topk;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p) {
    const T* yq = y + (q0 + p / topk) * D;
    const T* yj = y + idx[p] * D;
    double d2 = 0, a = 0, b = 0;
    for (int64_t k = 0; k < D; ++k) {
      const T u = yq[k] - yj[k] + T(kPdistEps);
      d2 += double(u) * u;
      a += double(yq[k] * u);
      b += double(yj[k] * u);
    }
    stats[p] = T(std::sqrt(d2));
    stats[pairs + p] = T(a);
    stats[2 * pairs + p] = T(b);
  }
}

// dx (M, D) in one pass per row i, no atomics: i's own pairs plus the pairs that chose i as their
// neighbour (CSR: order[start[i] .. start[i+1]) are their pair ids). Per pair, c = scale / ((d + eps) d)
// and dx_i += c (u - [nrm_i > eps] y_i (y_i.u)) / nrm_i with the sign of d/dy_i, where
// nrm = max(||x||, eps) (a row at or below eps is divided by eps: no radial term). Terms are summed in
// fp64: a duplicated row gets equal and opposite terms ~1 / (n d^2) from its own pair and its
// twin's, which must cancel without swamping the rest. A row paired with itself (topk = n) gets 0.
template <typename T>
void backward(const T* y, const T* nrm, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk,
              const int64_t* idx, const T* stats, const int64_t* order, const int64_t* start, double scale,
              double eps, T* dx) {
  const int64_t pairs = nq * topk;
  auto coef = [&](int64_t p) { const T d = stats[p]; return d == T(0) ? T(0) : T(scale / ((double(d) + eps) * d)); };
#pragma omp parallel
  {
    std::vector<double> acc(D);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < M; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const T* yi = y + i * D;
      const T radial = nrm[i] > T(eps) ? T(1) : T(0);  // in T: nrm holds eps rounded to T
      if (i >= q0 && i < q0 + nq) {
        for (int64_t p = (i - q0) * topk; p < (i - q0 + 1) * topk; ++p) {
          if (idx[p] == i) continue;
          const T c = coef(p), ra = radial * stats[pairs + p];
          const T* yj = y + idx[p] * D;
          for (int64_t k = 0; k < D; ++k) acc[k] += double(c * ((yi[k] - yj[k] + T(kPdistEps)) - ra * yi[k]));
        }
      }
      for (int64_t o = start[i]; o < start[i + 1]; ++o) {
        const int64_t p = order[o], row = q0 + p / topk;
        if (row == i) continue;
        const T c = coef(p), rb = radial * stats[2 * pairs + p];
        const T* yq = y + row * D;
        for (int64_t k = 0; k < D; ++k) acc[k] -= double(c * ((yq[k] - yi[k] + T(kPdistEps)) - rb * yi[k]));
      }
      for (int64_t k = 0; k < D; ++k) dx[i * D + k] = T(acc[k] / nrm[i]);
    }
  }
}

// The bindings take raw pointers, so sizes are all they can check before the loops index with
// them (dtypes and layouts are checked on the Python side, dinov3_fast/ops/koleo/cpu.py).
void check_sizes(const char* fn, int64_t D, int64_t q0, int64_t nq, int64_t topk) {
  if (D < 1 || topk < 1 || q0 < 0 || nq < 0)
    throw std::invalid_argument(std::string(fn) + ": need D >= 1, topk >= 1, q0 >= 0 and nq >= 0");
}

void check_sizes(const char* fn, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk) {
  check_sizes(fn, D, q0, nq, topk);
  if (topk > M || q0 + nq > M) throw std::invalid_argument(std::string(fn) + ": need topk <= M and q0 + nq <= M");
}

}  // namespace

void bind_koleo(pybind11::module_& m) {
  m.def(
      "koleo_search",
      [](uintptr_t y, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk, uintptr_t out, bool fp64) {
        check_sizes("koleo_search", M, D, q0, nq, topk);
        pybind11::gil_scoped_release release;
        if (fp64)
          search(reinterpret_cast<const double*>(y), M, D, q0, nq, topk, reinterpret_cast<int64_t*>(out));
        else
          search(reinterpret_cast<const float*>(y), M, D, q0, nq, topk, reinterpret_cast<int64_t*>(out));
      },
      "Top-k nearest neighbours by dot product of rows [q0, q0+nq) of y (M, D) among all M rows, "
      "self scored -1, ties to the lowest index; writes int64 (nq, topk) to out.",
      pybind11::arg("y"), pybind11::arg("M"), pybind11::arg("D"), pybind11::arg("q0"), pybind11::arg("nq"),
      pybind11::arg("topk"), pybind11::arg("out"), pybind11::arg("fp64"));
  m.def(
      "koleo_pair_stats",
      [](uintptr_t y, int64_t D, int64_t q0, int64_t nq, int64_t topk, uintptr_t idx, uintptr_t stats, bool fp64) {
        check_sizes("koleo_pair_stats", D, q0, nq, topk);  // M is not passed: idx comes from koleo_search
        pybind11::gil_scoped_release release;
        const auto* ix = reinterpret_cast<const int64_t*>(idx);
        if (fp64)
          pair_stats(reinterpret_cast<const double*>(y), D, q0, nq, topk, ix, reinterpret_cast<double*>(stats));
        else
          pair_stats(reinterpret_cast<const float*>(y), D, q0, nq, topk, ix, reinterpret_cast<float*>(stats));
      },
      "d, y_q.u, y_j.u (u = y_q - y_j + 1e-8) of every (query, slot) pair into stats (3, nq, topk).",
      pybind11::arg("y"), pybind11::arg("D"), pybind11::arg("q0"), pybind11::arg("nq"), pybind11::arg("topk"),
      pybind11::arg("idx"), pybind11::arg("stats"), pybind11::arg("fp64"));
  m.def(
      "koleo_backward",
      [](uintptr_t y, uintptr_t nrm, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk, uintptr_t idx,
         uintptr_t stats, uintptr_t order, uintptr_t start, double scale, double eps, uintptr_t dx, bool fp64) {
        check_sizes("koleo_backward", M, D, q0, nq, topk);
        pybind11::gil_scoped_release release;
        const auto* ix = reinterpret_cast<const int64_t*>(idx);
        const auto* od = reinterpret_cast<const int64_t*>(order);
        const auto* st = reinterpret_cast<const int64_t*>(start);
        if (fp64)
          backward(reinterpret_cast<const double*>(y), reinterpret_cast<const double*>(nrm), M, D, q0, nq, topk, ix,
                   reinterpret_cast<const double*>(stats), od, st, scale, eps, reinterpret_cast<double*>(dx));
        else
          backward(reinterpret_cast<const float*>(y), reinterpret_cast<const float*>(nrm), M, D, q0, nq, topk, ix,
                   reinterpret_cast<const float*>(stats), od, st, scale, eps, reinterpret_cast<float*>(dx));
      },
      "Gradient (M, D) w.r.t. x of scale * sum log(d + eps) (y = x / nrm, nrm = max(||x||, eps)), one row "
      "per task, CSR inverse index "
      "order/start of the neighbour pairs, fp64 sums.",
      pybind11::arg("y"), pybind11::arg("nrm"), pybind11::arg("M"), pybind11::arg("D"), pybind11::arg("q0"),
      pybind11::arg("nq"), pybind11::arg("topk"), pybind11::arg("idx"), pybind11::arg("stats"), pybind11::arg("order"),
      pybind11::arg("start"), pybind11::arg("scale"), pybind11::arg("eps"), pybind11::arg("dx"), pybind11::arg("fp64"));
}

}  // namespace dinov3_fast
