/* Greedy decoding of given prompt token ids with llama.cpp, for bench/vs_engines.py.

llama.cpp's own tools take text prompts, which its tokenizer would split in its own way; the exact
comparison needs the very token ids the other engines get. This driver reads prompts as lines of
space-separated token ids on stdin, decodes each alone (batch 1, a fresh KV cache) for N new tokens
by argmax over the logits (eos not treated specially), and prints the new ids of each prompt as one
line. The KV cache is F32 and flash attention off (what an FP32 comparison needs) unless given.

    cc -O2 llama_greedy.c -I LLAMA/include -I LLAMA/ggml/include -L LLAMA/build/bin -lllama -lggml \
       -Wl,-rpath,LLAMA/build/bin -o llama_greedy
    ./llama_greedy MODEL.gguf N_NEW THREADS [f32|f16|bf16] < prompts.txt
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static enum ggml_type cache_type(const char *name) {
    if (strcmp(name, "f32") == 0) return GGML_TYPE_F32;
    if (strcmp(name, "f16") == 0) return GGML_TYPE_F16;
    if (strcmp(name, "bf16") == 0) return GGML_TYPE_BF16;
    fprintf(stderr, "llama_greedy: cache type: expected f32, f16 or bf16, got %s\n", name);
    exit(2);
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW THREADS [f32|f16|bf16] < prompts\n", argv[0]);
        return 2;
    }
    const int n_new = atoi(argv[2]), threads = atoi(argv[3]);
    const enum ggml_type kv = cache_type(argc > 4 ? argv[4] : "f32");
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama_greedy: cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    static char line[1 << 20];
    llama_token tokens[8192];
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        for (char *tok = strtok(line, " \n"); tok && n < 8192 - n_new; tok = strtok(NULL, " \n")) tokens[n++] = atoi(tok);
        if (n == 0) continue;
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n + n_new + 16;
        cp.n_batch = cp.n_ubatch = n;
        cp.n_threads = cp.n_threads_batch = threads;
        cp.flash_attn_type = kv == GGML_TYPE_F32 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
        cp.type_k = cp.type_v = kv;
        struct llama_context *ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            fprintf(stderr, "llama_greedy: cannot create a context\n");
            return 1;
        }
        struct llama_batch batch = llama_batch_get_one(tokens, n);
        for (int i = 0; i < n_new; i++) {
            if (llama_decode(ctx, batch) != 0) {
                fprintf(stderr, "llama_greedy: llama_decode failed at new token %d\n", i);
                return 1;
            }
            const float *logits = llama_get_logits_ith(ctx, -1);
            llama_token best = 0;
            for (llama_token t = 1; t < n_vocab; t++)
                if (logits[t] > logits[best]) best = t;
            printf(i ? " %d" : "%d", best);
            tokens[n] = best;
            batch = llama_batch_get_one(&tokens[n], 1);
            n++;
        }
        printf("\n");
        fflush(stdout);
        llama_free(ctx);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
