// attention.cu compiled for the host through emulate.h, for src/emulated.rs. The arguments
// were checked on the Rust side (the kernels trust their indices, as on the GPU).
#define KILN_EMULATE
#include "attention.cu"

extern "C" void kiln_emulate_paged_attention(int cache_is_half, float* out, const float* q, const void* k_cache,
                                             const void* v_cache, const unsigned* block_tables, const unsigned* row_seq,
                                             const unsigned* row_lo, const unsigned* row_hi, int rows, int heads,
                                             int kv_heads, int head_dim, int block_size, int max_blocks, int chunk,
                                             float scale, float softcap, int half_rounding, int threads,
                                             size_t shared_bytes) {
    emu::launch(dim3{(unsigned)rows, (unsigned)heads, 1}, dim3{(unsigned)threads, 1, 1}, shared_bytes, [&] {
        if (cache_is_half)
            kiln_paged_attention_f16(out, q, static_cast<const __half*>(k_cache), static_cast<const __half*>(v_cache),
                                     block_tables, row_seq, row_lo, row_hi, heads, kv_heads, head_dim, block_size,
                                     max_blocks, chunk, scale, softcap, half_rounding);
        else
            kiln_paged_attention_f32(out, q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                                     block_tables, row_seq, row_lo, row_hi, heads, kv_heads, head_dim, block_size,
                                     max_blocks, chunk, scale, softcap, half_rounding);
    });
}

extern "C" void kiln_emulate_write_cache(int cache_is_half, void* cache, const float* src, const unsigned* slots,
                                         int rows, int width, int threads) {
    emu::launch(dim3{(unsigned)rows, 1, 1}, dim3{(unsigned)threads, 1, 1}, 0, [&] {
        if (cache_is_half)
            kiln_write_cache_f16(static_cast<__half*>(cache), src, slots, width);
        else
            kiln_write_cache_f32(static_cast<float*>(cache), src, slots, width);
    });
}
