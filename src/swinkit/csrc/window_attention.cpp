// Window attention for small windows on the CPU: one kernel per (image, window, head) that keeps the
// scores of a block of query rows in registers from q k^T through the softmax to p v. Inputs and output
// in fp32 or bf16; arithmetic, scores and probabilities always in fp32 (bf16 is rounded once, on output).
//
//   out[i] = softmax_j(q[i] . k[j] + bias[i, j]) v[j]        i, j < N <= 64, head_dim D <= 64
//
// Built on first use by `swinkit.native` (torch.utils.cpp_extension, -O3 -march=native -fopenmp) and
// registered as torch.ops.swinkit.window_attention; the Python side (`models.attention`) decides when it
// runs (CPU, fp32/bf16, no autograd, not under an exporter) and otherwise calls scaled_dot_product_attention.
// Written with GCC/Clang vector extensions in the target's native width: 16 lanes (one AVX-512 register,
// four query rows per block) where the compiler targets AVX-512, else 8 (one AVX2 register, two rows: the
// scores of four rows would not fit in sixteen registers), with masked loads and stores of either ISA.
// (A 16-lane vector on AVX2 made GCC split comparisons and selects into scalar code: 9x slower.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512F__
constexpr int L = 16;            // lanes per vector
constexpr int ROWS = 4;          // query rows per register block
#else
constexpr int L = 8;
constexpr int ROWS = 2;
#endif
constexpr int GRAD_ROWS = ROWS / 2;  // the backward's row block: it keeps two or three times the accumulators
constexpr int MAX_TOKENS = 64;   // N and D up to 64
constexpr int MAX_VECTORS = MAX_TOKENS / L;
constexpr float NEG = -1e30f;    // bias of the padding lanes: exp() gives exactly 0
typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef int vi __attribute__((vector_size(L * sizeof(int))));

inline vf load(const float* p) { vf x; std::memcpy(&x, p, sizeof(vf)); return x; }
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf splat(float a) {  // not `vf{} + a`: 0 + a is not a for a = -0, so GCC keeps that add
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(a);
#elif defined(__AVX2__)
  return (vf)_mm256_set1_ps(a);
#else
  vf x;
  for (int i = 0; i < L; ++i) x[i] = a;
  return x;
#endif
}
inline vi lanes() {
  vi lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  return lane;
}

// the first n (1..16) lanes from p, `fill` in the others; never reads past p[n - 1]
inline vf load_tail(const float* p, int n, float fill) {
#ifdef __AVX512F__
  return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1u), p);
#elif defined(__AVX2__)
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), (__m256i)lanes());
  return (vf)_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
#else
  vf x = splat(fill);
  std::memcpy(&x, p, n * sizeof(float));
  return x;
#endif
}

inline void store_tail(float* p, vf x, int n) {
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)x);
#elif defined(__AVX2__)
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), (__m256i)lanes()), (__m256)x);
#else
  std::memcpy(p, &x, n * sizeof(float));
#endif
}

// bf16 <-> fp32: bf16 is the upper half of an fp32; rounding to nearest even on the way back.
typedef unsigned int vu __attribute__((vector_size(L * sizeof(unsigned int))));
typedef unsigned short vh __attribute__((vector_size(L * sizeof(unsigned short))));
using bf16 = c10::BFloat16;

inline vf widen(vh h) {
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf x;
  std::memcpy(&x, &bits, sizeof(vf));
  return x;
}

inline vh narrow(vf x) {
  vu bits;
  std::memcpy(&bits, &x, sizeof(vf));
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return __builtin_convertvector(nan ? ((bits >> 16) | 0x40u) : rounded, vh);
}

inline float scalar(float x) { return x; }
inline float scalar(bf16 x) { return static_cast<float>(x); }

inline vf load(const bf16* p) { vh h; std::memcpy(&h, p, sizeof(vh)); return widen(h); }
inline void store(bf16* p, vf x) { const vh h = narrow(x); std::memcpy(p, &h, sizeof(vh)); }

