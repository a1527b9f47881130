// llama.cpp's greedy continuation of a prompt, evaluated one token per decode call (the order
// kiln sums in for every batch shape; llama.cpp's batched prompt path sums otherwise), written
// to stdout as the generated text's bytes.
//
//     llama_greedy MODEL.gguf TOKENS PROMPT
//
// Built against a llama.cpp tree by make_export_goldens.sh.
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char* text, void* data) {
    (void)level, (void)text, (void)data;
}

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: llama_greedy MODEL.gguf TOKENS PROMPT\n");
        return 2;
    }
    const int n_new = atoi(argv[2]);
    const char* prompt = argv[3];
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "llama_greedy: cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab* vocab = llama_model_get_vocab(model);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context* ctx = llama_init_from_model(model, cp);
    llama_token tokens[512];
    // As llama-simple does: the model's own special tokens (BOS when it adds one), specials in
    // the text parsed.
    const int n_prompt = llama_tokenize(vocab, prompt, (int)strlen(prompt), tokens, 512 - n_new, true, true);
    if (n_prompt <= 0) {
        fprintf(stderr, "llama_greedy: the prompt does not tokenize\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (int i = 0, generated = 0;; i++) {
        if (llama_decode(ctx, llama_batch_get_one(&tokens[i], 1))) {
            fprintf(stderr, "llama_greedy: decode failed\n");
            return 1;
        }
        if (i + 1 < n_prompt) continue;
        const float* logits = llama_get_logits_ith(ctx, -1);
        llama_token next = 0;
        for (int k = 1; k < n_vocab; k++)
            if (logits[k] > logits[next]) next = k;
        if (llama_vocab_is_eog(vocab, next)) break;
        char piece[256];
        const int n = llama_token_to_piece(vocab, next, piece, sizeof piece, 0, false);
        if (n < 0) return 1;
        fwrite(piece, 1, (size_t)n, stdout);
        if (++generated == n_new) break;
        tokens[i + 1] = next;
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
