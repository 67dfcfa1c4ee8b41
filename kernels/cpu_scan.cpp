// Fused CPU kernels of hgrn_scan: the forward is one streaming pass over x and g, the backward one reverse pass
// over dout, g and h. Both walk time step by step with the channel axis innermost, where memory is contiguous,
// so each step is a short vector loop and the state of a (batch, channel block) item stays in L1.
// Work items (batch row x channel block) run in parallel under OpenMP; no item reads another's data.
//
// Real:    h_t = a_t h_{t-1} + x_t,             a_t = exp(g_t)
// Complex: h_t = a_t h_{t-1} + x_t,             a_t = exp(g_t) (cos θ + i sin θ), pairs stored (re, im)
// reset_t: a_t = 0 (the state is cleared before the update).
// Backward: acc_t = dout_t + conj(a_{t+1}) acc_{t+1} (+ dlast at t = T-1); dx_t = acc_t;
//           w_t = conj(acc_t) a_t h_{t-1}: dg_t = Re w_t, dθ -= Im w_t; dh0 = conj(a_0) acc_0.
//
// Storage is float (or double); the carried state, the decays and the rotation are double. A float recurrence
// with decays near 1 compounds rounding: a rotation with |e^{iθ}| off by one ulp, applied 65,536 times, moved
// the complex state by 1e-4 relative (tests/kernels: the long-sequence test). The memory traffic, which sets the
// speed, is the same either way.
//
// Plain C ABI (loaded with ctypes): no torch headers, so the build takes about a second.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(v) for v <= 0 as a double, exactly 0 for v below the float range (and -inf). For float input it is a
// branch-free polynomial (Cephes expf coefficients) so that the loops below vectorise, where libm's exp would
// keep them scalar. It is formed as 2^n (1 + (e^r - 1)) with e^r - 1 evaluated in float: that term carries
// float's relative precision, so decays just below 1 are accurate to ~1e-7 of (1 - a), not of a.
inline double decay(float v) {
  const float c = v < -87.0f ? -87.0f : v;                                 // 2^-126: the smallest normal scale
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(c / ln 2)
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;                // c - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float expm1_r = p * r * r + r;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return v < -87.0f ? 0.0 : static_cast<double>(scale) * (1.0 + static_cast<double>(expm1_r));
}

inline double decay(double v) {
  return std::exp(v);  // float64 storage is the gradcheck path: exactness over speed
}

// Splits D into blocks so that there are at least two work items per thread where the width allows
// (blocks of >= 64 channels keep each step's loads a few cache lines long).
struct Blocks {
  int64_t count, width;
};

inline Blocks channel_blocks(int64_t B, int64_t D, int threads) {
  const int64_t wanted = (2 * static_cast<int64_t>(threads) + B - 1) / B;
  const int64_t target = std::max<int64_t>(1, std::min<int64_t>(wanted, D / 64));
  const int64_t width = (D + target - 1) / target;
  // Recount at the rounded-up width: D = 8192 aimed at 112 blocks gets width 74, and 111 blocks of 74 already
  // cover it; a 112th would start past D with a negative length.
  return {(D + width - 1) / width, width};
}

// Work item `item` of B * blocks.count: batch row b, channels [d0, d0 + n).
struct Item {
  int64_t b, d0, n;
};

inline Item work_item(const Blocks& blocks, int64_t D, int64_t item) {
  const int64_t b = item / blocks.count, d0 = (item % blocks.count) * blocks.width;
  return {b, d0, std::min(D, d0 + blocks.width) - d0};
}

template <typename S>
void forward_real(const S* x, const S* g, const uint8_t* reset, const S* h0, S* h, int64_t B, int64_t T,
                  int64_t D, int threads) {
  const Blocks blocks = channel_blocks(B, D, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * blocks.count; ++item) {
    const auto [b, d0, n] = work_item(blocks, D, item);
    std::vector<double> state(n, 0.0);  // h_{t-1}
    double* st = state.data();
    if (h0) std::copy(h0 + b * D + d0, h0 + b * D + d0 + n, st);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t off = (b * T + t) * D + d0;
      const S* xt = x + off;
      const S* gt = g + off;
      S* ht = h + off;
      const double keep = reset && reset[b * T + t] ? 0.0 : 1.0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const double s = keep * decay(gt[i]) * st[i] + xt[i];
        st[i] = s;
        ht[i] = static_cast<S>(s);
      }
    }
  }
}