inline vf load_tail(const bf16* p, int n, float fill) {
  vh h = {};
  std::memcpy(&h, p, n * sizeof(bf16));
  return lanes() < n ? widen(h) : splat(fill);
}

inline void store_tail(bf16* p, vf x, int n) {
  const vh h = narrow(x);
  std::memcpy(p, &h, n * sizeof(bf16));
}

inline float reduce_max(vf x) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps((__m512)x);
#elif defined(__AVX2__)
  __m128 m = _mm_max_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
#else
  float m = x[0];
  for (int i = 1; i < L; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

inline float reduce_sum(vf x) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)x);
#elif defined(__AVX2__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.0f;
  for (int i = 0; i < L; ++i) s += x[i];
  return s;
#endif
}

// exp(x) for x <= 0 (scores minus their row maximum): 2^n p(r), r = x - n ln 2, |r| <= ln 2 / 2, a degree-6
// polynomial (relative error ~2e-7); below -87 the result is 0 (where fp32 turns denormal anyway).
inline vf exp_nonpositive(vf x) {
  const vf low = splat(-87.0f);
  const vi under = x < low;
  x = under ? low : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  return under ? splat(0.0f) : p * scale;
}

// kT[c][j] = k[j][c] for c < D, j < N (rows of k `sk` elements apart); columns N..NP of kT are zeroed.
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load_columns(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_columns(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// 16 x 16 blocks: two rounds of in-lane unpacks/shuffles, two of 128-bit lane shuffles.
template <typename T>
void transpose_keys(const T* k, int64_t sk, int N, int D, float* kT, int NP) {
  for (int j0 = 0; j0 < NP; j0 += L) {
    for (int c0 = 0; c0 < D; c0 += L) {
      const int cols = std::min(L, D - c0);
      const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
      __m512 r[L], t[L];
      for (int j = 0; j < L; ++j)
        r[j] = j0 + j < N ? load_columns(k + (j0 + j) * sk + c0, mask) : _mm512_setzero_ps();
      for (int i = 0; i < L / 2; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < L / 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      // r[4 i + m], 128-bit lane l: column 4 l + m of rows 4 i .. 4 i + 3
      for (int m = 0; m < 4; ++m) {
        const __m512 a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), b = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
        const __m512 c = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        const __m512 d = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
        t[m] = _mm512_shuffle_f32x4(a, c, 0x88);       // column m
        t[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);   // column 8 + m
        t[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);   // column 4 + m
        t[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);  // column 12 + m
      }
      for (int c = 0; c < cols; ++c) _mm512_storeu_ps(kT + (c0 + c) * NP + j0, t[c]);
    }
  }
}
#elif defined(__AVX2__)
// 8 x 8 blocks: in-lane unpacks, then shuffles, then 128-bit lane permutes.
template <typename T>
void transpose_keys(const T* k, int64_t sk, int N, int D, float* kT, int NP) {
  for (int j0 = 0; j0 < NP; j0 += L) {
    for (int c0 = 0; c0 < D; c0 += L) {
      const int cols = std::min(L, D - c0);
      __m256 r[L], t[L];
      for (int j = 0; j < L; ++j) {
        const T* row = k + (j0 + j) * sk + c0;
        r[j] = j0 + j >= N ? _mm256_setzero_ps() : (__m256)(cols == L ? load(row) : load_tail(row, cols, 0.0f));
      }
      for (int i = 0; i < L / 2; ++i) {  // t[2 i], lane l: rows 2 i, 2 i + 1 interleaved, columns 4 l, 4 l + 1
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < L / 4; ++i) {  // r[4 i + m], lane l: column 4 l + m of rows 4 i .. 4 i + 3
        r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      for (int m = 0; m < 4; ++m) {
        t[m] = _mm256_permute2f128_ps(r[m], r[4 + m], 0x20);      // column m
        t[4 + m] = _mm256_permute2f128_ps(r[m], r[4 + m], 0x31);  // column 4 + m
      }
      for (int c = 0; c < cols; ++c) _mm256_storeu_ps(kT + (c0 + c) * NP + j0, t[c]);
    }
  }
}
#else
template <typename T>
void transpose_keys(const T* k, int64_t sk, int N, int D, float* kT, int NP) {
  for (int c = 0; c < D; ++c) {
    float* row = kT + c * NP;
    for (int j = 0; j < N; ++j) row[j] = scalar(k[j * sk + c]);
    for (int j = N; j < NP; ++j) row[j] = 0.0f;
  }
}
#endif

template <typename T>
struct Item {
  const T *q, *k, *v, *bias;  // bias rows N elements apart
  T* out;
  int64_t sq, sk, sv, so;     // row strides (elements)
};

// One (image, window, head). kT: scratch [D][NV * L]; p: scratch [ROWS][NV * L].
template <typename T, int NV, int DV, bool FULL_D>
void attend(const Item<T>& it, int N, int D, float* kT, float* p) {
  constexpr int NP = NV * L;
  const int n_tail = N - (NV - 1) * L, d_tail = D - (DV - 1) * L;
  transpose_keys(it.k, it.sk, N, D, kT, NP);
  for (int i0 = 0; i0 < N; i0 += ROWS) {
    const int rows = std::min(ROWS, N - i0);
    const T* q[ROWS];
    for (int r = 0; r < ROWS; ++r) q[r] = it.q + std::min(i0 + r, N - 1) * it.sq;
    // scores of ROWS query rows against every key
    vf s[ROWS][NV];
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < NV; ++t) s[r][t] = splat(0.0f);
    for (int c = 0; c < D; ++c) {
      vf kc[NV];
      for (int t = 0; t < NV; ++t) kc[t] = load(kT + c * NP + t * L);
      for (int r = 0; r < ROWS; ++r) {
        const vf a = splat(scalar(q[r][c]));
        for (int t = 0; t < NV; ++t) s[r][t] += a * kc[t];
      }
    }
    // + bias, softmax (unnormalised; the sum divides the output)
    float inv[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      const T* b = it.bias + std::min(i0 + r, N - 1) * N;
      for (int t = 0; t < NV - 1; ++t) s[r][t] += load(b + t * L);
      s[r][NV - 1] += load_tail(b + (NV - 1) * L, n_tail, NEG);
      vf m = s[r][0];
      for (int t = 1; t < NV; ++t) m = s[r][t] > m ? s[r][t] : m;
      const vf top = splat(reduce_max(m));
      vf sum = splat(0.0f);
      for (int t = 0; t < NV; ++t) {
        const vf e = exp_nonpositive(s[r][t] - top);
        store(p + r * NP + t * L, e);
        sum += e;
      }
      inv[r] = 1.0f / reduce_sum(sum);
    }
    // p v
    vf o[ROWS][DV];
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < DV; ++t) o[r][t] = splat(0.0f);
    for (int j = 0; j < N; ++j) {
      const T* vj = it.v + j * it.sv;
      vf vv[DV];
      for (int t = 0; t < DV - 1; ++t) vv[t] = load(vj + t * L);
      vv[DV - 1] = FULL_D ? load(vj + (DV - 1) * L) : load_tail(vj + (DV - 1) * L, d_tail, 0.0f);
      for (int r = 0; r < ROWS; ++r) {
        const vf a = splat(p[r * NP + j]);
        for (int t = 0; t < DV; ++t) o[r][t] += a * vv[t];
      }
    }
    for (int r = 0; r < rows; ++r) {
      T* out = it.out + (i0 + r) * it.so;
      const vf scale = splat(inv[r]);
      for (int t = 0; t < DV - 1; ++t) store(out + t * L, o[r][t] * scale);
      store_tail(out + (DV - 1) * L, o[r][DV - 1] * scale, d_tail);
    }
  }
}

template <typename T>
using Kernel = void (*)(const Item<T>&, int, int, float*, float*);

// The instantiation of a kernel template for NV key vectors and DV head_dim vectors (each 1..MAX_VECTORS),
// chosen at run time; `Family::get<NV, DV>()` names it (forward: `Attend`, backward: `AttendBackward`).
template <typename Family, int NV = 1, int DV = 1>
typename Family::Fn pick(int nv, int dv) {
  if constexpr (NV < MAX_VECTORS) {
    if (nv > NV) return pick<Family, NV + 1, DV>(nv, dv);
  }
  if constexpr (DV < MAX_VECTORS) {
    if (dv > DV) return pick<Family, NV, DV + 1>(nv, dv);
  }
  return Family::template get<NV, DV>();
}

template <typename T, bool FULL_D>
struct Attend {
  using Fn = Kernel<T>;
  template <int NV, int DV>
  static Fn get() { return &attend<T, NV, DV, FULL_D>; }
};

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, at::Tensor& out) {
  const int64_t B = q.size(0), W = q.size(1), H = q.size(2), N = q.size(3), D = q.size(4);
  const int nv = (int)((N + L - 1) / L), dv = (int)((D + L - 1) / L);
  const Kernel<T> kernel = D % L == 0 ? pick<Attend<T, true>>(nv, dv) : pick<Attend<T, false>>(nv, dv);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *bp = bias.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool shared = bias.size(0) == 1;
  at::parallel_for(0, B * W * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kT(D * nv * L), p(ROWS * nv * L);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t h = index % H, w = (index / H) % W, b = index / (H * W);
      const Item<T> it{qp + b * q.stride(0) + w * q.stride(1) + h * q.stride(2),
                       kp + b * k.stride(0) + w * k.stride(1) + h * k.stride(2),
                       vp + b * v.stride(0) + w * v.stride(1) + h * v.stride(2),
                       bp + ((shared ? 0 : w) * H + h) * N * N,
                       op + ((b * W + w) * N * H + h) * D,
                       q.stride(3), k.stride(3), v.stride(3), H * D};
      kernel(it, (int)N, (int)D, kT.data(), p.data());
    }
  });
}

