/* Batch-invariant quantized mat-mul for the CPU: weights in the outer loop, up to four activation columns inside.

   ggml's reference mat-mul calls the weight type's vec_dot once per (weight row, column): every column pays again
   for unpacking the weight block, converting its fp16 scales and the loop around them, so decoding four sequences
   costs about four times one. These kernels unpack a weight block once and use it for up to four columns, and
   convert the activations' scales once per call instead of once per weight row. Each output element is still
   computed with the float operations of ggml's AVX2 vec_dot, in the same order (8-lane fma accumulation over the
   blocks, the same horizontal sum, for Q4_1 the same fused m*s sum, for Q4_K/Q6_K the same super-block sums), and the
   integer block dots are exact, so an element's bits depend neither on how many columns share the batch nor on
   how the rows are split between threads; on an AVX2 build of ggml they also equal ggml's own reference kernel
   (tests/test_row_matmul.py).

   The activations arrive already quantized by a ggml_cast to the weight type's vec_dot type (Q8_1 for Q4_1,
   Q8_0 for Q8_0, Q8_K for Q4_K/Q6_K): the cast is ggml's own per-row quantizer, the one its mat-mul uses. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PYR_QK 32
#define PYR_ROWS_PER_CHUNK 64
#define PYR_MAX_COLS 4
#define PYR_MAX_BLOCKS 2048  /* rows of up to 65536 weights; longer ones stay with ggml_mul_mat */

typedef struct { uint16_t d, m; uint8_t qs[PYR_QK / 2]; } pyr_block_q4_1;
typedef struct { uint16_t d; int8_t qs[PYR_QK]; } pyr_block_q8_0;
typedef struct { uint16_t d, s; int8_t qs[PYR_QK]; } pyr_block_q8_1;

#define PYR_QK_K 256
#define PYR_MAX_SUPER (PYR_MAX_BLOCKS * PYR_QK / PYR_QK_K)
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[PYR_QK_K / 2]; } pyr_block_q4_K;
typedef struct { float d; int8_t qs[PYR_QK_K]; int16_t bsums[PYR_QK_K / 16]; } pyr_block_q8_K;
typedef struct { uint8_t ql[PYR_QK_K / 2]; uint8_t qh[PYR_QK_K / 4]; int8_t scales[PYR_QK_K / 16]; uint16_t d; }
    pyr_block_q6_K;

#define PYR_TARGET __attribute__((target("avx2,fma,f16c")))
#define PYR_INLINE PYR_TARGET static inline __attribute__((always_inline))

PYR_INLINE float pyr_half(uint16_t h) {
    return _cvtsh_ss(h);  /* exact, as ggml's table lookup */
}

/* ggml's hsum_float_8: high half plus low half, then pairs, then the last two lanes. */
PYR_INLINE float pyr_hsum8(__m256 a) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

#define PYR_MAX_ROWS 2

/* One (row chunk, column tile) of a mat-mul: rows [r0, r1) of dst times the tile's nc columns (`cols`, their
   activation rows; `out`, their dst rows), with the op's scratch memory (zeroed once per call). */
typedef void (*pyr_tile_fn)(const struct ggml_tensor * dst, int64_t r0, int64_t r1, int nc, const char * const * cols,
                            float * const * out, float * scratch);

#define PYR_SCRATCH_FLOATS (2 * PYR_MAX_COLS * PYR_MAX_BLOCKS)  /* 64 KB; Python's row_matmul.usable bounds K */

/* The custom ops' driver: dst [M, N] f32 = src[0] [K, M] weights x src[1] [K, N] quantized activations. Thread ith
   takes an equal share of the weight rows (a multiple of 2 rows), in chunks of PYR_ROWS_PER_CHUNK rows whose
   weights stay in cache across the column tiles; no two threads write the same element, and no element's
   arithmetic depends on the split. */
