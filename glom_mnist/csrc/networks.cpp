// Every network's layers on a CPU, one (image, network) "tile" at a time, its working set in the
// core's cache: Python's `_MaskedTaps` and `_NetworkTail` (glom_mnist/kernels.py) without their
// passes over memory (glom_mnist/native.py builds this file).
//
// The first layer, with the seed's own input dropout: for each tile the k x k torus
// neighbourhoods of the network's source level are unfolded into a (k*k*D, H*W) matrix X, the
// dropped values zeroed and X multiplied by the network's (D, k*k*D) matrix. The dropped
// positions come from the tile's own random stream (seeded with the step's seed and the tile's
// index), as geometric gaps looked up for 16-bit uniforms (`_gap_table`), so the backward pass
// draws them again instead of keeping them. The 10x10 layers: further down.
//
// Layouts as in kernels.py: levels (B, L, D, H, W); sources (R,); A (R, D, k*k*D), column
// (i*k + j)*D + c for tap (i, j) (offset (i - k/2, j - k/2)) and channel c; a (R, D);
// pre-activations U and their gradient (B, R, D, H*W). Row-major matrices are handed to the
// column-major BLAS as their transposes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// The Fortran BLAS that torch's CPU library carries (and exports) on x86 Linux: MKL.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace {

// C (m, n) = alpha op(A) op(B) + beta C, column-major, as BLAS has it
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The dropped positions of one tile, ascending: a splitmix64 stream, four 16-bit uniforms per
// 64-bit word, each looked up in the gap table.
struct Drops {
  uint64_t state, word = 0;
  int left = 0;
  const int32_t* table;
  int64_t position = -1;

  Drops(int64_t seed, int64_t tile, const int32_t* gap_table)
      : state(mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(tile) + 1))),
        table(gap_table) {}

  int64_t next() {
    if (left == 0) {
      state += 0x9E3779B97F4A7C15ULL;
      word = mix64(state);
      left = 4;
    }
    const int v = static_cast<int>(word & 0xFFFF);
    word >>= 16;
    --left;
    return position += table[v];
  }
};

struct Geometry {
  int64_t D, H, W, k;
  int64_t HW() const { return H * W; }
  int64_t K() const { return k * k * D; }       // inputs per column
  int64_t n() const { return K() * HW(); }      // values per tile
  int64_t padded() const { return D * (H + k - 1) * (W + k - 1); }
};

// P (D, H + 2r, W + 2r) = src (D, H, W) padded by r = k/2 around the torus.
template <typename T>
void pad(const T* src, const Geometry& g, T* P) {
  const int64_t r = g.k / 2, Hp = g.H + 2 * r, Wp = g.W + 2 * r;
  for (int64_t c = 0; c < g.D; ++c) {
    for (int64_t hp = 0; hp < Hp; ++hp) {
      const T* row = src + c * g.HW() + (((hp - r) % g.H + g.H) % g.H) * g.W;
      T* o = P + (c * Hp + hp) * Wp;
      for (int64_t wp = 0; wp < r; ++wp) o[wp] = row[((wp - r) % g.W + g.W) % g.W];
      std::copy_n(row, g.W, o + r);
      for (int64_t wp = r + g.W; wp < Wp; ++wp) o[wp] = row[(wp - r) % g.W];
    }
  }
}

// X (K, H*W) = the unfolded neighbourhoods of the padded P: row (t*D + c) holds channel c
// read at offset (t/k - k/2, t%k - k/2) around every column.
template <typename T>
void unfold(const T* P, const Geometry& g, T* X) {
  const int64_t Hp = g.H + g.k - 1, Wp = g.W + g.k - 1;
  for (int64_t t = 0; t < g.k * g.k; ++t) {
    const int64_t i = t / g.k, j = t % g.k;
    for (int64_t c = 0; c < g.D; ++c) {
      const T* in = P + (c * Hp + i) * Wp + j;
      T* out = X + (t * g.D + c) * g.HW();
      for (int64_t h = 0; h < g.H; ++h) std::copy_n(in + h * Wp, g.W, out + h * g.W);
    }
  }
}

