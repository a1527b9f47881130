// kiln's attention kernels: paged attention over the block table, and the write of new keys
// and values into their cache slots. Compiled to PTX by nvcc for the GPU (build.rs), and as
// C++ against emulate.h for the host, where the tests run the same source against
// src/reference.rs (no GPU is needed to check the kernels' logic).
//
// Layouts (all row-major, the worker's): queries and output `[rows, heads * head_dim]` f32;
// each layer's cache `[slots, kv_heads * head_dim]` in half or f32; block tables
// `[sequences, max_blocks]`; a query row sees the keys at positions [row_lo, row_hi) of its
// sequence, the key at position p in slot `table[p / block_size] * block_size + p % block_size`.

#ifdef KILN_EMULATE
#include "emulate.h"
#else
#include <cuda_fp16.h>
#define KILN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// Output dimensions one thread accumulates: head dimensions up to 8 * blockDim.x (the
// launcher checks).
#define KILN_MAX_DIMS_PER_THREAD 8

namespace kiln {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half_rn(v)); }

// The maximum and the sum over the block of one value per thread; `red` holds blockDim.x
// floats (a power of two, the launcher checks). Every thread gets the result.
__device__ float block_max(float v, float* red) {
    const unsigned t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = fmaxf(red[t], red[t + s]);
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

__device__ float block_sum(float v, float* red) {
    const unsigned t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

// One block per (row, query head): blockIdx.x is the row (a step's rows can outnumber
// gridDim.y's limit of 65535), blockIdx.y the head. Shared memory
// holds the query, the scores of `chunk` keys and the reduction buffer.
//
// The softmax is normalized before the values are summed, so that a half-precision cache
// can round the probabilities to half as llama.cpp's reference does: a first pass finds the
// maximum and the sum (each thread over its keys, then combined), a second sums the values.
// When a row's keys fit one chunk their scores stay in shared memory between the passes;
// longer rows compute their scores again in the second pass rather than keep them in a
// global buffer sized by the longest context.
template <typename T>
__device__ void paged_attention(float* out, const float* q, const T* k_cache, const T* v_cache,
                                const unsigned* block_tables, const unsigned* row_seq,
                                const unsigned* row_lo, const unsigned* row_hi, int heads,
                                int kv_heads, int head_dim, int block_size, int max_blocks,
                                int chunk, float scale, float softcap, int half_rounding) {
    KILN_DYNAMIC_SHARED(float, shared);
    float* q_s = shared;
    float* scores = q_s + head_dim;
    float* red = scores + chunk;

    const int row = blockIdx.x, head = blockIdx.y;
    const int tid = threadIdx.x, threads = blockDim.x;
    const int kv_head = head / (heads / kv_heads);
    const size_t width = (size_t)kv_heads * head_dim;
    const size_t head_offset = (size_t)kv_head * head_dim;
    const unsigned* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const int lo = row_lo[row], hi = row_hi[row];

    const float* q_row = q + ((size_t)row * heads + head) * head_dim;
    for (int d = tid; d < head_dim; d += threads) q_s[d] = half_rounding ? round_half(q_row[d]) : q_row[d];
    __syncthreads();

    auto slot = [&](int p) -> size_t { return (size_t)table[p / block_size] * block_size + p % block_size; };
    auto score = [&](int p) -> float {
        const size_t base = slot(p) * width + head_offset;
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += q_s[d] * load(k_cache, base + d);
        float s = dot * scale;
        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        return s;
    };

    // Pass 1: each thread's running maximum and sum over its keys, then the block's.
    float m = -INFINITY, l = 0.f;
    for (int c0 = lo; c0 < hi; c0 += chunk) {
        const int n = min(chunk, hi - c0);
        for (int j = tid; j < n; j += threads) {
            const float s = score(c0 + j);
            scores[j] = s;
            if (s > m) {
                l = l * expf(m - s) + 1.f;
                m = s;
            } else {
                l += expf(s - m);
            }
        }
    }
    const float row_max = block_max(m, red);
    const float row_sum = block_sum(m == -INFINITY ? 0.f : l * expf(m - row_max), red);
    const float inv_sum = 1.f / row_sum;
    const bool scores_kept = hi - lo <= chunk;

    // Pass 2: probabilities, then each thread's output dimensions summed over the keys.
    float acc[KILN_MAX_DIMS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < KILN_MAX_DIMS_PER_THREAD; ++i) acc[i] = 0.f;
    for (int c0 = lo; c0 < hi; c0 += chunk) {
        const int n = min(chunk, hi - c0);
        __syncthreads();  // the previous chunk's probabilities are read
        for (int j = tid; j < n; j += threads) {
            const float s = scores_kept ? scores[j] : score(c0 + j);
            const float p = expf(s - row_max) * inv_sum;
            scores[j] = half_rounding ? round_half(p) : p;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < KILN_MAX_DIMS_PER_THREAD; ++i) {
            const int d = tid + i * threads;
            if (d < head_dim) {
                float a = acc[i];
                for (int j = 0; j < n; ++j) a += scores[j] * load(v_cache, slot(c0 + j) * width + head_offset + d);
                acc[i] = a;
            }
        }
    }
    float* out_row = out + ((size_t)row * heads + head) * head_dim;
#pragma unroll
    for (int i = 0; i < KILN_MAX_DIMS_PER_THREAD; ++i) {
        const int d = tid + i * threads;
        if (d < head_dim) out_row[d] = acc[i];
    }
}

// One block per row: row r of `src` (`width` values) into slot `slots[r]` of `cache`.
template <typename T>
__device__ void write_cache(T* cache, const float* src, const unsigned* slots, int width) {
    const size_t row = blockIdx.x;
    const size_t base = (size_t)slots[row] * width;
    for (int d = threadIdx.x; d < width; d += blockDim.x) store(cache, base + d, src[row * width + d]);
}

}  // namespace kiln

#define KILN_ATTENTION_ARGS(T)                                                                  \
    float *out, const float *q, const T *k_cache, const T *v_cache, const unsigned *block_tables, \
        const unsigned *row_seq, const unsigned *row_lo, const unsigned *row_hi, int heads,        \
        int kv_heads, int head_dim, int block_size, int max_blocks, int chunk, float scale,        \
        float softcap, int half_rounding
#define KILN_ATTENTION_PASS                                                                        \
    out, q, k_cache, v_cache, block_tables, row_seq, row_lo, row_hi, heads, kv_heads, head_dim,    \
        block_size, max_blocks, chunk, scale, softcap, half_rounding

extern "C" __global__ void kiln_paged_attention_f16(KILN_ATTENTION_ARGS(__half)) {
    kiln::paged_attention<__half>(KILN_ATTENTION_PASS);
}
extern "C" __global__ void kiln_paged_attention_f32(KILN_ATTENTION_ARGS(float)) {
    kiln::paged_attention<float>(KILN_ATTENTION_PASS);
}
extern "C" __global__ void kiln_write_cache_f16(__half* cache, const float* src, const unsigned* slots, int width) {
    kiln::write_cache<__half>(cache, src, slots, width);
}
extern "C" __global__ void kiln_write_cache_f32(float* cache, const float* src, const unsigned* slots, int width) {
    kiln::write_cache<float>(cache, src, slots, width);
}