PYR_TARGET static void pyr_drive(struct ggml_tensor * dst, int ith, int nth, pyr_tile_fn tile) {
    const struct ggml_tensor * x = dst->src[1];
    const int64_t m = dst->src[0]->ne[1], n = x->ne[1];
    const int64_t pairs = (m + 1) / 2;
    const int64_t first = 2 * (pairs * ith / nth);
    const int64_t last = ith + 1 == nth ? m : 2 * (pairs * (ith + 1) / nth);
    float scratch[PYR_SCRATCH_FLOATS] __attribute__((aligned(32)));
    const size_t used = sizeof(float) * 2 * PYR_MAX_COLS * (size_t) (dst->src[0]->ne[0] / PYR_QK);
    memset(scratch, 0, used < sizeof(scratch) ? used : sizeof(scratch));  /* e.g. the lanes of absent columns */
    for (int64_t r0 = first; r0 < last; r0 += PYR_ROWS_PER_CHUNK) {
        const int64_t r1 = r0 + PYR_ROWS_PER_CHUNK < last ? r0 + PYR_ROWS_PER_CHUNK : last;
        for (int64_t c0 = 0; c0 < n; c0 += PYR_MAX_COLS) {
            const int nc = (int) (n - c0 < PYR_MAX_COLS ? n - c0 : PYR_MAX_COLS);
            const char * cols[PYR_MAX_COLS];
            float * out[PYR_MAX_COLS];
            for (int c = 0; c < nc; ++c) {
                cols[c] = (const char *) x->data + (c0 + c) * x->nb[1];
                out[c] = (float *) ((char *) dst->data + (c0 + c) * dst->nb[1]);
            }
            tile(dst, r0, r1, nc, cols, out, scratch);
        }
    }
}

/* The Q4_1 / Q8_0 kernels, twice: for AVX2, and for AVX-VNNI, where one vpdpbusd gives the integer block sums
   that maddubs + madd give on AVX2. The sums are exact either way, so both variants give the same bits. */
#define PYR_QT PYR_TARGET
#define PYR_QI PYR_INLINE
#define PYR_Q(name) name
#define PYR_Q_VNNI 0
#include "row_matmul_q.h"
#undef PYR_QT
#undef PYR_QI
#undef PYR_Q
#undef PYR_Q_VNNI
#define PYR_QT __attribute__((target("avx2,fma,f16c,avxvnni")))
#define PYR_QI PYR_QT static inline __attribute__((always_inline))
#define PYR_Q(name) name##_vnni
#define PYR_Q_VNNI 1
#include "row_matmul_q.h"

/* Q4_K: the 6-bit scales and mins of a super-block, unpacked as ggml does (the first eight bytes scales, the
   last eight mins). */
PYR_INLINE void pyr_q4_K_scales(const uint8_t * packed, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, packed, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t mid = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = mid;
    u[0] &= 0x3f3f3f3f;
    memcpy(out, u, 16);
}

/* One Q4_K weight row times NC Q8_K columns, with the operations of ggml's AVX2 vec_dot_q4_K_q8_K in its order:
   per super-block the integer sums of the four 64-weight chunks (scaled by the sub-block scales), one 8-lane fma
   with d = y.d * x.d, and the mins term as one 4-lane fma with dmin = -y.d * x.dmin; the columns' pairwise sums of
   their bsums come precomputed (q8s), as ggml's _mm_hadd_epi16 of them. The weight's unpacking (scales, nibbles)
   is shared by the columns. */