template <typename S>
void forward_complex(const S* x, const S* g, const double* cos_theta, const double* sin_theta,
                     const uint8_t* reset, const S* h0, S* h, int64_t B, int64_t T, int64_t D, int threads) {
  const Blocks blocks = channel_blocks(B, D, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * blocks.count; ++item) {
    const auto [b, d0, n] = work_item(blocks, D, item);
    const double* cs = cos_theta + d0;
    const double* sn = sin_theta + d0;
    std::vector<double> state(2 * n, 0.0);  // h_{t-1} as (re, im) pairs
    double* st = state.data();
    if (h0) std::copy(h0 + 2 * (b * D + d0), h0 + 2 * (b * D + d0 + n), st);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t off = (b * T + t) * D + d0;
      const S* xt = x + 2 * off;
      const S* gt = g + off;
      S* ht = h + 2 * off;
      const double keep = reset && reset[b * T + t] ? 0.0 : 1.0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const double a = keep * decay(gt[i]), ar = a * cs[i], ai = a * sn[i];
        const double pr = st[2 * i], pi = st[2 * i + 1];
        const double sr = ar * pr - ai * pi + xt[2 * i], si = ar * pi + ai * pr + xt[2 * i + 1];
        st[2 * i] = sr;
        st[2 * i + 1] = si;
        ht[2 * i] = static_cast<S>(sr);
        ht[2 * i + 1] = static_cast<S>(si);
      }
    }
  }
}

// The reverse pass carries acc_{t+1} and a_{t+1} in double. Before the last token they are taken as
// acc_T = dlast (or 0) and a_T = 1, so every step is the same fused loop. h_{t-1} is read back from h.
template <typename S>
void backward_real(const S* g, const uint8_t* reset, const S* h, const S* h0, const S* dout, const S* dlast,
                   S* dx, S* dg, S* dh0, int64_t B, int64_t T, int64_t D, int threads) {
  const Blocks blocks = channel_blocks(B, D, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * blocks.count; ++item) {
    const auto [b, d0, n] = work_item(blocks, D, item);
    std::vector<double> scratch(2 * n, 0.0);
    double* acc = scratch.data();  // acc_{t+1}, then acc_t
    double* an = acc + n;          // a_{t+1}, then a_t
    if (dlast) std::copy(dlast + b * D + d0, dlast + b * D + d0 + n, acc);
    std::fill(an, an + n, 1.0);
    const std::vector<S> zeros(h0 ? 0 : n, S(0));
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t off = (b * T + t) * D + d0;
      const S* dt = dout + off;
      const S* gt = g + off;
      S* dxt = dx + off;
      S* dgt = dg + off;
      const S* prev = t > 0 ? h + off - D : (h0 ? h0 + b * D + d0 : zeros.data());
      const double keep = reset && reset[b * T + t] ? 0.0 : 1.0;  // a_t = 0: g_t has no effect
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const double c = dt[i] + an[i] * acc[i];
        const double a = keep * decay(gt[i]);
        acc[i] = c;
        an[i] = a;
        dxt[i] = static_cast<S>(c);
        dgt[i] = static_cast<S>(c * a * prev[i]);
      }
    }
    if (dh0) {
      S* out = dh0 + b * D + d0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(an[i] * acc[i]);
    }
  }
}

