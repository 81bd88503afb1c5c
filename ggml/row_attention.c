/* Batch-invariant attention over an F16 KV cache for the CPU, as a ggml custom op.

   ggml's fused CPU attention visits every cell of the attended range for every (query row, head), skipping the
   masked ones one by one, and keeps its value sums in F16 (each cell's contribution is rounded to half precision
   as it is added). Here each (query row, head) is computed by one thread over the row's visible cells only: the
   row's mask is scanned once into a list of visible cells that its heads share, the score is an F32 dot product
   of the query with the cell's F16 key, and the online softmax and the value sums run in F32. A row's result
   depends only on its own query, its visible cells (in cell order) and their keys and values: not on the other
   rows of the batch, nor on the thread count.

   Inputs (ggml order): q [d, n_q, n_head] F32 (any strides), k [d, n_kv, n_head_kv] F16, v [dv, n_kv, n_head_kv]
   F16 (strided views of the cache), mask [n_kv, >= n_q] F16 (0 or -inf; other finite values are added to the
   score). Output [dv, n_head, n_q] F32, as ggml_flash_attn_ext gives it. Scale and softcap travel in the op's
   userdata (two floats' bits in one pointer-sized integer, so a kept graph needs nothing else to stay alive). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PYR_ATT_TARGET __attribute__((target("avx2,fma,f16c")))

#define PYR_ATT_BLOCK 8  /* visible cells scored together: eight independent dot products hide the fma latency */

/* e^x for 8 lanes: x = n ln2 + r (|r| <= ln2 / 2), a degree-6 polynomial for e^r (relative error ~2e-7), and n
   added to the exponent. x below -87 gives ~0 (the weight of a cell far below the running maximum). */
PYR_ATT_TARGET static inline __m256 pyr_att_exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The sums of eight vectors' lanes, as one vector (lane c: the sum of a[c]). */
PYR_ATT_TARGET static inline __m256 pyr_att_hsum8x8(const __m256 * a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Dot products of q (f32, d elements) with nc <= 8 keys (f16); lanes past nc are 0. */
PYR_ATT_TARGET static inline __m256 pyr_att_scores(const float * q, const uint16_t * const * k, int nc, int64_t d) {
    __m256 a[PYR_ATT_BLOCK];
    for (int c = 0; c < PYR_ATT_BLOCK; ++c) {
        a[c] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int c = 0; c < nc; ++c) {
            a[c] = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k[c] + i))), a[c]);
        }
    }
    float s[PYR_ATT_BLOCK];
    _mm256_storeu_ps(s, pyr_att_hsum8x8(a));
    for (; i < d; ++i) {  /* a head size that is no multiple of 8 */
        for (int c = 0; c < nc; ++c) {
            s[c] += q[i] * _cvtsh_ss(k[c][i]);
        }
    }
    return _mm256_loadu_ps(s);
}

PYR_ATT_TARGET static inline void pyr_att_scale(float * acc, int64_t dv, float c) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= dv; i += 8) {
        _mm256_storeu_ps(acc + i, _mm256_mul_ps(cv, _mm256_loadu_ps(acc + i)));
    }
    for (; i < dv; ++i) {
        acc[i] *= c;
    }
}

/* acc += sum over c < nc of p[c] * v[c] (f16 rows of dv), the cells in order. */
PYR_ATT_TARGET static inline void pyr_att_values(float * acc, const uint16_t * const * v, const float * p, int nc,
                                                int64_t dv) {
    int64_t i = 0;
    for (; i + 8 <= dv; i += 8) {
        __m256 x = _mm256_loadu_ps(acc + i);
        for (int c = 0; c < nc; ++c) {
            x = _mm256_fmadd_ps(_mm256_set1_ps(p[c]), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v[c] + i))), x);
        }
        _mm256_storeu_ps(acc + i, x);
    }
    for (; i < dv; ++i) {
        for (int c = 0; c < nc; ++c) {
            acc[i] += p[c] * _cvtsh_ss(v[c][i]);
        }
    }
}

