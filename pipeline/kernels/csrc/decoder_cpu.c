/* A decode step's decoder layers in one call (included by cpu_kernels.c after linear_cpu.c and attn_cpu.c): the
 * per-layer sequence of NativeRunner._run, made of this library's own kernels, with no Python between them.
 * cpu_decoder.py (`FusedDecoder`) builds the arguments; NativeRunner uses it for decode steps where every linear of
 * every layer is on the int4 kernel and the KV cache is 16-bit or int8 / int4 with static scales, and keeps its per-op
 * loop elsewhere.
 *
 * Per layer l, for the step's T rows (res (T, D) fp32 is the residual stream, x (T, D) the last layer's output):
 *   res += x; h = rmsnorm(res) * attn_norm                        rmsnorm_cpu
 *   qkv = h @ Wqkv.T (+ b_qkv)                                     int4_cpu_linear   (T, (nh + 2 nkv) hd)
 *   rotary on q, k; k, v written at the cache rows `slots`         rope_kv_cpu
 *   o = attention(q, the cache)                                    attn_cpu_decode   (T, nh hd)
 *   res += o @ Wo.T (+ b_o); h = rmsnorm(res) * ffn_norm           int4_cpu_linear, rmsnorm_cpu
 *   x = (silu(gate) * up) @ W2.T, gate | up = h @ W13.T            int4_cpu_linear, int4_cpu_swiglu_linear
 * Each op is the same C function the per-op path calls with the same arguments, so both paths give the same bits.
 */

typedef struct {                  /* one int4 linear as Int4CPU holds it */
    const uint8_t *w;
    const float *ws, *wm, *bias;  /* bias: NULL, or (N,) fp32 */
    int N, K, group;
} dec_linear;

typedef struct {                  /* one layer (cpu_decoder.py `_Layer` mirrors it) */
    const float *attn_norm, *ffn_norm;
    dec_linear qkv, wo, w13, w2;  /* w13: N = 2F (gate rows, then up rows); w2: K = F */
    void *kv_rows;                /* the layer's cache as (num_rows, 2, nkv, hd') (rope_kv_cpu's kinds) */
    const float *kv_scale, *kv_zp;/* (2, nkv) static KV params, NULL for a 16-bit cache */
} dec_layer;

typedef struct {                  /* a step's arguments (cpu_decoder.py `_Args`) */
    const float *cos, *sin;       /* (T, hd) */
    const int64_t *slots;         /* (T,) cache rows of this step's tokens */
    const attn_step *st;          /* the attention's step (block tables, contexts, threads) */
    float *scratch;               /* decoder_cpu_scratch(...) floats */
    int T, D, nh, nkv, hd, F, terms, threads, lo, hi, kv_kind;
    float eps;
} dec_args;

/* Floats of scratch a step of T rows needs. */
long decoder_cpu_scratch(int T, int D, int nh, int nkv, int hd, int F) {
    return (long)T * (2L * D + (long)(2 * nh + 2 * nkv) * hd + 2L * F);
}

static int dec_linear_run(const dec_linear *L, const float *x, float *y, int T, int terms, int threads, int swiglu) {
    int rc = swiglu ? int4_cpu_swiglu_linear(x, L->w, L->ws, L->wm, y, T, L->N, L->K, L->group, terms, threads)
                    : int4_cpu_linear(x, L->w, L->ws, L->wm, y, T, L->N, L->K, L->group, terms, threads);
    if (rc == 0 && L->bias)
        for (int t = 0; t < T; t++)
            for (int n = 0; n < L->N; n++) y[(size_t)t * L->N + n] += L->bias[n];
    return rc;
}

/* Runs n layers over the step: res (T, D), the embeddings, updated in place (the residual stream); x (T, D): out,
 * the last layer's MLP output. Returns 0, or -1 when out of scratch memory. */
int decoder_cpu(const dec_args *a, const dec_layer *layers, int n, float *res, float *x) {
    int T = a->T, D = a->D, H = a->nh + 2 * a->nkv, hd = a->hd;
    float *h = a->scratch, *y = h + (size_t)T * D, *qkv = y + (size_t)T * D, *o = qkv + (size_t)T * H * hd,
          *gu = o + (size_t)T * a->nh * hd;
    for (int l = 0; l < n; l++) {
        const dec_layer *L = layers + l;
        rmsnorm_cpu(res, l ? x : NULL, L->attn_norm, h, T, D, a->eps);
        if (dec_linear_run(&L->qkv, h, qkv, T, a->terms, a->threads, 0)) return -1;
        rope_kv_cpu(qkv, a->cos, a->sin, T, a->nh, a->nkv, hd, L->kv_rows, a->slots, L->kv_scale, L->kv_zp, a->lo,
                    a->hi, a->kv_kind);
        attn_cpu_decode(qkv, (long)H * hd, L->kv_rows, L->kv_scale, L->kv_zp, o, a->st);
        if (dec_linear_run(&L->wo, o, y, T, a->terms, a->threads, 0)) return -1;
        rmsnorm_cpu(res, y, L->ffn_norm, h, T, D, a->eps);
        if (dec_linear_run(&L->w13, h, gu, T, a->terms, a->threads, 0)) return -1;
        if (dec_linear_run(&L->w2, gu, x, T, a->terms, a->threads, 1)) return -1;
    }
    return 0;
}
