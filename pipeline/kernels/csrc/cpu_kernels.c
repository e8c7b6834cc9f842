/* All our CPU kernels in one library (cpu_build.load("cpu_kernels")), so that they share one thread pool
 * (pool.h): a pool per library left two sets of workers spinning against each other on a small CPU. */
#include "linear_cpu.c"
#include "attn_cpu.c"

const char *cpu_kernels_isa(void) { return KERNEL_ISA; }

/* silu(gate) * up for gate_up (M, 2K) fp32 (K % VL == 0) into a (M, K); sigmoid from exp of -|g| (v_exp, ~1 ulp). */
static void swiglu_rows(const float *gu, int M, int K, float *a) {
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * K, *u = g + K;
        float *o = a + (size_t)m * K;
        for (int i = 0; i < K; i += VL) {
            vf x = v_load(g + i), nx = v_sub(v_zero(), x);
            vf s = PS(div)(v_set1(1.f), v_add(v_set1(1.f), v_exp(PS(min)(x, nx))));   /* sigmoid(|x|) */
#if defined(__AVX512F__) && defined(__AVX512BW__)
            s = _mm512_mask_sub_ps(s, _mm512_cmp_ps_mask(x, v_zero(), _CMP_LT_OQ), v_set1(1.f), s);
#else
            s = _mm256_blendv_ps(s, v_sub(v_set1(1.f), s), _mm256_cmp_ps(x, v_zero(), _CMP_LT_OQ));
#endif
            v_store(o + i, v_mul(v_mul(x, s), v_load(u + i)));
        }
    }
}

/* y (M, N) = (silu(gate) * up) @ W.T for gate_up (M, 2K): a SwiGLU MLP's down projection in one call. */
int int4_cpu_swiglu_linear(const float *gu, const uint8_t *w, const float *ws, const float *wm, float *y, int M, int N,
                           int K, int group, int terms, int threads) {
    float *a = (float *)malloc(sizeof(float) * (size_t)M * K);
    if (!a) return -1;
    swiglu_rows(gu, M, K, a);
    int rc = int4_cpu_linear(a, w, ws, wm, y, M, N, K, group, terms, threads);
    free(a);
    return rc;
}
#include "decoder_cpu.c"