PYR_INLINE void pyr_q4_K_row(const pyr_block_q4_K * x, int nb, const pyr_block_q8_K * const * y,
                             const __m128i * q8s, float * const * out, int64_t r, const int nc) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc[PYR_MAX_COLS];
    __m128 acc_m[PYR_MAX_COLS];
    for (int c = 0; c < nc; ++c) {
        acc[c] = _mm256_setzero_ps();
        acc_m[c] = _mm_setzero_ps();
    }
    for (int i = 0; i < nb; ++i) {
        const float xd = pyr_half(x[i].d), xdmin = pyr_half(x[i].dmin);
        uint8_t sm[16];
        pyr_q4_K_scales(x[i].scales, sm);
        const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *) (sm + 8)));
        __m256i sumi[PYR_MAX_COLS];
        for (int c = 0; c < nc; ++c) {
            const float dmin = -y[c][i].d * xdmin;
            const __m128i prod = _mm_madd_epi16(mins, q8s[i * PYR_MAX_COLS + c]);
            acc_m[c] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[c]);
            sumi[c] = _mm256_setzero_si256();
        }
        for (int j = 0; j < PYR_QK_K / 64; ++j) {
            const __m256i scale_l = _mm256_set1_epi16((short) sm[2 * j]);
            const __m256i scale_h = _mm256_set1_epi16((short) sm[2 * j + 1]);
            const __m256i q4bits = _mm256_loadu_si256((const __m256i *) (x[i].qs + 32 * j));
            const __m256i q4l = _mm256_and_si256(q4bits, m4);
            const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for (int c = 0; c < nc; ++c) {
                const int8_t * q8 = y[c][i].qs + 64 * j;
                const __m256i p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(
                    q4l, _mm256_loadu_si256((const __m256i *) q8)));
                const __m256i p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(
                    q4h, _mm256_loadu_si256((const __m256i *) (q8 + 32))));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p16l, p16h));
            }
        }
        for (int c = 0; c < nc; ++c) {
            const float d = y[c][i].d * xd;
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
        }
    }
    for (int c = 0; c < nc; ++c) {
        __m128 m = _mm_add_ps(acc_m[c], _mm_movehl_ps(acc_m[c], acc_m[c]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[c][r] = pyr_hsum8(acc[c]) + _mm_cvtss_f32(m);
    }
}

PYR_TARGET static void pyr_q4_K_rows(const char * w, size_t w_row, int64_t r0, int64_t r1, int nb,
                                     const pyr_block_q8_K * const * y, const __m128i * q8s, float * const * out,
                                     int nc) {
    for (int64_t r = r0; r < r1; ++r) {
        const pyr_block_q4_K * x = (const pyr_block_q4_K *) (w + r * w_row);
        switch (nc) {  /* each column count its own unrolled loop */
            case 1: pyr_q4_K_row(x, nb, y, q8s, out, r, 1); break;
            case 2: pyr_q4_K_row(x, nb, y, q8s, out, r, 2); break;
            case 3: pyr_q4_K_row(x, nb, y, q8s, out, r, 3); break;
            default: pyr_q4_K_row(x, nb, y, q8s, out, r, 4); break;
        }
    }
}

/* One Q6_K weight row times NC Q8_K columns, with the operations of ggml's AVX2 vec_dot_q6_K_q8_K in its order:
   per super-block, two 128-weight halves of 6-bit values (low nibbles plus two high bits), each 32-weight group's
   u8*s8 pair sums scaled by its two 16-weight scales (lanes 0-3 by the first, 4-7 by the second), less 32 times
   the scaled bsums (the -32 offset), then one 8-lane fma with d = y.d * x.d. The 6-bit values and the scale
   vectors are built once for the columns. */
PYR_INLINE void pyr_q6_K_row(const pyr_block_q6_K * x, int nb, const pyr_block_q8_K * const * y,
                             float * const * out, int64_t r, const int nc) {
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    __m256 acc[PYR_MAX_COLS];
    for (int c = 0; c < nc; ++c) {
        acc[c] = _mm256_setzero_ps();
    }
    for (int i = 0; i < nb; ++i) {
        const float xd = pyr_half(x[i].d);
        const __m256i scales_16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) x[i].scales));
        __m256i sumi[PYR_MAX_COLS];
        for (int c = 0; c < nc; ++c) {
            sumi[c] = _mm256_setzero_si256();
        }
        for (int j = 0; j < PYR_QK_K / 128; ++j) {
            const __m256i lo1 = _mm256_loadu_si256((const __m256i *) (x[i].ql + 64 * j));
            const __m256i lo2 = _mm256_loadu_si256((const __m256i *) (x[i].ql + 64 * j + 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i *) (x[i].qh + 32 * j));
            __m256i q6[4], sc[4];
            q6[0] = _mm256_or_si256(_mm256_and_si256(lo1, m15), _mm256_slli_epi16(_mm256_and_si256(hi, m3), 4));
            q6[1] = _mm256_or_si256(_mm256_and_si256(lo2, m15),
                                    _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(12)), 2));
            q6[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo1, 4), m15),
                                    _mm256_and_si256(hi, _mm256_set1_epi8(48)));
            q6[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo2, 4), m15),
                                    _mm256_srli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(-64)), 2));
            for (int k = 0; k < 4; ++k) {
                const int g = 2 * (4 * j + k);  /* the group's two 16-weight scales */
                sc[k] = _mm256_set_m128i(_mm_set1_epi16(x[i].scales[g + 1]), _mm_set1_epi16(x[i].scales[g]));
            }
            for (int c = 0; c < nc; ++c) {
                const int8_t * q8 = y[c][i].qs + 128 * j;
                __m256i p[4];
                for (int k = 0; k < 4; ++k) {
                    p[k] = _mm256_madd_epi16(sc[k], _mm256_maddubs_epi16(
                        q6[k], _mm256_loadu_si256((const __m256i *) (q8 + 32 * k))));
                }
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p[0], p[1]));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p[2], p[3]));
            }
        }
        for (int c = 0; c < nc; ++c) {
            const __m256i offset = _mm256_slli_epi32(
                _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *) y[c][i].bsums), scales_16), 5);
            const float d = y[c][i].d * xd;
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[c], offset)),
                                     acc[c]);
        }
    }
    for (int c = 0; c < nc; ++c) {
        out[c][r] = pyr_hsum8(acc[c]);
    }
}

