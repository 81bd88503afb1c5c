/* Host-side loops of the KV cache's decode step (no ggml op: their results become a graph's input tensors): the
   sliding window's eviction and the placement of one token per sequence in the cell table, and the additive
   attention mask. Each replaces a dozen numpy calls, which on a decode step run right after a graph compute has
   flushed the interpreter's caches (a step's Python time is mostly such misses). The caller checks every index
   (ggml/host.py).

   Placement: each sequence of the step, in ascending id order, takes the lowest free cell above the last cell it
   holds that no earlier sequence of the step took (kvcache/cells.py: a sequence's cells stay in position order).
   `summary` is the table's CellSummary array: n_used, extent, then each sequence's last cell (-1: none). Eviction
   and placement give what the numpy versions give (kvcache/cells.py, kvcache/summary.py); the tests compare them.

   Mask: entry [t, c] (cell start + c) is +0 when the cell holds sequence rows[t] (member[rows[t] * capacity +
   cell]) and lo[t] <= cell_pos[cell] <= hi[t], else -inf; lo or hi NULL means no such bound. Rows n_tokens ..
   n_rows - 1 are all -inf. `f16`: IEEE half bit patterns (flash attention's mask), else float. */
#include <stdbool.h>
#include <stdint.h>

#define PYR_PLACE_MAX 64  /* tokens of one placement (ggml/host.py's PLACE_MAX) */

/* The sliding window's eviction on a decode step (kvcache/cells.py's evict_outside_window): sequence seqs[i] lets go
   of its cells at positions below thresholds[i]; a cell no sequence holds any more becomes empty and its index goes
   to freed (in the order found). The summary follows: n_used, the extent and the batch's sequences' last cells.
   Returns the number of cells freed. The caller checked: seqs distinct and in [0, n_rows), freed has room for
   every used cell. */
int64_t pyrunner_evict_decode(int32_t * pos, bool * member, int64_t capacity, int64_t n_rows, int64_t * summary,
                              const int64_t * seqs, const int64_t * thresholds, int64_t n, int32_t * freed) {
    int64_t extent = summary[1], n_freed = 0;
    int64_t * last = summary + 2;
    for (int64_t i = 0; i < n; ++i) {
        bool * held = member + seqs[i] * capacity;
        for (int64_t c = 0; c < extent; ++c) {
            if (!held[c] || pos[c] >= thresholds[i]) continue;
            held[c] = false;
            bool orphan = true;
            for (int64_t r = 0; r < n_rows; ++r) orphan &= !member[r * capacity + c];
            if (orphan) {
                pos[c] = -1;
                freed[n_freed++] = (int32_t) c;
            }
        }
        int64_t top = last[seqs[i]];
        while (top >= 0 && !held[top]) --top;
        last[seqs[i]] = top;
    }
    while (extent > 0 && pos[extent - 1] < 0) --extent;
    summary[0] -= n_freed;
    summary[1] = extent;
    return n_freed;
}

/* Returns 1 with cells[i] the cell of (seqs[i], positions[i]), with `store` also stored in pos, member and summary;
   0 with nothing changed when some sequence finds no free cell above its last one, or when max_holes (>= 0) or
   more empty cells would stay below the extent (a compaction helps both). The caller checked: 1 <= n <=
   PYR_PLACE_MAX, seqs distinct and in [0, rows of member), at least n cells free. */
int pyrunner_place_decode(int32_t * pos, bool * member, int64_t capacity, int64_t * summary, const int64_t * seqs,
                          const int32_t * positions, int64_t n, int64_t max_holes, int store, int64_t * cells) {
    int64_t * last = summary + 2;
    bool placed[PYR_PLACE_MAX] = { false };
    int64_t top = summary[1];
    for (int64_t k = 0; k < n; ++k) {
        int64_t j = -1;  /* the lowest sequence id not placed yet */
        for (int64_t i = 0; i < n; ++i) {
            if (!placed[i] && (j < 0 || seqs[i] < seqs[j])) j = i;
        }
        int64_t c = last[seqs[j]] + 1;
        for (;; ++c) {
            if (c >= capacity) return 0;
            if (pos[c] >= 0) continue;
            bool taken = false;
            for (int64_t i = 0; i < n; ++i) taken |= placed[i] && cells[i] == c;
            if (!taken) break;
        }
        cells[j] = c;
        placed[j] = true;
        if (c + 1 > top) top = c + 1;
    }
    if (max_holes >= 0 && top - summary[0] - n >= max_holes) return 0;
    if (!store) return 1;
    for (int64_t i = 0; i < n; ++i) {
        pos[cells[i]] = positions[i];
        member[seqs[i] * capacity + cells[i]] = true;
        if (cells[i] > last[seqs[i]]) last[seqs[i]] = cells[i];
    }
    summary[0] += n;
    summary[1] = top;
    return 1;
}

/* One row of the mask: visible (0 or 1) minus one is all ones where hidden, masked down to -inf's bits. Written
   without branches or aliasing so that the compiler vectorizes it (a 512-token prompt's mask has millions of
   entries). */
static void pyr_mask_row16(uint16_t * restrict out, const uint8_t * restrict held, const int32_t * restrict q,
                           int64_t n, int32_t lo, int32_t hi) {
    for (int64_t c = 0; c < n; ++c) {
        const uint16_t visible = (uint16_t) (held[c] & (q[c] >= lo) & (q[c] <= hi));
        out[c] = (uint16_t) ((visible - 1u) & 0xFC00u);
    }
}

static void pyr_mask_row32(uint32_t * restrict out, const uint8_t * restrict held, const int32_t * restrict q,
                           int64_t n, int32_t lo, int32_t hi) {
    for (int64_t c = 0; c < n; ++c) {
        const uint32_t visible = (uint32_t) (held[c] & (q[c] >= lo) & (q[c] <= hi));
        out[c] = (visible - 1u) & 0xFF800000u;
    }
}

void pyrunner_attention_mask(const int32_t * cell_pos, const bool * member, int64_t capacity, int64_t start,
                             int64_t n_kv, const int64_t * rows, const int32_t * lo, const int32_t * hi,
                             int64_t n_tokens, int64_t n_rows, int f16, void * out) {
    const int32_t * q = cell_pos + start;
    for (int64_t t = 0; t < n_rows; ++t) {
        uint16_t * o16 = (uint16_t *) out + t * n_kv;
        uint32_t * o32 = (uint32_t *) out + t * n_kv;
        if (t >= n_tokens) {  /* a padding row: nothing visible */
            for (int64_t c = 0; c < n_kv; ++c) {
                if (f16) o16[c] = 0xFC00u; else o32[c] = 0xFF800000u;
            }
            continue;
        }
        /* numpy's bool is one byte holding 0 or 1 */
        const uint8_t * held = (const uint8_t *) (member + rows[t] * capacity + start);
        const int32_t l = lo != NULL ? lo[t] : INT32_MIN;
        const int32_t h = hi != NULL ? hi[t] : INT32_MAX;
        if (f16) {
            pyr_mask_row16(o16, held, q, n_kv, l, h);
        } else {
            pyr_mask_row32(o32, held, q, n_kv, l, h);
        }
    }
}