// The adjoint of pad then unfold: each value of gX (K, H*W) added, through the padded G
// (D, H + 2r, W + 2r, overwritten), to dst (D, H, W) where it was read.
template <typename T>
void fold_add(const T* gX, const Geometry& g, T* G, T* dst) {
  const int64_t r = g.k / 2, Hp = g.H + 2 * r, Wp = g.W + 2 * r;
  std::fill_n(G, g.D * Hp * Wp, T(0));
  for (int64_t t = 0; t < g.k * g.k; ++t) {
    const int64_t i = t / g.k, j = t % g.k;
    for (int64_t c = 0; c < g.D; ++c) {
      const T* in = gX + (t * g.D + c) * g.HW();
      T* out = G + (c * Hp + i) * Wp + j;
      for (int64_t h = 0; h < g.H; ++h) {
        T* o = out + h * Wp;
        const T* x = in + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) o[w] += x[w];
      }
    }
  }
  for (int64_t c = 0; c < g.D; ++c) {
    for (int64_t hp = 0; hp < Hp; ++hp) {
      T* row = dst + c * g.HW() + (((hp - r) % g.H + g.H) % g.H) * g.W;
      const T* o = G + (c * Hp + hp) * Wp;
      for (int64_t wp = 0; wp < r; ++wp) row[((wp - r) % g.W + g.W) % g.W] += o[wp];
      for (int64_t w = 0; w < g.W; ++w) row[w] += o[r + w];
      for (int64_t wp = r + g.W; wp < Wp; ++wp) row[(wp - r) % g.W] += o[wp];
    }
  }
}

template <typename T>
T sum(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

// Zero the tile's dropped values; with `kept`, also record their positions.
template <typename T>
void drop(T* X, int64_t n, int64_t seed, int64_t tile, const int32_t* table,
          std::vector<int64_t>* kept) {
  Drops drops(seed, tile, table);
  for (int64_t pos = drops.next(); pos < n; pos = drops.next()) {
    X[pos] = 0;
    if (kept) kept->push_back(pos);
  }
}

void check(const torch::Tensor& levels, const torch::Tensor& sources, const torch::Tensor& A,
           const torch::Tensor& table) {
  TORCH_CHECK(levels.device().is_cpu() && levels.dim() == 5 && levels.is_contiguous(),
              "levels must be a contiguous CPU tensor (B, L, D, H, W)");
  TORCH_CHECK(sources.scalar_type() == torch::kInt64 && sources.is_contiguous(),
              "sources must be a contiguous int64 tensor (R,)");
  TORCH_CHECK(A.scalar_type() == levels.scalar_type() && A.is_contiguous() && A.dim() == 3,
              "A must be a contiguous (R, D, k*k*D) tensor of the levels' dtype");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.numel() == 65536,
              "the gap table must be 65536 int32 values");
}

Geometry geometry(const torch::Tensor& levels, const torch::Tensor& A) {
  const int64_t D = levels.size(2), K = A.size(2);
  int64_t k = 1;
  while (k * k * D < K) k += 2;
  TORCH_CHECK(k * k * D == K && A.size(1) == D, "A's shape does not match the levels' D");
  return {D, levels.size(3), levels.size(4), k};
}

}  // namespace

// U (B, R, D, H*W) = a + A (X times its dropout mask), X each tile's unfolded neighbourhoods.
torch::Tensor forward(torch::Tensor levels, torch::Tensor sources, torch::Tensor A,
                      torch::Tensor a, bool dropout, int64_t seed, torch::Tensor table) {
  check(levels, sources, A, table);
  const Geometry g = geometry(levels, A);
  const int64_t B = levels.size(0), L = levels.size(1), R = sources.size(0);
  auto U = torch::empty({B, R, g.D, g.HW()}, levels.options());
  AT_DISPATCH_FLOATING_TYPES(levels.scalar_type(), "masked_taps_forward", [&] {
    const scalar_t* lv = levels.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    const auto a_ = a.contiguous();
    const scalar_t* ap = a_.const_data_ptr<scalar_t>();
    const int64_t* src = sources.const_data_ptr<int64_t>();
    const int32_t* tab = table.const_data_ptr<int32_t>();
    scalar_t* Up = U.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> X(g.n()), P(g.padded());
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b = tile / R, r = tile % R;
        pad(lv + (b * L + src[r]) * g.D * g.HW(), g, P.data());
        unfold(P.data(), g, X.data());
        if (dropout) drop(X.data(), g.n(), seed, tile, tab, nullptr);
        scalar_t* out = Up + tile * g.D * g.HW();
        for (int64_t o = 0; o < g.D; ++o)
          std::fill(out + o * g.HW(), out + (o + 1) * g.HW(), ap[r * g.D + o]);
        // out (D, HW) += A_r (D, K) X (K, HW); column-major: out^T = X^T A_r^T
        gemm(
            'N', 'N', g.HW(), g.D, g.K(),
            scalar_t(1), X.data(), g.HW(), Ap + r * g.D * g.K(), g.K(), scalar_t(1), out, g.HW());
      }
    });
  });
  return U;
}