// q, k, v: [B, W, H, N, D] float32 or bfloat16 (one dtype), any strides with D contiguous;
// bias: [W or 1, H, N, N] (cast to q's dtype).
// Returns [B, W, H, N, D] as a view of a token-major [B, W, N, H, D] tensor.
at::Tensor window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias_) {
  TORCH_CHECK(q.dim() == 5 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "swinkit.window_attention: q, k, v must be [B, W, H, N, D] of one shape, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "swinkit.window_attention: float32 or bfloat16 CPU tensors of one dtype, got ", t->scalar_type(),
                " on ", t->device());
    TORCH_CHECK(t->stride(4) == 1, "swinkit.window_attention: head_dim must be contiguous");
  }
  const int64_t B = q.size(0), W = q.size(1), H = q.size(2), N = q.size(3), D = q.size(4);
  TORCH_CHECK(N >= 1 && N <= MAX_TOKENS && D >= 1 && D <= MAX_TOKENS,
              "swinkit.window_attention: windows of 1..64 tokens and head_dim 1..64, got N=", N, ", D=", D);
  const at::Tensor bias = bias_.to(q.scalar_type()).contiguous();
  TORCH_CHECK(bias.dim() == 4 && (bias.size(0) == 1 || bias.size(0) == W) && bias.size(1) == H &&
              bias.size(2) == N && bias.size(3) == N,
              "swinkit.window_attention: bias must be [W or 1, H, N, N], got ", bias.sizes());
  at::Tensor out = at::empty({B, W, N, H, D}, q.options());
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k, v, bias, out);
  } else {
    run<bf16>(q, k, v, bias, out);
  }
  return out.permute({0, 1, 3, 2, 4});
}


