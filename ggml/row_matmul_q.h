/* The Q4_1 / Q8_0 row kernels (see row_matmul.c), included twice by it: PYR_QT / PYR_QI are the target
   attributes of this variant's functions, PYR_Q(name) its function names, PYR_Q_VNNI whether its integer block
   sums use AVX-VNNI. No include guard, on purpose. */

/* Sums of four adjacent u8*s8 products as floats; exact (no pair can reach the int16 limit for these operands:
   Q4_1 nibbles are at most 15, and ggml's Q8 quantizer never writes -128). */
PYR_QI __m256 PYR_Q(pyr_dot_us8)(__m256i ux, __m256i sy) {
#if PYR_Q_VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ux, sy));
#else
    const __m256i pairs = _mm256_maddubs_epi16(ux, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* NR weight rows from r (Q4_1) times NC Q8_1 columns; NR*NC independent accumulators hide the fma latency. The
   columns' scales come pre-converted, four per block (yd/ys[block * 4 + c]): d0*d1 is a product of two broadcasts
   (each lane is the scalar product ggml broadcasts) and the m*s sums of the four columns run side by side, one
   fma per lane per block, as ggml's scalar fma. */
PYR_QI void PYR_Q(pyr_q4_1_tile)(const char * w, size_t w_row, int64_t r, int nb, const pyr_block_q8_1 * const * y,
                              const float * yd, const float * ys, float * const * out, const int nr, const int nc) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i shift = _mm256_set_epi64x(4, 4, 0, 0);  /* low half: low nibbles; high half: high nibbles */
    const pyr_block_q4_1 * x[PYR_MAX_ROWS];
    __m256 acc[PYR_MAX_ROWS][PYR_MAX_COLS];
    __m128 summs[PYR_MAX_ROWS];
    for (int i = 0; i < nr; ++i) {
        x[i] = (const pyr_block_q4_1 *) (w + (r + i) * w_row);
        summs[i] = _mm_setzero_ps();
        for (int c = 0; c < nc; ++c) {
            acc[i][c] = _mm256_setzero_ps();
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        const __m128 ysv = _mm_loadu_ps(ys + ib * 4);
        __m256 d0[PYR_MAX_ROWS];
        __m256i qx[PYR_MAX_ROWS];
        for (int i = 0; i < nr; ++i) {
            /* d and m converted together (one vcvtph2ps; the same exact values as two scalar conversions), and
               the nibbles unpacked from one 128-bit broadcast: fewer instructions per weight block, which is what
               a many-column tile is bound by */
            int32_t dm_bits;
            memcpy(&dm_bits, &x[i][ib].d, sizeof(dm_bits));
            const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
            d0[i] = _mm256_broadcastss_ps(dm);
            summs[i] = _mm_fmadd_ps(_mm_permute_ps(dm, 0x55), ysv, summs[i]);
            const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) x[i][ib].qs));
            qx[i] = _mm256_and_si256(_mm256_srlv_epi64(packed, shift), low);
        }
        for (int c = 0; c < nc; ++c) {
            const __m256 d1 = _mm256_broadcast_ss(yd + ib * 4 + c);
            const __m256i qy = _mm256_loadu_si256((const __m256i *) y[c][ib].qs);
            for (int i = 0; i < nr; ++i) {
                acc[i][c] = _mm256_fmadd_ps(_mm256_mul_ps(d0[i], d1), PYR_Q(pyr_dot_us8)(qx[i], qy), acc[i][c]);
            }
        }
    }
    for (int i = 0; i < nr; ++i) {
        float s[4];
        _mm_storeu_ps(s, summs[i]);
        for (int c = 0; c < nc; ++c) {
            out[c][r + i] = pyr_hsum8(acc[i][c]) + s[c];
        }
    }
}

