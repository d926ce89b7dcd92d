// t2's GPU kernels: the KV cache written through block tables, and attention of a ragged batch over it.
// Built to PTX at compile time (build.rs) and loaded through candle's custom-module cache.
//
// Pool layout (see kv.rs): per layer one (blocks * kv_heads * BLOCK, head_dim) matrix, head-major within a
// block, so the row of (block b, kv head h, slot i) is (b * kv_heads + h) * BLOCK + i.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define BLOCK 16
#define WARPS 4
#define MAX_PER_LANE 8  // head_dim <= 256

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// src: (rows, kv_heads, head_dim) contiguous. slot[r]: the pool row of kv head 0 for row r's position;
// head h's row is BLOCK further per head. grid (rows, kv_heads), any block width.
template <typename T>
__device__ void kv_write(const T* src, T* pool, const uint32_t* slot, int kv_heads, int head_dim) {
  const int r = blockIdx.x, h = blockIdx.y;
  const T* s = src + ((size_t)r * kv_heads + h) * head_dim;
  T* d = pool + ((size_t)slot[r] + (size_t)h * BLOCK) * head_dim;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) d[i] = s[i];
}

// One query head of one row per thread block: q (rows, heads, head_dim); out likewise. Row r belongs to
// sequence row_seq[r] and sits at position row_pos[r]: it attends to that sequence's positions
// 0..=row_pos[r] (causal), found through the sequence's block table tables[table_off[s]..].
// Warps take a key block each in turn and keep an online softmax; lanes split the head dimension.
template <typename T>
__device__ void paged_attention(const T* q, const T* k_pool, const T* v_pool, T* out,
                                const uint32_t* row_seq, const uint32_t* row_pos,
                                const uint32_t* table_off, const uint32_t* tables, int heads,
                                int kv_heads, int head_dim, float scale) {
  const int r = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kvh = head / (heads / kv_heads);
  const int n_keys = (int)row_pos[r] + 1;
  const uint32_t* table = tables + table_off[row_seq[r]];
  const int per_lane = (head_dim + 31) / 32;

  float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
  const T* qr = q + ((size_t)r * heads + head) * head_dim;
#pragma unroll
  for (int i = 0; i < MAX_PER_LANE; i++) {
    int d = lane + 32 * i;
    qv[i] = (i < per_lane && d < head_dim) ? to_f(qr[d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int n_blocks = (n_keys + BLOCK - 1) / BLOCK;
  for (int b = warp; b < n_blocks; b += WARPS) {
    const size_t base = ((size_t)table[b] * kv_heads + kvh) * BLOCK;
    const int in_block = min(BLOCK, n_keys - b * BLOCK);
    for (int j = 0; j < in_block; j++) {
      const T* kr = k_pool + (base + j) * head_dim;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < MAX_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (i < per_lane && d < head_dim) dot += qv[i] * to_f(kr[d]);
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffff, dot, o);
      const float m_new = fmaxf(m, dot);
      const float corr = __expf(m - m_new), p = __expf(dot - m_new);
      l = l * corr + p;
      const T* vr = v_pool + (base + j) * head_dim;
#pragma unroll
      for (int i = 0; i < MAX_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (i < per_lane && d < head_dim) acc[i] = acc[i] * corr + p * to_f(vr[d]);
      }
      m = m_new;
    }
  }
  __shared__ float sm[WARPS], sl[WARPS];
  __shared__ float sacc[WARPS][32 * MAX_PER_LANE];
  if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
  for (int i = 0; i < MAX_PER_LANE; i++) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float mx = -INFINITY;
  for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w]);
  float total = 0.f, wgt[WARPS];
  for (int w = 0; w < WARPS; w++) {
    wgt[w] = sl[w] > 0.f ? __expf(sm[w] - mx) : 0.f;
    total += sl[w] * wgt[w];
  }
  T* o = out + ((size_t)r * heads + head) * head_dim;
  for (int i = 0; i < per_lane; i++) {
    int d = lane + 32 * i;
    if (d >= head_dim) break;
    float s = 0.f;
    for (int w = 0; w < WARPS; w++) s += sacc[w][d] * wgt[w];
    o[d] = from_f<T>(s / total);
  }
}


// Residual add and RMSNorm in one pass: out[0] = x + r, out[1] = rmsnorm(x + r) * w, each (rows, d).
// One block per row. The norm reads the sum as stored (rounded to T), as the separate ops would.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* r, const T* w, T* out, int rows, int d, float eps) {
  const int row = blockIdx.x;
  const T* xr = x + (size_t)row * d;
  const T* rr = r + (size_t)row * d;
  T* sum = out + (size_t)row * d;
  T* normed = out + (size_t)rows * d + (size_t)row * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    T v = from_f<T>(to_f(xr[i]) + to_f(rr[i]));
    sum[i] = v;
    float f = to_f(v);
    ss += f * f;
  }
  __shared__ float part[32];
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x + 31) / 32 ? part[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffff, t, o);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    normed[i] = from_f<T>(to_f(sum[i]) * inv * to_f(w[i]));
}