// ------------------------------------------------------------------------------------------- backward
// The gradients of out = softmax(q k^T + bias) v for one (image, window, head), recomputing the
// probabilities (training keeps only q, k and v): with P the probabilities and dO the output's gradient,
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = dS K,  dK = dS^T Q,  dBias += dS.
// Scratch: kT, vT [D][NP]; p, ds [N][NP] (fp32); dbias: this thread's [N][N] accumulator.
template <typename T>
struct GradItem {
  const T *q, *k, *v, *g;  // g: the output's gradient
  const float* bias;       // fp32, rows N apart
  float* dbias;            // fp32 accumulator, rows N apart
  T *dq, *dk, *dv;
  int64_t sq, sk, sv, sg, so;  // row strides (elements); so: of dq, dk, dv (token-major)
  float q_scale;               // dq is multiplied by it
};

template <typename T, int NV, int DV>
void attend_backward(const GradItem<T>& it, int N, int D, float* kT, float* vT, float* p, float* ds) {
  constexpr int NP = NV * L;
  const int n_tail = N - (NV - 1) * L, d_tail = D - (DV - 1) * L;
  transpose_keys(it.k, it.sk, N, D, kT, NP);
  transpose_keys(it.v, it.sv, N, D, vT, NP);
  for (int i0 = 0; i0 < N; i0 += GRAD_ROWS) {
    const int rows = std::min(GRAD_ROWS, N - i0);
    const T *q[GRAD_ROWS], *g[GRAD_ROWS];
    for (int r = 0; r < GRAD_ROWS; ++r) {
      q[r] = it.q + std::min(i0 + r, N - 1) * it.sq;
      g[r] = it.g + std::min(i0 + r, N - 1) * it.sg;
    }
    vf s[GRAD_ROWS][NV], dp[GRAD_ROWS][NV];
    for (int r = 0; r < GRAD_ROWS; ++r)
      for (int t = 0; t < NV; ++t) s[r][t] = dp[r][t] = splat(0.0f);
    for (int c = 0; c < D; ++c) {
      for (int t = 0; t < NV; ++t) {
        const vf kc = load(kT + c * NP + t * L), vc = load(vT + c * NP + t * L);
        for (int r = 0; r < GRAD_ROWS; ++r) {
          s[r][t] += splat(scalar(q[r][c])) * kc;
          dp[r][t] += splat(scalar(g[r][c])) * vc;
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float* b = it.bias + (i0 + r) * N;
      for (int t = 0; t < NV - 1; ++t) s[r][t] += load(b + t * L);
      s[r][NV - 1] += load_tail(b + (NV - 1) * L, n_tail, NEG);
      vf m = s[r][0];
      for (int t = 1; t < NV; ++t) m = s[r][t] > m ? s[r][t] : m;
      const vf top = splat(reduce_max(m));
      vf e[NV], sum = splat(0.0f);
      for (int t = 0; t < NV; ++t) {
        e[t] = exp_nonpositive(s[r][t] - top);
        sum += e[t];
      }
      const vf inv = splat(1.0f / reduce_sum(sum));
      vf delta = splat(0.0f);
      for (int t = 0; t < NV; ++t) {
        e[t] *= inv;  // the probabilities; 0 in the padding lanes
        delta += e[t] * dp[r][t];
      }
      const vf row_delta = splat(reduce_sum(delta));
      float* dbias = it.dbias + (i0 + r) * N;
      for (int t = 0; t < NV; ++t) {
        const vf d = e[t] * (dp[r][t] - row_delta);
        store(p + (i0 + r) * NP + t * L, e[t]);
        store(ds + (i0 + r) * NP + t * L, d);
        if (t < NV - 1) {
          store(dbias + t * L, load(dbias + t * L) + d);
        } else {
          store_tail(dbias + t * L, load_tail(dbias + t * L, n_tail, 0.0f) + d, n_tail);
        }
      }
    }
  }
  // dQ = dS K (rows of dS), dK = dS^T Q and dV = P^T dO (columns of dS and P), GRAD_ROWS output rows at a time
  for (int i0 = 0; i0 < N; i0 += GRAD_ROWS) {
    const int rows = std::min(GRAD_ROWS, N - i0);
    int idx[GRAD_ROWS];
    for (int r = 0; r < GRAD_ROWS; ++r) idx[r] = std::min(i0 + r, N - 1);
    vf oq[GRAD_ROWS][DV], ok[GRAD_ROWS][DV], ov[GRAD_ROWS][DV];
    for (int r = 0; r < GRAD_ROWS; ++r)
      for (int t = 0; t < DV; ++t) oq[r][t] = ok[r][t] = ov[r][t] = splat(0.0f);
    for (int j = 0; j < N; ++j) {
      const T *kj = it.k + j * it.sk, *qj = it.q + j * it.sq, *gj = it.g + j * it.sg;
      vf kv[DV], qv[DV], gv[DV];
      for (int t = 0; t < DV; ++t) {
        const bool tail = t == DV - 1;
        kv[t] = tail ? load_tail(kj + t * L, d_tail, 0.0f) : load(kj + t * L);
        qv[t] = tail ? load_tail(qj + t * L, d_tail, 0.0f) : load(qj + t * L);
        gv[t] = tail ? load_tail(gj + t * L, d_tail, 0.0f) : load(gj + t * L);
      }
      for (int r = 0; r < GRAD_ROWS; ++r) {
        const vf a = splat(ds[idx[r] * NP + j]);      // dS[i][j]: row i of dS
        const vf b = splat(ds[j * NP + idx[r]]);      // dS[j][i]: column i of dS
        const vf c = splat(p[j * NP + idx[r]]);       // P[j][i]
        for (int t = 0; t < DV; ++t) {
          oq[r][t] += a * kv[t];
          ok[r][t] += b * qv[t];
          ov[r][t] += c * gv[t];
        }
      }
    }
    const vf scale = splat(it.q_scale);
    for (int r = 0; r < rows; ++r) {
      const int64_t at = (int64_t)(i0 + r) * it.so;
      for (int t = 0; t < DV; ++t) {
        const int n = t == DV - 1 ? d_tail : L;
        store_tail(it.dq + at + t * L, oq[r][t] * scale, n);
        store_tail(it.dk + at + t * L, ok[r][t], n);
        store_tail(it.dv + at + t * L, ov[r][t], n);
      }
    }
  }
}

template <typename T>
using GradKernel = void (*)(const GradItem<T>&, int, int, float*, float*, float*, float*);

template <typename T>
struct AttendBackward {
  using Fn = GradKernel<T>;
  template <int NV, int DV>
  static Fn get() { return &attend_backward<T, NV, DV>; }
};

template <typename T>
void run_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                  const at::Tensor& g, const at::Tensor& q_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  at::Tensor& dbias) {
  const int64_t B = q.size(0), W = q.size(1), H = q.size(2), N = q.size(3), D = q.size(4);
  const int nv = (int)((N + L - 1) / L), dvn = (int)((D + L - 1) / L);
  const GradKernel<T> kernel = pick<AttendBackward<T>>(nv, dvn);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *gp = g.data_ptr<T>();
  const float* bp = bias.data_ptr<float>();
  const float* sp = q_scale.data_ptr<float>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const int64_t BW = bias.size(0), bias_items = BW * H * N * N;
  const int threads = at::get_num_threads();
  std::vector<float> partial((size_t)threads * bias_items, 0.0f);  // one dbias per thread, summed below
  // (window, head) outermost so each thread's items share bias rows; images innermost
  at::parallel_for(0, B * W * H, 1, [&](int64_t begin, int64_t end) {
    float* mine = partial.data() + (size_t)at::get_thread_num() * bias_items;
    std::vector<float> kT(D * nv * L), vT(D * nv * L), p(N * nv * L), ds(N * nv * L);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index % B, h = (index / B) % H, w = index / (B * H);
      const int64_t bw = BW == 1 ? 0 : w;
      const int64_t out_at = ((b * W + w) * N * H + h) * D;
      const GradItem<T> it{qp + b * q.stride(0) + w * q.stride(1) + h * q.stride(2),
                           kp + b * k.stride(0) + w * k.stride(1) + h * k.stride(2),
                           vp + b * v.stride(0) + w * v.stride(1) + h * v.stride(2),
                           gp + b * g.stride(0) + w * g.stride(1) + h * g.stride(2),
                           bp + (bw * H + h) * N * N, mine + (bw * H + h) * N * N,
                           dqp + out_at, dkp + out_at, dvp + out_at,
                           q.stride(3), k.stride(3), v.stride(3), g.stride(3), H * D, sp[h]};
      kernel(it, (int)N, (int)D, kT.data(), vT.data(), p.data(), ds.data());
    }
  });
  float* out = dbias.data_ptr<float>();
  for (int t = 0; t < threads; ++t) {
    const float* part = partial.data() + (size_t)t * bias_items;
    for (int64_t i = 0; i < bias_items; ++i) out[i] += part[i];
  }
}