/* NR weight rows from r (Q8_0) times NC Q8_0 columns (scales pre-converted as for Q4_1). */
PYR_QI void PYR_Q(pyr_q8_0_tile)(const char * w, size_t w_row, int64_t r, int nb, const pyr_block_q8_0 * const * y,
                              const float * yd, float * const * out, const int nr, const int nc) {
    const pyr_block_q8_0 * x[PYR_MAX_ROWS];
    __m256 acc[PYR_MAX_ROWS][PYR_MAX_COLS];
    for (int i = 0; i < nr; ++i) {
        x[i] = (const pyr_block_q8_0 *) (w + (r + i) * w_row);
        for (int c = 0; c < nc; ++c) {
            acc[i][c] = _mm256_setzero_ps();
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        __m256 d0[PYR_MAX_ROWS];
        __m256i qx[PYR_MAX_ROWS], ax[PYR_MAX_ROWS];
        for (int i = 0; i < nr; ++i) {
            d0[i] = _mm256_set1_ps(pyr_half(x[i][ib].d));
            qx[i] = _mm256_loadu_si256((const __m256i *) x[i][ib].qs);
            ax[i] = _mm256_sign_epi8(qx[i], qx[i]);
        }
        for (int c = 0; c < nc; ++c) {
            const __m256 d1 = _mm256_broadcast_ss(yd + ib * 4 + c);
            const __m256i qy = _mm256_loadu_si256((const __m256i *) y[c][ib].qs);
            for (int i = 0; i < nr; ++i) {
                acc[i][c] = _mm256_fmadd_ps(_mm256_mul_ps(d0[i], d1),
                                            PYR_Q(pyr_dot_us8)(ax[i], _mm256_sign_epi8(qy, qx[i])), acc[i][c]);
            }
        }
    }
    for (int i = 0; i < nr; ++i) {
        for (int c = 0; c < nc; ++c) {
            out[c][r + i] = pyr_hsum8(acc[i][c]);
        }
    }
}

/* Rows [r0, r1) times NC columns, NR rows at a time, then single rows. Q4_1 is compute-bound and gains from two
   rows sharing each column's loads; Q8_0 rows stream from memory, where two interleaved rows measured slower. */
#undef PYR_ROWS
#define PYR_ROWS(NAME, TILE, YT, NR, ...)                                                                         \
    PYR_QI void NAME(const char * w, size_t w_row, int64_t r0, int64_t r1, int nb, const YT * const * y,       \
                         const float * yd, const float * ys, float * const * out, const int nc) {                  \
        (void) ys;                                                                                                 \
        int64_t r = r0;                                                                                            \
        for (; r + (NR) <= r1; r += (NR)) TILE(w, w_row, r, nb, y, yd, __VA_ARGS__ out, NR, nc);                   \
        for (; r < r1; ++r) TILE(w, w_row, r, nb, y, yd, __VA_ARGS__ out, 1, nc);                                  \
    }
PYR_ROWS(PYR_Q(pyr_q4_1_rows), PYR_Q(pyr_q4_1_tile), pyr_block_q8_1, (nc == 1 ? 1 : 2), ys,)
PYR_ROWS(PYR_Q(pyr_q8_0_rows), PYR_Q(pyr_q8_0_tile), pyr_block_q8_0, 1)

/* One column tile (1..4 columns) over rows [r0, r1); the switch gives each column count its own unrolled loop. */
PYR_QT static void PYR_Q(pyr_tile)(enum ggml_type type, const char * w, size_t w_row, int64_t r0, int64_t r1, int nb,
                                const void * const * y, const float * yd, const float * ys, float * const * out,
                                int nc) {
    if (type == GGML_TYPE_Q4_1) {
        const pyr_block_q8_1 * const * yq = (const pyr_block_q8_1 * const *) y;
        switch (nc) {
            case 1: PYR_Q(pyr_q4_1_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 1); break;
            case 2: PYR_Q(pyr_q4_1_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 2); break;
            case 3: PYR_Q(pyr_q4_1_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 3); break;
            default: PYR_Q(pyr_q4_1_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 4); break;
        }
    } else {
        const pyr_block_q8_0 * const * yq = (const pyr_block_q8_0 * const *) y;
        switch (nc) {
            case 1: PYR_Q(pyr_q8_0_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 1); break;
            case 2: PYR_Q(pyr_q8_0_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 2); break;
            case 3: PYR_Q(pyr_q8_0_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 3); break;
            default: PYR_Q(pyr_q8_0_rows)(w, w_row, r0, r1, nb, yq, yd, ys, out, 4); break;
        }
    }
}

/* A Q4_1 / Q8_0 tile: the columns' scales converted once (four lanes per block), then the rows. */
PYR_QT static void PYR_Q(pyr_tile_q)(const struct ggml_tensor * dst, int64_t r0, int64_t r1, int nc,
                                  const char * const * cols, float * const * out, float * scratch) {
    const struct ggml_tensor * w = dst->src[0];
    const int nb = (int) (w->ne[0] / PYR_QK);
    const int is_q8_1 = dst->src[1]->type == GGML_TYPE_Q8_1;  /* Q8_1 activations: a Q4_1 weight */
    float * yd = scratch;
    float * ys = scratch + PYR_MAX_COLS * nb;
    for (int c = 0; c < nc; ++c) {
        for (int ib = 0; ib < nb; ++ib) {
            if (is_q8_1) {
                const pyr_block_q8_1 * b = (const pyr_block_q8_1 *) cols[c] + ib;
                yd[ib * PYR_MAX_COLS + c] = pyr_half(b->d);
                ys[ib * PYR_MAX_COLS + c] = pyr_half(b->s);
            } else {
                yd[ib * PYR_MAX_COLS + c] = pyr_half(((const pyr_block_q8_0 *) cols[c] + ib)->d);
            }
        }
    }
    PYR_Q(pyr_tile)(w->type, (const char *) w->data, w->nb[1], r0, r1, nb, (const void * const *) cols, yd, ys, out, nc);
}

PYR_QT static void PYR_Q(pyr_row_matmul)(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    pyr_drive(dst, ith, nth, PYR_Q(pyr_tile_q));
}