template <typename S>
void backward_complex(const S* g, const double* cos_theta, const double* sin_theta, const uint8_t* reset,
                      const S* h, const S* h0, const S* dout, const S* dlast, S* dx, S* dg, S* dh0,
                      double* dtheta_rows, int64_t B, int64_t T, int64_t D, int threads) {
  const Blocks blocks = channel_blocks(B, D, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * blocks.count; ++item) {
    const auto [b, d0, n] = work_item(blocks, D, item);
    const double* cs = cos_theta + d0;
    const double* sn = sin_theta + d0;
    std::vector<double> scratch(5 * n, 0.0);
    double* acc = scratch.data();  // (re, im) pairs
    double* anr = acc + 2 * n;     // a as (re, im) planes
    double* ani = anr + n;
    double* dth = ani + n;
    if (dlast) std::copy(dlast + 2 * (b * D + d0), dlast + 2 * (b * D + d0 + n), acc);
    std::fill(anr, anr + n, 1.0);
    const std::vector<S> zeros(h0 ? 0 : 2 * n, S(0));
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t off = (b * T + t) * D + d0;
      const S* dt = dout + 2 * off;
      const S* gt = g + off;
      S* dxt = dx + 2 * off;
      S* dgt = dg + off;
      const S* prev = t > 0 ? h + 2 * (off - D) : (h0 ? h0 + 2 * (b * D + d0) : zeros.data());
      const double keep = reset && reset[b * T + t] ? 0.0 : 1.0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const double nr = acc[2 * i], ni = acc[2 * i + 1];
        const double cr = dt[2 * i] + anr[i] * nr + ani[i] * ni;  // dout_t + conj(a_{t+1}) acc_{t+1}
        const double ci = dt[2 * i + 1] + anr[i] * ni - ani[i] * nr;
        const double a = keep * decay(gt[i]), ar = a * cs[i], ai = a * sn[i];
        const double pr = prev[2 * i], pi = prev[2 * i + 1];
        const double qr = ar * pr - ai * pi, qi = ar * pi + ai * pr;  // a_t h_{t-1}
        acc[2 * i] = cr;
        acc[2 * i + 1] = ci;
        anr[i] = ar;
        ani[i] = ai;
        dxt[2 * i] = static_cast<S>(cr);
        dxt[2 * i + 1] = static_cast<S>(ci);
        dgt[i] = static_cast<S>(cr * qr + ci * qi);  // Re(conj(acc) q)
        dth[i] -= cr * qi - ci * qr;                  // Im(conj(acc) q)
      }
    }
    std::copy(dth, dth + n, dtheta_rows + b * D + d0);
    if (dh0) {
      S* out = dh0 + 2 * (b * D + d0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {  // conj(a_0) acc_0
        out[2 * i] = static_cast<S>(anr[i] * acc[2 * i] + ani[i] * acc[2 * i + 1]);
        out[2 * i + 1] = static_cast<S>(anr[i] * acc[2 * i + 1] - ani[i] * acc[2 * i]);
      }
    }
  }
}

}  // namespace

// cos_theta == nullptr selects the real variant. reset, h0, dlast and dh0 may be nullptr; cos/sin θ are double.
#define HGRN_CPU_SCAN_ENTRY_POINTS(S, SUFFIX)                                                              \
  extern "C" void hgrn_cpu_scan_forward_##SUFFIX(const S* x, const S* g, const double* cos_theta,       \
                                                 const double* sin_theta, const uint8_t* reset,         \
                                                 const S* h0, S* h, int64_t B, int64_t T, int64_t D,    \
                                                 int threads) {                                         \
    if (cos_theta)                                                                                       \
      forward_complex(x, g, cos_theta, sin_theta, reset, h0, h, B, T, D, threads);                       \
    else                                                                                                 \
      forward_real(x, g, reset, h0, h, B, T, D, threads);                                                \
  }                                                                                                      \
  extern "C" void hgrn_cpu_scan_backward_##SUFFIX(                                                       \
      const S* g, const double* cos_theta, const double* sin_theta, const uint8_t* reset, const S* h,   \
      const S* h0, const S* dout, const S* dlast, S* dx, S* dg, S* dh0, double* dtheta_rows, int64_t B, \
      int64_t T, int64_t D, int threads) {                                                               \
    if (cos_theta)                                                                                       \
      backward_complex(g, cos_theta, sin_theta, reset, h, h0, dout, dlast, dx, dg, dh0, dtheta_rows, B, \
                       T, D, threads);                                                                   \
    else                                                                                                 \
      backward_real(g, reset, h, h0, dout, dlast, dx, dg, dh0, B, T, D, threads);                        \
  }

HGRN_CPU_SCAN_ENTRY_POINTS(float, f32)
HGRN_CPU_SCAN_ENTRY_POINTS(double, f64)