PYR_ATT_TARGET static void pyr_row_attention(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * q = dst->src[0];
    const struct ggml_tensor * k = dst->src[1];
    const struct ggml_tensor * v = dst->src[2];
    const struct ggml_tensor * mask = dst->src[3];
    const uint64_t params = (uint64_t) (uintptr_t) userdata;
    float scale, softcap;
    const uint32_t scale_bits = (uint32_t) params, softcap_bits = (uint32_t) (params >> 32);
    memcpy(&scale, &scale_bits, sizeof(scale));
    memcpy(&softcap, &softcap_bits, sizeof(softcap));

    const int64_t d = q->ne[0], n_q = q->ne[1], n_head = q->ne[2];
    const int64_t n_kv = k->ne[1], n_head_kv = k->ne[2], dv = v->ne[0];
    const int64_t group = n_head / n_head_kv;
    const int64_t pairs = n_q * n_head;  /* (row, head), row-major: a thread's heads of one row are adjacent */
    const int64_t first = pairs * ith / nth, last = pairs * (ith + 1) / nth;
    if (first >= last) {
        return;
    }
    int32_t * visible = (int32_t *) malloc(sizeof(int32_t) * (size_t) (n_kv > 0 ? n_kv : 1));
    float * bias = (float *) malloc(sizeof(float) * (size_t) (n_kv > 0 ? n_kv : 1));
    float * qf = (float *) malloc(sizeof(float) * (size_t) (d + dv));
    if (visible == NULL || bias == NULL || qf == NULL) {
        free(visible); free(bias); free(qf);
        return;  /* leaves this thread's rows as they were; ggml gives custom ops no way to fail */
    }
    float * acc = qf + d;
    int64_t row_listed = -1, n_visible = 0;
    for (int64_t pair = first; pair < last; ++pair) {
        const int64_t r = pair / n_head, h = pair % n_head, hk = h / group;
        if (r != row_listed) {
            n_visible = 0;
            const uint16_t * m = (const uint16_t *) ((const char *) mask->data + r * mask->nb[1]);
            for (int64_t j = 0; j < n_kv; ++j) {
                const float mv = _cvtsh_ss(m[j]);
                if (mv != -INFINITY) {
                    visible[n_visible] = (int32_t) j;
                    bias[n_visible++] = mv;
                }
            }
            row_listed = r;
        }
        const char * qrow = (const char *) q->data + r * q->nb[1] + h * q->nb[2];
        for (int64_t i = 0; i < d; ++i) {
            qf[i] = *(const float *) (qrow + i * q->nb[0]);
        }
        memset(acc, 0, sizeof(float) * (size_t) dv);
        float mx = -INFINITY, sum = 0.0f;
        /* Blocks of up to 8 visible cells, in cell order: their scores, then one rescale of the running sums to
           the new maximum, then the block's weights and values. The blocks depend only on the row's own list. */
        for (int64_t t0 = 0; t0 < n_visible; t0 += PYR_ATT_BLOCK) {
            const int nc = (int) (n_visible - t0 < PYR_ATT_BLOCK ? n_visible - t0 : PYR_ATT_BLOCK);
            const uint16_t * kc[PYR_ATT_BLOCK];
            const uint16_t * vc[PYR_ATT_BLOCK];
            for (int c = 0; c < nc; ++c) {
                const int64_t j = visible[t0 + c];
                kc[c] = (const uint16_t *) ((const char *) k->data + j * k->nb[1] + hk * k->nb[2]);
                vc[c] = (const uint16_t *) ((const char *) v->data + j * v->nb[1] + hk * v->nb[2]);
            }
            float s[PYR_ATT_BLOCK];
            _mm256_storeu_ps(s, _mm256_mul_ps(pyr_att_scores(qf, kc, nc, d), _mm256_set1_ps(scale)));
            float bm = -INFINITY;
            for (int c = 0; c < nc; ++c) {
                if (softcap != 0.0f) {
                    s[c] = softcap * tanhf(s[c] / softcap);
                }
                s[c] += bias[t0 + c];
                bm = s[c] > bm ? s[c] : bm;
            }
            if (bm > mx) {
                const float c = expf(mx - bm);  /* 0 for the first block */
                pyr_att_scale(acc, dv, c);
                sum *= c;
                mx = bm;
            }
            float p[PYR_ATT_BLOCK];
            _mm256_storeu_ps(p, pyr_att_exp8(_mm256_sub_ps(_mm256_loadu_ps(s), _mm256_set1_ps(mx))));
            for (int c = 0; c < nc; ++c) {
                sum += p[c];
            }
            pyr_att_values(acc, vc, p, nc, dv);
        }
        float * out = (float *) ((char *) dst->data + h * dst->nb[1] + r * dst->nb[2]);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  /* a row with nothing visible (padding) gives zeros */
        for (int64_t i = 0; i < dv; ++i) {
            out[i] = acc[i] * inv;
        }
    }
    free(visible);
    free(bias);
    free(qf);
}

/* Whether this CPU runs the kernel. */
int pyrunner_row_attention_supported(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* q [d, n_q, n_head] F32, k [d, n_kv, n_head_kv] F16, v [dv, n_kv, n_head_kv] F16, mask [n_kv, >= n_q] F16
   -> [dv, n_head, n_q] F32 (the caller checked the shapes and types). */
struct ggml_tensor * pyrunner_row_attention(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                            float softcap) {
    uint32_t scale_bits, softcap_bits;
    memcpy(&scale_bits, &scale, sizeof(scale_bits));
    memcpy(&softcap_bits, &softcap, sizeof(softcap_bits));
    void * params = (void *) (uintptr_t) ((uint64_t) scale_bits | ((uint64_t) softcap_bits << 32));
    struct ggml_tensor * args[4] = { q, k, v, mask };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0], q->ne[2], q->ne[1], 1, args, 4, pyr_row_attention,
                          GGML_N_TASKS_MAX, params);
}