// q, k, v, grad_out: [B, W, H, N, D] (q, k, v as the forward took them: q already scaled), bias: [W or 1, H, N, N],
// q_scale: [H] fp32 (dq is multiplied by it). Returns dq, dk, dv ([B, W, H, N, D] views of token-major memory)
// and dbias (fp32, the bias's shape, summed over the images).
std::vector<at::Tensor> window_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& bias_, const at::Tensor& grad_out,
                                                  const at::Tensor& q_scale_) {
  TORCH_CHECK(q.dim() == 5 && k.sizes() == q.sizes() && v.sizes() == q.sizes() && grad_out.sizes() == q.sizes(),
              "swinkit.window_attention_backward: q, k, v, grad_out must be [B, W, H, N, D] of one shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", grad_out.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &grad_out}) {
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "swinkit.window_attention_backward: float32 or bfloat16 CPU tensors of one dtype, got ",
                t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->stride(4) == 1, "swinkit.window_attention_backward: head_dim must be contiguous");
  }
  const int64_t B = q.size(0), W = q.size(1), H = q.size(2), N = q.size(3), D = q.size(4);
  TORCH_CHECK(N >= 1 && N <= MAX_TOKENS && D >= 1 && D <= MAX_TOKENS,
              "swinkit.window_attention_backward: windows of 1..64 tokens and head_dim 1..64, got N=", N, ", D=", D);
  const at::Tensor bias = bias_.to(at::kFloat).contiguous();
  TORCH_CHECK(bias.dim() == 4 && (bias.size(0) == 1 || bias.size(0) == W) && bias.size(1) == H &&
              bias.size(2) == N && bias.size(3) == N,
              "swinkit.window_attention_backward: bias must be [W or 1, H, N, N], got ", bias.sizes());
  const at::Tensor q_scale = q_scale_.to(at::kFloat).contiguous();
  TORCH_CHECK(q_scale.numel() == H, "swinkit.window_attention_backward: q_scale must have one value per head, got ",
              q_scale.sizes());
  at::Tensor dq = at::empty({B, W, N, H, D}, q.options()), dk = at::empty({B, W, N, H, D}, q.options()),
             dv = at::empty({B, W, N, H, D}, q.options());
  at::Tensor dbias = at::zeros(bias.sizes(), bias.options());
  if (q.scalar_type() == at::kFloat) {
    run_backward<float>(q, k, v, bias, grad_out, q_scale, dq, dk, dv, dbias);
  } else {
    run_backward<bf16>(q, k, v, bias, grad_out, q_scale, dq, dk, dv, dbias);
  }
  return {dq.permute({0, 1, 3, 2, 4}), dk.permute({0, 1, 3, 2, 4}), dv.permute({0, 1, 3, 2, 4}), dbias};
}

}  // namespace

TORCH_LIBRARY(swinkit, m) {
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor bias) -> Tensor");
  m.def("window_attention_backward(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor grad_out, Tensor q_scale) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(swinkit, CPU, m) {
  m.impl("window_attention", &window_attention);
  m.impl("window_attention_backward", &window_attention_backward);
}
