// KoLeo nearest-neighbour search on the CPU: blocked, OpenMP over query blocks, no n x n matrix.
//
// Input: y (M, D) row-major L2-normalised rows (fp32 or fp64); queries are rows [q0, q0 + nq).
// Output: idx (nq, topk) int64, the candidates with the largest dot product, best first.
// Semantics are DINOv3's: a query's own entry competes with value -1 (the reference fills the
// diagonal with -1), NaN compares above everything (as torch.max / torch.topk), and among equal
// dots the lowest index wins (torch.max's rule).
//
// The dots come from a register-blocked outer-product kernel (BLIS-style): one side of a tile is
// packed into panels [D][W] (W = 64 bytes of T: 16 floats, 8 doubles), the other side's rows are
// broadcast from y as they are, and a block of rows x W dots accumulates in 12 vector registers
// over D. Only the packed block and one tile of dots per thread are ever in memory. The build
// passes no -march, so the kernel is compiled twice and picked at run time: AVX2 + FMA (32-byte
// vectors, 6 rows), and baseline x86-64 / other CPUs (16-byte vectors, 3 rows).
// ATEN_CPU_CAPABILITY=default (torch's own switch) forces the baseline kernel.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"

namespace dinov3_fast {
namespace {

constexpr int64_t kBlock = 64;  // query and candidate tile edge
constexpr double kPdistEps = 1e-8;  // nn.PairwiseDistance(2, eps=1e-8)

template <typename T>
constexpr int64_t kPanel = 64 / sizeof(T);  // panel width W: columns of packed dots per register block

// Packs rows [0, n) of the row-major (n, D) block `rows` into panels: panel p holds rows
// p W .. p W + W - 1 as [D][W], zero past n. `packed` has ceil(n / W) * D * W elements.
template <typename T>
void pack_panels(const T* __restrict rows, int64_t n, int64_t D, T* __restrict packed) {
  constexpr int64_t W = kPanel<T>;
  for (int64_t p0 = 0; p0 < n; p0 += W) {
    T* panel = packed + p0 * D;
    for (int64_t c = 0; c < W; ++c) {
      if (p0 + c < n) {
        const T* row = rows + (p0 + c) * D;
        for (int64_t d = 0; d < D; ++d) panel[d * W + c] = row[d];
      } else {
        for (int64_t d = 0; d < D; ++d) panel[d * W + c] = T(0);
      }
    }
  }
}

// tile[j * ldt + i] = <a_i, b_j> for i < na, j < nb: the a rows packed by `pack_panels`, b row-major
// with row stride D. Each b row's dots are stored whole panels wide (lanes i >= na hold garbage;
// ldt is a multiple of W). Every dot is the same chain of multiply-adds over d = 0 .. D - 1 in one
// register lane (ragged edges re-read the last b row or read zero panel columns, and drop the
// copies), and the products commute, so equal rows give bitwise-equal dots wherever they sit,
// either side of the tile: ties are real ties.
template <typename T, int kVecBytes, int64_t kRows>
__attribute__((always_inline)) inline void dot_tile(const T* __restrict a_packed, int64_t na, const T* __restrict b,
                                                    int64_t nb, int64_t D, T* __restrict tile, int64_t ldt) {
  constexpr int64_t W = kPanel<T>, L = kVecBytes / sizeof(T), NV = W / L;  // NV vectors per panel row
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  for (int64_t j = 0; j < nb; j += kRows) {
    const T* br[kRows];
    for (int64_t r = 0; r < kRows; ++r) br[r] = b + std::min(j + r, nb - 1) * D;
    for (int64_t p0 = 0; p0 < na; p0 += W) {
      const T* panel = a_packed + p0 * D;
      Vec acc[kRows][NV] = {};
      for (int64_t d = 0; d < D; ++d) {
        Vec a[NV];
#pragma GCC unroll 4
        for (int64_t q = 0; q < NV; ++q) __builtin_memcpy(&a[q], panel + d * W + q * L, sizeof(Vec));
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          const T v = br[r][d];
#pragma GCC unroll 4
          for (int64_t q = 0; q < NV; ++q) acc[r][q] += v * a[q];
        }
      }
      for (int64_t r = 0; r < std::min(kRows, nb - j); ++r)
        for (int64_t q = 0; q < NV; ++q) __builtin_memcpy(tile + (j + r) * ldt + p0 + q * L, &acc[r][q], sizeof(Vec));
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
__attribute__((target("avx2,fma"))) void dot_tile_avx2(const T* a_packed, int64_t na, const T* b, int64_t nb, int64_t D,
                                                       T* tile, int64_t ldt) {
  dot_tile<T, 32, 6>(a_packed, na, b, nb, D, tile, ldt);
}
#endif

// Whether the AVX2 + FMA tile kernel runs: the CPU has both and ATEN_CPU_CAPABILITY is not "default".
bool use_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool yes = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(cap && std::string(cap) == "default");
  }();
  return yes;
#else
  return false;
#endif
}

// The (na, nb) tile of dots described above, on the best kernel this CPU runs.
template <typename T>
void dot_tile_fast(const T* a_packed, int64_t na, const T* b, int64_t nb, int64_t D, T* tile, int64_t ldt) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx2()) return dot_tile_avx2<T>(a_packed, na, b, nb, D, tile, ldt);
#endif
  dot_tile<T, 16, 3>(a_packed, na, b, nb, D, tile, ldt);
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

// Offers a kBlock x kBlock tile (tile[j * kBlock + i] = <a_i, b_j>, as `dot_tile` writes it) to the
// lists of the a rows i < na, over candidates b0 + j, j < nb. The entry j = i + self_shift, if in
// the tile, is row i's own and competes as -1. A row with no own entry whose list cannot take any of
// the tile's values (all below its k-th value; NaN ranks above everything) is skipped after one
// vectorisable max over the tile's b rows; the rest are offered one by one.
template <typename T, typename Lists>
void offer_to_a_rows(const T* tile, int64_t na, int64_t nb, int64_t b0, int64_t self_shift, Lists list) {
  T col_max[kBlock];
  std::fill(col_max, col_max + kBlock, -std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t i = 0; i < kBlock; ++i) {
      const T v = tile[j * kBlock + i];
      col_max[i] = (v > col_max[i] || v != v) ? v : col_max[i];
    }
  for (int64_t i = 0; i < na; ++i) {
    TopK<T> best = list(i);
    const int64_t self = i + self_shift;
    const bool has_self = self >= 0 && self < nb;
    if (!has_self && col_max[i] < best.val[best.k - 1]) continue;
    for (int64_t j = 0; j < nb; ++j) best.offer(j == self ? T(-1) : tile[j * kBlock + i], b0 + j);
  }
}

// The same tile offered the other way, to the lists of the b rows j < nb over candidates a0 + i,
// i < na (no own entries: the two blocks are disjoint). Each b row's dots are contiguous, so the
// test for a row that cannot take any of them is one vectorisable pass.
template <typename T, typename Lists>
void offer_to_b_rows(const T* tile, int64_t na, int64_t nb, int64_t a0, Lists list) {
  for (int64_t j = 0; j < nb; ++j) {
    TopK<T> best = list(j);
    const T worst = best.val[best.k - 1];
    const T* row = tile + j * kBlock;
    int takes = 0;
    for (int64_t i = 0; i < na; ++i) takes |= !(row[i] < worst);
    if (!takes) continue;
    for (int64_t i = 0; i < na; ++i) best.offer(row[i], a0 + i);
  }
}

// Queries are a sub-range of the candidates (the distributed form): each thread owns whole query
// blocks (packed once) and sweeps every candidate tile.
template <typename T>
void search_rows(const T* y, int64_t M, int64_t D, int64_t q0, int64_t nq, int64_t topk, int64_t* out) {
  const int64_t n_blocks = (nq + kBlock - 1) / kBlock;
#pragma omp parallel
  {
    std::vector<T> tile(kBlock * kBlock), packed(kBlock * D);
    std::vector<T> best_val(kBlock * topk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * kBlock, nr = std::min(kBlock, nq - r0);
      std::fill(best_val.begin(), best_val.end(), -std::numeric_limits<T>::infinity());
      std::fill(out + r0 * topk, out + (r0 + nr) * topk, M);  // sentinel index M: worse than any candidate
      pack_panels(y + (q0 + r0) * D, nr, D, packed.data());
      auto list = [&](int64_t r) { return TopK<T>{best_val.data() + r * topk, out + (r0 + r) * topk, topk}; };
      for (int64_t c0 = 0; c0 < M; c0 += kBlock) {
        const int64_t nc = std::min(kBlock, M - c0);
        dot_tile_fast(packed.data(), nr, y + c0 * D, nc, D, tile.data(), kBlock);
        offer_to_a_rows(tile.data(), nr, nc, c0, q0 + r0 - c0, list);
      }
    }
  }
}

// Every row queries every row: y y^T is symmetric, so only tiles (I, J >= I) are formed and each
// updates the rows of I (over J's rows) and the rows of J (over I's rows): half the FLOPs.
// Each thread keeps a top-k list for all M rows; the lists are merged at the end. The merge rule
// is a total order, so the result does not depend on the thread count or schedule.
template <typename T>
void search_all(const T* y, int64_t M, int64_t D, int64_t topk, int64_t* out) {
  const int64_t n_blocks = (M + kBlock - 1) / kBlock;
  std::vector<T> best_val(M * topk, -std::numeric_limits<T>::infinity());
  std::fill(out, out + M * topk, M);
#pragma omp parallel
  {
    std::vector<T> tile(kBlock * kBlock), packed(kBlock * D);
    std::vector<T> val(M * topk, -std::numeric_limits<T>::infinity());
    std::vector<int64_t> idx(M * topk, M);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const int64_t i0 = bi * kBlock, ni = std::min(kBlock, M - i0);
      pack_panels(y + i0 * D, ni, D, packed.data());
      auto i_rows = [&](int64_t r) { return TopK<T>{val.data() + (i0 + r) * topk, idx.data() + (i0 + r) * topk, topk}; };
      for (int64_t bj = bi; bj < n_blocks; ++bj) {
        const int64_t j0 = bj * kBlock, nj = std::min(kBlock, M - j0);
        auto j_rows = [&](int64_t c) { return TopK<T>{val.data() + (j0 + c) * topk, idx.data() + (j0 + c) * topk, topk}; };
        dot_tile_fast(packed.data(), ni, y + j0 * D, nj, D, tile.data(), kBlock);
        offer_to_a_rows(tile.data(), ni, nj, j0, i0 - j0, i_rows);
        if (bi != bj) offer_to_b_rows(tile.data(), ni, nj, i0, j_rows);
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
  m.def("koleo_search_kernel", []() { return std::string(use_avx2() ? "avx2+fma" : "baseline"); },
        "Which tile kernel koleo_search runs on this CPU: 'avx2+fma' or 'baseline'.");
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
