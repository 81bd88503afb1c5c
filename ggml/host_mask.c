/* The KV cache's additive attention mask, filled on the host in one pass (no ggml op: the cache hands the result
   to a graph as an input tensor).

   numpy needs a gather of the membership rows, two broadcast comparisons, a negation and a multiply, each a call
   into numpy with its own allocation; on a decode step they run right after a graph compute has flushed the
   interpreter's caches, and cost ~50 µs for a 256-cell row. This loop writes each entry once.

   Entry [t, c] (cell start + c) is +0 when the cell holds sequence rows[t] (member[rows[t] * capacity + cell]) and
   lo[t] <= cell_pos[cell] <= hi[t], else -inf; lo or hi NULL means no such bound. Rows n_tokens .. n_rows - 1 are
   all -inf. `f16`: IEEE half bit patterns (flash attention's mask), else float. The caller checks every index
   (kvcache/masks.py, through ggml/host.py). */
#include <stdbool.h>
#include <stdint.h>

void pyrunner_attention_mask(const int32_t * cell_pos, const bool * member, int64_t capacity, int64_t start,
                             int64_t n_kv, const int64_t * rows, const int32_t * lo, const int32_t * hi,
                             int64_t n_tokens, int64_t n_rows, int f16, void * out) {
    const uint32_t hidden32 = 0xFF800000u;  /* -inf */
    const uint16_t hidden16 = 0xFC00u;
    const int32_t * q = cell_pos + start;
    for (int64_t t = 0; t < n_rows; ++t) {
        uint16_t * o16 = (uint16_t *) out + t * n_kv;
        uint32_t * o32 = (uint32_t *) out + t * n_kv;
        if (t >= n_tokens) {
            for (int64_t c = 0; c < n_kv; ++c) {
                if (f16) o16[c] = hidden16; else o32[c] = hidden32;
            }
            continue;
        }
        const bool * m = member + rows[t] * capacity + start;
        const int32_t l = lo != NULL ? lo[t] : INT32_MIN;
        const int32_t h = hi != NULL ? hi[t] : INT32_MAX;
        /* branch-free selects: the compiler vectorizes these loops */
        if (f16) {
            for (int64_t c = 0; c < n_kv; ++c) {
                const bool visible = m[c] & (q[c] >= l) & (q[c] <= h);
                o16[c] = visible ? 0 : hidden16;
            }
        } else {
            for (int64_t c = 0; c < n_kv; ++c) {
                const bool visible = m[c] & (q[c] >= l) & (q[c] <= h);
                o32[c] = visible ? 0 : hidden32;
            }
        }
    }
}
