/* The sampler's pass over a row of logits, for a request with a top-k (runner/sampling.py): the repetition
   penalties of the seen tokens and the k best tokens of the penalised row, in one pass and without copying the
   row. In numpy this took a maximum pass, a copy of the row, a dozen small-array calls for the penalties and a
   selection: ~450 µs per token right after a graph compute, for a 49k vocabulary.

   The penalties are runner/sampling.py's `apply_penalties` to the bit: float32 operations in its order (the
   module is built without FMA contraction, so each operation rounds to float32), and when any penalised value is
   not finite, all of them again in double, clipped to the finite float32 range. The selection is `top_k_sorted`:
   the k largest values, ties to the lowest id, ordered by value down and id up. */
#pragma GCC optimize("fp-contract=off")  /* each float operation rounds on its own, as numpy's do */
#pragma STDC FP_CONTRACT OFF
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PYR_SAMPLE_MAX_K 256

static int pyr_cmp_i64(const void * a, const void * b) {
    const int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
    return (x > y) - (x < y);
}

/* Whether (v, i) goes before (w, j): larger value first, then lower id. */
static int pyr_before(float v, int64_t i, float w, int64_t j) {
    return v > w || (v == w && i < j);
}

/* Inserts (v, i) into the k best so far (ids/vals sorted, *m of them). */
static void pyr_offer(float v, int64_t i, int64_t k, int64_t * ids, float * vals, int64_t * m) {
    if (*m == k && !pyr_before(v, i, vals[k - 1], ids[k - 1])) {
        return;
    }
    int64_t at = *m < k ? (*m)++ : k - 1;
    while (at > 0 && pyr_before(v, i, vals[at - 1], ids[at - 1])) {
        vals[at] = vals[at - 1];
        ids[at] = ids[at - 1];
        --at;
    }
    vals[at] = v;
    ids[at] = i;
}

/* Logits [i0, n) of the scan below, one at a time: 0, or -1 at a NaN or +inf. */
static int64_t pyr_scan(const float * row, int64_t i0, int64_t n, const uint8_t * seen, int64_t k, int64_t * ids,
                        float * vals, int64_t * m) {
    for (int64_t i = i0; i < n; ++i) {
        const float v = row[i];
        if (v != v || v == INFINITY) return -1;
        /* ids only grow during the scan, so a value equal to the k-th best never goes before it */
        if ((*m < k || v > vals[k - 1]) && !seen[i]) {
            pyr_offer(v, i, k, ids, vals, m);
        }
    }
    return 0;
}

/* The unchanged tokens' pass, eight at a time: one compare against the current k-th best value per eight logits
   (most fail it), and the NaN / +inf test folded into the same loads. */
__attribute__((target("avx2"))) static int64_t pyr_scan_avx2(const float * row, int64_t n, const uint8_t * seen,
                                                              int64_t k, int64_t * ids, float * vals, int64_t * m) {
    __m256 bad = _mm256_setzero_ps();
    const __m256 inf = _mm256_set1_ps(INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(v, inf, _CMP_EQ_OQ)));
        int bits = *m < k ? 0xFF : _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
        while (bits) {
            const int lane = __builtin_ctz((unsigned) bits);
            bits &= bits - 1;
            const float x = row[i + lane];
            if ((*m < k || x > vals[k - 1]) && !seen[i + lane]) {
                pyr_offer(x, i + lane, k, ids, vals, m);
            }
        }
    }
    if (_mm256_movemask_ps(bad)) {
        return -1;
    }
    return pyr_scan(row, i, n, seen, k, ids, vals, m);
}

/* Returns the number of tokens written to out_ids / out_vals (min(k, n)); -1 when the row holds a NaN or +inf
   (the caller's general path handles both). `history`: the seen token ids, repeats counted
   (overwritten); `seen`: n zero bytes of scratch, zero again on return; `pen_ids` / `pen_vals`: room for
   n_history entries. The caller checked 1 <= k <= PYR_SAMPLE_MAX_K and the buffers' sizes. */
int64_t pyrunner_sample_top_k(const float * row, int64_t n, int64_t * history, int64_t n_history, float repeat,
                              float presence, float frequency, uint8_t * seen, int64_t * pen_ids, float * pen_vals,
                              int64_t k, int64_t * out_ids, float * out_vals) {
    /* the penalties: distinct seen ids in the vocabulary, ascending; their counts go to history's front (a group
       of equal ids is read before its count is written, at an index no greater than the group's first) */
    qsort(history, (size_t) n_history, sizeof(int64_t), pyr_cmp_i64);
    int64_t n_pen = 0;
    for (int64_t h = 0; h < n_history;) {
        const int64_t id = history[h];
        int64_t count = 0;
        while (h < n_history && history[h] == id) {
            ++count;
            ++h;
        }
        if (id >= 0 && id < n) {
            pen_ids[n_pen] = id;
            history[n_pen++] = count;
        }
    }
    int all_finite = 1;
    for (int64_t p = 0; p < n_pen; ++p) {
        const float v = row[pen_ids[p]];
        float out = v <= 0.0f ? v * repeat : v / repeat;
        if (frequency != 0.0f || presence != 0.0f) {
            const float scaled = (float) history[p] * frequency;
            const float total = scaled + presence;
            out = out - total;
        }
        all_finite &= isfinite(out) != 0;
        pen_vals[p] = out;
    }
    for (int64_t p = 0; p < n_pen && !all_finite; ++p) {  /* overflow: all again in double, as the numpy code */
        const float v = row[pen_ids[p]];
        if (isfinite(v)) {
            double w = (double) v;
            w = w <= 0.0 ? w * (double) repeat : w / (double) repeat;
            w = w - ((double) history[p] * (double) frequency + (double) presence);
            pen_vals[p] = (float) (w > FLT_MAX ? FLT_MAX : w < -FLT_MAX ? -FLT_MAX : w);
        } else {
            pen_vals[p] = v;
        }
    }
    /* the k best: the unchanged tokens from the row, the penalised ones from their new values */
    for (int64_t p = 0; p < n_pen; ++p) {
        seen[pen_ids[p]] = 1;
    }
    int64_t m = 0;
    const int64_t status = __builtin_cpu_supports("avx2") ? pyr_scan_avx2(row, n, seen, k, out_ids, out_vals, &m)
                                                          : pyr_scan(row, 0, n, seen, k, out_ids, out_vals, &m);
    for (int64_t p = 0; p < n_pen; ++p) {
        seen[pen_ids[p]] = 0;
        if (status == 0) {
            pyr_offer(pen_vals[p], pen_ids[p], k, out_ids, out_vals, &m);
        }
    }
    return status != 0 ? status : m;
}