PYR_TARGET static void pyr_q6_K_rows(const char * w, size_t w_row, int64_t r0, int64_t r1, int nb,
                                     const pyr_block_q8_K * const * y, float * const * out, int nc) {
    for (int64_t r = r0; r < r1; ++r) {
        const pyr_block_q6_K * x = (const pyr_block_q6_K *) (w + r * w_row);
        switch (nc) {
            case 1: pyr_q6_K_row(x, nb, y, out, r, 1); break;
            case 2: pyr_q6_K_row(x, nb, y, out, r, 2); break;
            case 3: pyr_q6_K_row(x, nb, y, out, r, 3); break;
            default: pyr_q6_K_row(x, nb, y, out, r, 4); break;
        }
    }
}

/* A K-quant tile (Q8_K activations); for Q4_K the columns' bsums summed in pairs first, as ggml's hadd does. */
PYR_TARGET static void pyr_tile_k(const struct ggml_tensor * dst, int64_t r0, int64_t r1, int nc,
                                  const char * const * cols, float * const * out, float * scratch) {
    const struct ggml_tensor * w = dst->src[0];
    const int nb = (int) (w->ne[0] / PYR_QK_K);
    const pyr_block_q8_K * const * y = (const pyr_block_q8_K * const *) cols;
    if (w->type == GGML_TYPE_Q6_K) {
        pyr_q6_K_rows((const char *) w->data, w->nb[1], r0, r1, nb, y, out, nc);
        return;
    }
    __m128i * q8s = (__m128i *) scratch;  /* PYR_MAX_COLS * PYR_MAX_SUPER of them: 16 KB */
    for (int c = 0; c < nc; ++c) {
        for (int i = 0; i < nb; ++i) {
            const __m256i bsums = _mm256_loadu_si256((const __m256i *) y[c][i].bsums);
            q8s[i * PYR_MAX_COLS + c] = _mm_hadd_epi16(_mm256_extracti128_si256(bsums, 0),
                                                       _mm256_extracti128_si256(bsums, 1));
        }
    }
    pyr_q4_K_rows((const char *) w->data, w->nb[1], r0, r1, nb, y, q8s, out, nc);
}

PYR_TARGET static void pyr_row_matmul_k(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    pyr_drive(dst, ith, nth, pyr_tile_k);
}

/* The longest weight row (in elements) the kernels take. */
int64_t pyrunner_row_matmul_max_k(void) {
    return (int64_t) PYR_MAX_BLOCKS * PYR_QK;
}

/* Whether this CPU runs these kernels, and for which weight types. */
int pyrunner_row_matmul_supports(enum ggml_type type) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
        return 0;
    }
    return type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K;
}

/* The type a weight type's activations are quantized to (ggml's vec_dot type for it). */
int pyrunner_row_matmul_vec_type(enum ggml_type type) {
    return type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K ? GGML_TYPE_Q8_K
         : type == GGML_TYPE_Q4_1 ? GGML_TYPE_Q8_1 : GGML_TYPE_Q8_0;
}

/* Whether this CPU has AVX-VNNI, for the Q4_1 / Q8_0 kernels' faster variant (the same bits). */
int pyrunner_row_matmul_has_vnni(void) {
    return __builtin_cpu_supports("avxvnni");
}

/* w [K, M] (2-D, contiguous, a supported type) x bq [K, N] (b already cast to the vec_dot type) -> [M, N] f32.
   Mat-muls of one input (q, k and v; gate and up) can share one cast of it. `vnni`: the Q4_1 / Q8_0 kernels'
   AVX-VNNI variant (only where pyrunner_row_matmul_has_vnni says so). */
struct ggml_tensor * pyrunner_row_matmul_q(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * bq,
                                           int vnni) {
    const int k_quant = w->type == GGML_TYPE_Q4_K || w->type == GGML_TYPE_Q6_K;
    struct ggml_tensor * args[2] = { w, bq };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], bq->ne[1], 1, 1, args, 2,
                          k_quant ? pyr_row_matmul_k : vnni ? pyr_row_matmul_vnni : pyr_row_matmul,
                          GGML_N_TASKS_MAX, NULL);
}