// Gradients of forward's U: of the levels, of A and of a. Parallel over images, so that every
// image's level gradient has one writer.
std::vector<torch::Tensor> backward(torch::Tensor levels, torch::Tensor sources, torch::Tensor A,
                                    torch::Tensor gU, bool dropout, int64_t seed,
                                    torch::Tensor table) {
  check(levels, sources, A, table);
  const Geometry g = geometry(levels, A);
  const int64_t B = levels.size(0), L = levels.size(1), R = sources.size(0);
  gU = gU.contiguous();
  auto g_levels = torch::zeros_like(levels);
  const int threads = at::get_num_threads();
  auto gA = torch::zeros({threads, R, g.D, g.K()}, levels.options());   // one sum per thread
  auto ga = torch::zeros({threads, R, g.D}, levels.options());
  AT_DISPATCH_FLOATING_TYPES(levels.scalar_type(), "masked_taps_backward", [&] {
    const scalar_t* lv = levels.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    const scalar_t* gUp = gU.const_data_ptr<scalar_t>();
    const int64_t* src = sources.const_data_ptr<int64_t>();
    const int32_t* tab = table.const_data_ptr<int32_t>();
    scalar_t* glv = g_levels.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      scalar_t* gAt = gA.mutable_data_ptr<scalar_t>() + thread * R * g.D * g.K();
      scalar_t* gat = ga.mutable_data_ptr<scalar_t>() + thread * R * g.D;
      std::vector<scalar_t> X(g.n()), P(g.padded());
      std::vector<int64_t> dropped;
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t tile = b * R + r;
          const scalar_t* gu = gUp + tile * g.D * g.HW();
          dropped.clear();
          pad(lv + (b * L + src[r]) * g.D * g.HW(), g, P.data());
          unfold(P.data(), g, X.data());
          if (dropout) drop(X.data(), g.n(), seed, tile, tab, &dropped);
          // gA_r (D, K) += gU (D, HW) X^T; column-major: gA_r^T (K, D) = X gU^T
          gemm(
              'T', 'N', g.K(), g.D, g.HW(),
              scalar_t(1), X.data(), g.HW(), gu, g.HW(), scalar_t(1), gAt + r * g.D * g.K(),
              g.K());
          for (int64_t o = 0; o < g.D; ++o) gat[r * g.D + o] += sum(gu + o * g.HW(), g.HW());
          // gX (K, HW) = A_r^T gU; column-major: gX^T (HW, K) = gU^T A_r
          gemm(
              'N', 'T', g.HW(), g.K(), g.D,
              scalar_t(1), gu, g.HW(), Ap + r * g.D * g.K(), g.K(), scalar_t(0), X.data(),
              g.HW());
          for (const int64_t pos : dropped) X[pos] = 0;
          fold_add(X.data(), g, P.data(), glv + (b * L + src[r]) * g.D * g.HW());
        }
      }
    });
  });
  return {g_levels, gA.sum(0), ga.sum(0)};
}

// The positions forward drops in one tile, for tests.
torch::Tensor tile_drops(int64_t n, int64_t seed, int64_t tile, torch::Tensor table) {
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.numel() == 65536,
              "the gap table must be 65536 int32 values");
  std::vector<int64_t> kept;
  Drops drops(seed, tile, table.const_data_ptr<int32_t>());
  for (int64_t pos = drops.next(); pos < n; pos = drops.next()) kept.push_back(pos);
  return torch::tensor(kept, torch::kInt64);
}

