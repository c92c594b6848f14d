/* Greedy batched decoding of given prompt token ids with llama.cpp, for bench/vs_engines.py.

llama.cpp's own tools take text prompts (which its tokenizer would split its own way) or random
tokens (llama-batched-bench); the comparison needs the very token ids the other engines get, and
the same timing: this driver over libllama reads B prompts, one per line of space-separated token
ids on stdin, and decodes them together as B sequences for N new tokens, greedily (argmax of the
logits, eos not treated specially). It first runs the same work once as a warm-up (buffers
allocated, caches warm), clears the KV cache, then times:

    prefill  the B prompts in one llama_decode call (chunked by llama.cpp into ubatches) and the
             argmax of each sequence's last logits: the first new token;
    decode   the N - 1 further steps, each one llama_decode of B tokens and B argmaxes.

Output: a line `@@time PREFILL_S DECODE_S`, then the N new ids of each prompt, one line each.
The KV cache type is the 4th argument; f32 turns flash attention off (the exact FP32 comparison),
the others leave it to llama.cpp (auto). `norepack` as 5th argument keeps the weights unrepacked.

    cc -O2 llama_driver.c -I LLAMA/include -I LLAMA/ggml/include -L LLAMA/build/bin -lllama \
       -lggml -lggml-base -Wl,-rpath,LLAMA/build/bin -o llama_driver
    ./llama_driver MODEL.gguf N_NEW THREADS f32|f16|bf16 [norepack] < prompts.txt
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llama.h"

#define MAX_SEQS 512
#define MAX_PROMPT 8192

static enum ggml_type cache_type(const char *name) {
    if (strcmp(name, "f32") == 0) return GGML_TYPE_F32;
    if (strcmp(name, "f16") == 0) return GGML_TYPE_F16;
    if (strcmp(name, "bf16") == 0) return GGML_TYPE_BF16;
    fprintf(stderr, "llama_driver: cache type: expected f32, f16 or bf16, got %s\n", name);
    exit(2);
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static llama_token argmax(const float *logits, int n_vocab) {
    llama_token best = 0;
    for (llama_token t = 1; t < n_vocab; t++)
        if (logits[t] > logits[best]) best = t;
    return best;
}

static int n_seqs, n_prompt[MAX_SEQS];
static llama_token *prompts[MAX_SEQS];

/* prefill + n_new - 1 decode steps; out[s * n_new + i] = new token i of sequence s */
static void generate(struct llama_context *ctx, int n_vocab, int n_new, llama_token *out, double *t_pre,
                     double *t_dec) {
    int total = 0;
    for (int s = 0; s < n_seqs; s++) total += n_prompt[s];
    struct llama_batch batch = llama_batch_init(total > n_seqs ? total : n_seqs, 0, 1);
    double t0 = now();
    batch.n_tokens = 0;
    int last[MAX_SEQS];
    for (int s = 0; s < n_seqs; s++)
        for (int i = 0; i < n_prompt[s]; i++) {
            int k = batch.n_tokens++;
            batch.token[k] = prompts[s][i];
            batch.pos[k] = i;
            batch.n_seq_id[k] = 1;
            batch.seq_id[k][0] = s;
            batch.logits[k] = i == n_prompt[s] - 1;
            if (batch.logits[k]) last[s] = k;
        }
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_driver: llama_decode failed on the prompts\n");
        exit(1);
    }
    for (int s = 0; s < n_seqs; s++) out[s * n_new] = argmax(llama_get_logits_ith(ctx, last[s]), n_vocab);
    double t1 = now();
    for (int i = 1; i < n_new; i++) {
        batch.n_tokens = n_seqs;
        for (int s = 0; s < n_seqs; s++) {
            batch.token[s] = out[s * n_new + i - 1];
            batch.pos[s] = n_prompt[s] + i - 1;
            batch.n_seq_id[s] = 1;
            batch.seq_id[s][0] = s;
            batch.logits[s] = 1;
        }
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_driver: llama_decode failed at new token %d\n", i);
            exit(1);
        }
        for (int s = 0; s < n_seqs; s++) out[s * n_new + i] = argmax(llama_get_logits_ith(ctx, s), n_vocab);
    }
    *t_pre = t1 - t0;
    *t_dec = now() - t1;
    llama_batch_free(batch);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW THREADS f32|f16|bf16 [norepack] < prompts\n", argv[0]);
        return 2;
    }
    const int n_new = atoi(argv[2]), threads = atoi(argv[3]);
    const enum ggml_type kv = cache_type(argv[4]);
    static char line[1 << 20];
    int longest = 0, total = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (n_seqs == MAX_SEQS) {
            fprintf(stderr, "llama_driver: more than %d prompts\n", MAX_SEQS);
            return 2;
        }
        llama_token *p = malloc(sizeof(llama_token) * MAX_PROMPT);
        int n = 0;
        for (char *tok = strtok(line, " \n"); tok; tok = strtok(NULL, " \n")) {
            if (n == MAX_PROMPT) {
                fprintf(stderr, "llama_driver: prompt %d longer than %d tokens\n", n_seqs, MAX_PROMPT);
                return 2;
            }
            p[n++] = atoi(tok);
        }
        if (n == 0) continue;
        prompts[n_seqs] = p;
        n_prompt[n_seqs++] = n;
        longest = n > longest ? n : longest;
        total += n;
    }
    if (n_seqs == 0 || n_new < 1) {
        fprintf(stderr, "llama_driver: no prompts on stdin, or N_NEW < 1\n");
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    if (argc > 5 && strcmp(argv[5], "norepack") == 0) mp.use_extra_bufts = false;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama_driver: cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_seq_max = n_seqs;
    cp.n_ctx = n_seqs * (longest + n_new + 16);
    cp.n_batch = total > 512 ? total : 512;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = kv == GGML_TYPE_F32 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.type_k = cp.type_v = kv;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama_driver: cannot create a context for %d sequences\n", n_seqs);
        return 1;
    }
    llama_token *out = malloc(sizeof(llama_token) * n_seqs * n_new);
    double t_pre, t_dec;
    generate(ctx, n_vocab, n_new, out, &t_pre, &t_dec); /* warm-up */
    llama_memory_clear(llama_get_memory(ctx), true);
    generate(ctx, n_vocab, n_new, out, &t_pre, &t_dec);
    printf("@@time %.6f %.6f\n", t_pre, t_dec);
    for (int s = 0; s < n_seqs; s++)
        for (int i = 0; i < n_new; i++) printf(i + 1 < n_new ? "%d " : "%d\n", out[s * n_new + i]);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
