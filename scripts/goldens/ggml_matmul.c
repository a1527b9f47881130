// One-token matrix products computed by llama.cpp's CPU backend exactly as it runs a model:
// the weights placed in the backend's repacking buffer (so Q4_0 and Q4_K matrices of a
// multiple of 8 rows, and Q2_K ones on AVX-512 CPUs, are repacked into its interleaved
// layouts) and multiplied by an f32 input through a ggml graph. Prints fixture lines for
// kernels/tests/ggml_matmul.rs. Built and run by make_kernel_goldens.py.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t state = 0x9E3779B97F4A7C15ull;
static float normal(void) {
    // Sum of uniforms: close enough to normal for test data, and reproducible anywhere.
    float s = 0;
    for (int i = 0; i < 12; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        s += (float)(state >> 40) / (float)(1ull << 24);
    }
    return s - 6.0f;
}

static void hex(const char *label, const void *data, size_t n) {
    printf("%s ", label);
    for (size_t i = 0; i < n; i++) printf("%02x", ((const uint8_t *)data)[i]);
    printf("\n");
}

static void one_case(ggml_backend_t backend, ggml_backend_buffer_type_t repack, enum ggml_type type, const char *name, int rows, int cols) {
    float *w = malloc(sizeof(float) * rows * cols);
    for (int i = 0; i < rows * cols; i++) w[i] = normal() * 0.05f;
    size_t row_bytes = ggml_row_size(type, cols);
    uint8_t *wq = malloc(row_bytes * rows);
    ggml_quantize_chunk(type, w, wq, 0, rows, cols, NULL);
    float *x = malloc(sizeof(float) * cols);
    for (int i = 0; i < cols; i++) x[i] = normal();

    struct ggml_init_params wp = { ggml_tensor_overhead() * 4, NULL, true };
    struct ggml_context *wctx = ggml_init(wp);
    struct ggml_tensor *W = ggml_new_tensor_2d(wctx, type, cols, rows);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, repack);
    ggml_backend_tensor_set(W, wq, 0, row_bytes * rows);

    struct ggml_init_params gp = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), NULL, true };
    struct ggml_context *gctx = ggml_init(gp);
    struct ggml_tensor *X = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, cols, 1);
    struct ggml_tensor *Y = ggml_mul_mat(gctx, W, X);
    struct ggml_cgraph *graph = ggml_new_graph(gctx);
    ggml_build_forward_expand(graph, Y);
    ggml_backend_buffer_t gbuf = ggml_backend_alloc_ctx_tensors(gctx, backend);
    ggml_backend_tensor_set(X, x, 0, sizeof(float) * cols);
    if (ggml_backend_graph_compute(backend, graph) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph failed for %s\n", name);
        exit(1);
    }
    float *y = malloc(sizeof(float) * rows);
    ggml_backend_tensor_get(Y, y, 0, sizeof(float) * rows);

    printf("case %s plain %d %d\n", name, rows, cols);
    hex("weights", wq, row_bytes * rows);
    hex("input", x, sizeof(float) * cols);
    printf("outputs");
    for (int r = 0; r < rows; r++) {
        uint32_t bits;
        memcpy(&bits, &y[r], 4);
        printf(" %u", bits);
    }
    printf("\n");
    ggml_backend_buffer_free(gbuf);
    ggml_backend_buffer_free(wbuf);
    ggml_free(gctx);
    ggml_free(wctx);
    free(w), free(wq), free(x), free(y);
}

int main(void) {
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, 1);
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get_extra = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t *extra = get_extra ? get_extra(dev) : NULL;
    ggml_backend_buffer_type_t repack = NULL;
    for (int i = 0; extra && extra[i]; i++) {
        if (strstr(ggml_backend_buft_name(extra[i]), "REPACK")) repack = extra[i];
    }
    if (!repack) {
        fprintf(stderr, "this ggml has no repacking buffer type\n");
        return 1;
    }
    const struct { enum ggml_type type; const char *name; } types[] = {
        { GGML_TYPE_Q4_0, "Q4_0" }, { GGML_TYPE_Q4_K, "Q4_K" }, { GGML_TYPE_Q2_K, "Q2_K" },
    };
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        one_case(backend, repack, types[t].type, types[t].name, 16, 512);
        one_case(backend, repack, types[t].type, types[t].name, 8, 256);
    }
    ggml_backend_free(backend);
    return 0;
}