// ---- the 10x10 layers: K = tanh(B drop(Q) + b) + Q, V = tanh(C drop(K) + c) + Q + K ----------
// Python's `_NetworkTail` (kernels.py) one (image, network) tile at a time: the caller passes
// W1 = 2B, b1 = 2b, W2 = 2C, b2 = 2c (dropout's 1/(1-p) folded in), tanh(u) being
// 2 sigmoid(2u) - 1.
// The backward pass computes each tile's forward again (in the cache) instead of keeping its
// activations, and draws its dropped positions again: it keeps nothing but Q.

namespace {

template <typename T>
void sigmoid(T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = T(1) / (T(1) + std::exp(-x[i]));
}

// One tile's activations: Qm = drop1(Q), s1 = sigmoid(W1 Qm + b1), K = Q + 2 s1 - 1,
// Km = drop2(K), s2 = sigmoid(W2 Km + b2), each (D, P); the dropped positions into d1, d2.
template <typename T>
struct TailTile {
  int64_t D, P;
  std::vector<T> Qm, s1, K, Km, s2;
  std::vector<int64_t> d1, d2;
  TailTile(int64_t D_, int64_t P_)
      : D(D_), P(P_), Qm(D_ * P_), s1(D_ * P_), K(D_ * P_), Km(D_ * P_), s2(D_ * P_) {}

  void layer(const T* W, const T* b, const T* x, T* s) {   // s = sigmoid(W x + b)
    for (int64_t o = 0; o < D; ++o) std::fill_n(s + o * P, P, b[o]);
    gemm('N', 'N', P, D, D, T(1), x, P, W, D, T(1), s, P);
    sigmoid(s, D * P);
  }

  // The gradients of y = x' + 2 sigmoid(W drop(x) + b) - 1 (x' not through here), given y's
  // gradient gy and s = the sigmoid: W's and b's added to gW, gb; drop(x)'s into gx (with the
  // dropped positions zeroed); g: room for the gradient before the sigmoid, halved.
  void backward_layer(const T* gy, const T* s, const T* x, const T* W, T* gW, T* gb,
                      const std::vector<int64_t>& dropped, T* g, T* gx) {
    for (int64_t i = 0; i < D * P; ++i) g[i] = gy[i] * s[i] * (T(1) - s[i]);
    // gW (D, D) += 2 g x^T; column-major: its transpose += 2 x g^T
    gemm('T', 'N', D, D, P, T(2), x, P, g, P, T(1), gW, D);
    for (int64_t o = 0; o < D; ++o) gb[o] += T(2) * sum(g + o * P, P);
    // gx (D, P) = 2 W^T g; column-major: its transpose = 2 g^T W
    gemm('N', 'T', P, D, D, T(2), g, P, W, D, T(0), gx, P);
    for (const int64_t pos : dropped) gx[pos] = 0;
  }

  void forward(const T* Q, const T* W1, const T* b1, const T* W2, const T* b2, bool dropout,
               int64_t seed, int64_t tile, const int32_t* table) {
    const int64_t n = D * P;
    d1.clear();
    d2.clear();
    std::copy_n(Q, n, Qm.data());
    if (dropout) drop(Qm.data(), n, seed, 2 * tile, table, &d1);
    layer(W1, b1, Qm.data(), s1.data());
    for (int64_t i = 0; i < n; ++i) K[i] = Q[i] + T(2) * s1[i] - T(1);
    std::copy_n(K.data(), n, Km.data());
    if (dropout) drop(Km.data(), n, seed, 2 * tile + 1, table, &d2);
    layer(W2, b2, Km.data(), s2.data());
  }
};

}  // namespace