// silu(g) * u, rounded as the separate ops round (silu to T, then the product to T). g and u are
// (rows, cols) with their own row strides (the halves of a stacked gate/up output); out is contiguous.
template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, size_t rows, size_t cols, size_t g_stride,
                         size_t u_stride) {
  const size_t n = rows * cols;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / cols, c = i % cols;
    float gf = to_f(g[r * g_stride + c]);
    T s = from_f<T>(gf / (1.f + __expf(-gf)));
    out[i] = from_f<T>(to_f(s) * to_f(u[r * u_stride + c]));
  }
}

// x * table[ids[r]] row by row: x and out (rows, cols) contiguous, table (capacity, cols), each row's
// scales at ids[r] (the mix table of the factored SVF product). The product is rounded once, as candle's
// multiply rounds it.
template <typename T>
__device__ void scale_rows(const T* x, const T* table, const uint32_t* ids, T* out, size_t rows,
                           size_t cols) {
  const size_t n = rows * cols;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / cols, c = i % cols;
    out[i] = from_f<T>(to_f(x[i]) * to_f(table[(size_t)ids[r] * cols + c]));
  }
}

// RoPE on q and k at each row's position, q into q_out, and k (rotated) and v into their pool rows.
// grid (rows, heads + kv_heads), block head_dim / 2 threads (one rotation pair each). q, k, v: (rows,
// heads, head_dim) with each row's heads contiguous and rows *_stride elements apart (a stacked q/k/v
// output); q_out is contiguous. cos/sin: the model's tables, (positions, head_dim / 2). half_style: pairs
// (i, i + d/2) (HF); else (2i, 2i + 1) (GGUF).
template <typename T>
__device__ void rope_store(const T* q, const T* k, const T* v, const T* cos_t, const T* sin_t,
                           const uint32_t* row_pos, const uint32_t* slot, T* q_out, T* k_pool,
                           T* v_pool, size_t q_stride, size_t k_stride, size_t v_stride, int heads,
                           int kv_heads, int head_dim, int half_style) {
  const int r = blockIdx.x, y = blockIdx.y, half = head_dim / 2;
  const size_t pos = row_pos[r];
  const T* src;
  T* dst;
  if (y < heads) {
    src = q + (size_t)r * q_stride + (size_t)y * head_dim;
    dst = q_out + ((size_t)r * heads + y) * head_dim;
  } else {
    const int h = y - heads;
    src = k + (size_t)r * k_stride + (size_t)h * head_dim;
    const size_t row = (size_t)slot[r] + (size_t)h * BLOCK;
    dst = k_pool + row * head_dim;
    const T* vs = v + (size_t)r * v_stride + (size_t)h * head_dim;
    T* vd = v_pool + row * head_dim;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) vd[i] = vs[i];
  }
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = to_f(cos_t[pos * half + i]), s = to_f(sin_t[pos * half + i]);
    const int a = half_style ? i : 2 * i, b = half_style ? i + half : 2 * i + 1;
    const float x0 = to_f(src[a]), x1 = to_f(src[b]);
    dst[a] = from_f<T>(x0 * c - x1 * s);
    dst[b] = from_f<T>(x0 * s + x1 * c);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                        \
  extern "C" __global__ void kv_write_##SUFFIX(const T* src, T* pool, const uint32_t* slot,          \
                                               int kv_heads, int head_dim) {                          \
    kv_write<T>(src, pool, slot, kv_heads, head_dim);                                                 \
  }                                                                                                   \
  extern "C" __global__ void paged_attention_##SUFFIX(                                                \
      const T* q, const T* k_pool, const T* v_pool, T* out, const uint32_t* row_seq,                  \
      const uint32_t* row_pos, const uint32_t* table_off, const uint32_t* tables, int heads,          \
      int kv_heads, int head_dim, float scale) {                                                      \
    paged_attention<T>(q, k_pool, v_pool, out, row_seq, row_pos, table_off, tables, heads, kv_heads, \
                       head_dim, scale);                                                              \
  }                                                                                                   \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* r, const T* w, T* out,       \
                                                   int rows, int d, float eps) {                      \
    add_rms_norm<T>(x, r, w, out, rows, d, eps);                                                      \
  }                                                                                                   \
  extern "C" __global__ void silu_mul_##SUFFIX(const T* g, const T* u, T* out, size_t rows,         \
                                               size_t cols, size_t g_stride, size_t u_stride) {       \
    silu_mul<T>(g, u, out, rows, cols, g_stride, u_stride);                                           \
  }                                                                                                   \
  extern "C" __global__ void scale_rows_##SUFFIX(const T* x, const T* table, const uint32_t* ids,   \
                                                 T* out, size_t rows, size_t cols) {                  \
    scale_rows<T>(x, table, ids, out, rows, cols);                                                    \
  }                                                                                                   \
  extern "C" __global__ void rope_store_##SUFFIX(                                                     \
      const T* q, const T* k, const T* v, const T* cos_t, const T* sin_t, const uint32_t* row_pos,    \
      const uint32_t* slot, T* q_out, T* k_pool, T* v_pool, size_t q_stride, size_t k_stride,         \
      size_t v_stride, int heads, int kv_heads, int head_dim, int half_style) {                       \
    rope_store<T>(q, k, v, cos_t, sin_t, row_pos, slot, q_out, k_pool, v_pool, q_stride, k_stride,    \
                  v_stride, heads, kv_heads, head_dim, half_style);                                   \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