torch::Tensor tail_forward(torch::Tensor Q, torch::Tensor W1, torch::Tensor b1, torch::Tensor W2,
                           torch::Tensor b2, bool dropout, int64_t seed, torch::Tensor table) {
  TORCH_CHECK(Q.device().is_cpu() && Q.dim() == 4 && Q.is_contiguous(),
              "Q must be a contiguous CPU tensor (B, R, D, P)");
  const int64_t B = Q.size(0), R = Q.size(1), D = Q.size(2), P = Q.size(3);
  auto V = torch::empty_like(Q);
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "tail_forward", [&] {
    const scalar_t *q = Q.const_data_ptr<scalar_t>(), *w1 = W1.const_data_ptr<scalar_t>(),
                   *c1 = b1.const_data_ptr<scalar_t>(), *w2 = W2.const_data_ptr<scalar_t>(),
                   *c2 = b2.const_data_ptr<scalar_t>();
    const int32_t* tab = table.const_data_ptr<int32_t>();
    scalar_t* v = V.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      TailTile<scalar_t> t(D, P);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t r = tile % R, n = D * P;
        const scalar_t* qt = q + tile * n;
        t.forward(qt, w1 + r * D * D, c1 + r * D, w2 + r * D * D, c2 + r * D, dropout, seed,
                  tile, tab);
        scalar_t* vt = v + tile * n;
        for (int64_t i = 0; i < n; ++i)
          vt[i] = qt[i] + t.K[i] + scalar_t(2) * t.s2[i] - scalar_t(1);
      }
    });
  });
  return V;
}

// Gradients of tail_forward's V: of Q, W1, b1, W2, b2 (the weights' summed per thread).
std::vector<torch::Tensor> tail_backward(torch::Tensor Q, torch::Tensor W1, torch::Tensor b1,
                                         torch::Tensor W2, torch::Tensor b2, torch::Tensor gV,
                                         bool dropout, int64_t seed, torch::Tensor table) {
  const int64_t B = Q.size(0), R = Q.size(1), D = Q.size(2), P = Q.size(3);
  gV = gV.contiguous();
  auto gQ = torch::empty_like(Q);
  const int threads = at::get_num_threads();
  auto gW = torch::zeros({threads, 2, R, D, D}, Q.options());          // W1's, then W2's
  auto gb = torch::zeros({threads, 2, R, D}, Q.options());
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "tail_backward", [&] {
    const scalar_t *q = Q.const_data_ptr<scalar_t>(), *w1 = W1.const_data_ptr<scalar_t>(),
                   *c1 = b1.const_data_ptr<scalar_t>(), *w2 = W2.const_data_ptr<scalar_t>(),
                   *c2 = b2.const_data_ptr<scalar_t>(), *gv = gV.const_data_ptr<scalar_t>();
    const int32_t* tab = table.const_data_ptr<int32_t>();
    scalar_t* gq = gQ.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
      const int thread = at::get_thread_num();
      scalar_t* gW1 = gW.mutable_data_ptr<scalar_t>() + thread * 2 * R * D * D;
      scalar_t* gW2 = gW1 + R * D * D;
      scalar_t* gb1 = gb.mutable_data_ptr<scalar_t>() + thread * 2 * R * D;
      scalar_t* gb2 = gb1 + R * D;
      TailTile<scalar_t> t(D, P);
      const int64_t n = D * P;
      std::vector<scalar_t> g(n), gK(n), gx(n);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t r = tile % R;
        const scalar_t* qt = q + tile * n;
        const scalar_t* gvt = gv + tile * n;
        t.forward(qt, w1 + r * D * D, c1 + r * D, w2 + r * D * D, c2 + r * D, dropout, seed,
                  tile, tab);
        // V = Q + K + 2 s2 - 1, s2 = sigmoid(W2 Km + b2): Km's gradient into gx
        t.backward_layer(gvt, t.s2.data(), t.Km.data(), w2 + r * D * D, gW2 + r * D * D,
                         gb2 + r * D, t.d2, g.data(), gx.data());
        for (int64_t i = 0; i < n; ++i) gK[i] = gvt[i] + gx[i];
        // K = Q + 2 s1 - 1, s1 = sigmoid(W1 Qm + b1): Qm's gradient into gx
        t.backward_layer(gK.data(), t.s1.data(), t.Qm.data(), w1 + r * D * D, gW1 + r * D * D,
                         gb1 + r * D, t.d1, g.data(), gx.data());
        scalar_t* gqt = gq + tile * n;
        for (int64_t i = 0; i < n; ++i) gqt[i] = gvt[i] + gK[i] + gx[i];  // Q's three paths
      }
    });
  });
  auto gWs = gW.sum(0), gbs = gb.sum(0);
  return {gQ, gWs[0], gbs[0], gWs[1], gbs[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("tile_drops", &tile_drops);
  m.def("tail_forward", &tail_forward);
  m.def("tail_backward", &tail_backward);
}
