"""cffi declarations for the ggml binding, emitted as C by CMake (API mode).

Run by CMakeLists.txt as `python ggml/_ffi_build.py --emit-c OUT.c`; the compiler then checks every declaration,
enum value and struct offset below against the real ggml headers. Values and layouts the compiler knows are written
as `...`. Grouped by the header each declaration comes from. The same declarations serve the fallback build
against the prebuilt libggml-python wheel (CMake option PYRUNNER_GGML_FROM_WHEEL), which compiles only this module.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MODULE_NAME = "ggml._ggml_api"
ROW_MATMUL_C = Path(__file__).resolve().parent / "row_matmul.c"
ROW_ATTENTION_C = Path(__file__).resolve().parent / "row_attention.c"
HOST_CACHE_C = Path(__file__).resolve().parent / "host_cache.c"
HOST_SAMPLE_C = Path(__file__).resolve().parent / "host_sample.c"

CDEF_GGML_H = """
// ---- ggml.h ----
#define GGML_MAX_DIMS ...
#define GGML_MAX_NAME ...
#define GGML_ROPE_TYPE_NEOX ...

enum ggml_type {
    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1,
    GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K,
    GGML_TYPE_Q6_K, GGML_TYPE_Q8_K, GGML_TYPE_IQ4_NL, GGML_TYPE_I8, GGML_TYPE_I16, GGML_TYPE_I32,
    GGML_TYPE_I64, GGML_TYPE_F64, GGML_TYPE_BF16, GGML_TYPE_COUNT, ...
};
enum ggml_prec { GGML_PREC_DEFAULT, GGML_PREC_F32, ... };
enum ggml_op_pool { GGML_OP_POOL_MAX, GGML_OP_POOL_AVG, ... };
enum ggml_sort_order { GGML_SORT_ORDER_ASC, GGML_SORT_ORDER_DESC, ... };
enum ggml_log_level {
    GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN,
    GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT, ...
};
enum ggml_status { GGML_STATUS_ALLOC_FAILED, GGML_STATUS_FAILED, GGML_STATUS_SUCCESS, GGML_STATUS_ABORTED, ... };

struct ggml_context;
struct ggml_cgraph;
struct ggml_backend_buffer;
struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
struct ggml_tensor {
    enum ggml_type type;
    struct ggml_backend_buffer * buffer;
    int64_t ne[...];
    size_t nb[...];
    struct ggml_tensor * view_src;
    void * data;
    char name[...];
    ...;
};

typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
void ggml_log_set(ggml_log_callback log_callback, void * user_data);
extern "Python" void _ggml_log_to_python(enum ggml_log_level, const char *, void *);

const char * ggml_version(void);
const char * ggml_commit(void);
const char * ggml_type_name(enum ggml_type type);
int64_t ggml_blck_size(enum ggml_type type);
size_t ggml_type_size(enum ggml_type type);
size_t ggml_row_size(enum ggml_type type, int64_t ne);
bool ggml_quantize_requires_imatrix(enum ggml_type type);
size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);

struct ggml_context * ggml_init(struct ggml_init_params params);
void ggml_free(struct ggml_context * ctx);
size_t ggml_tensor_overhead(void);
size_t ggml_graph_overhead_custom(size_t size, bool grads);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
bool ggml_is_contiguous(const struct ggml_tensor * tensor);
struct ggml_tensor * ggml_new_tensor(struct ggml_context * ctx, enum ggml_type type, int n_dims, const int64_t * ne);
struct ggml_tensor * ggml_set_name(struct ggml_tensor * tensor, const char * name);
void ggml_set_input(struct ggml_tensor * tensor);
void ggml_set_output(struct ggml_tensor * tensor);
struct ggml_tensor * ggml_get_first_tensor(const struct ggml_context * ctx);
struct ggml_tensor * ggml_get_next_tensor(const struct ggml_context * ctx, struct ggml_tensor * tensor);

struct ggml_cgraph * ggml_new_graph_custom(struct ggml_context * ctx, size_t size, bool grads);
void ggml_build_forward_expand(struct ggml_cgraph * cgraph, struct ggml_tensor * tensor);
int ggml_graph_n_nodes(struct ggml_cgraph * cgraph);

struct ggml_tensor * ggml_add(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_sub(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_mul(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_div(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_scale(struct ggml_context * ctx, struct ggml_tensor * a, float s);
struct ggml_tensor * ggml_neg(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_sqr(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_sqrt(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_exp(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_sin(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_cos(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_tanh(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_sigmoid(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_relu(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_silu(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_gelu(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_gelu_quick(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_swiglu_split(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_geglu_split(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_clamp(struct ggml_context * ctx, struct ggml_tensor * a, float min, float max);

struct ggml_tensor * ggml_mul_mat(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
bool ggml_prec_set_acc(struct ggml_tensor * a, enum ggml_prec prec);
struct ggml_tensor * ggml_mul_mat_id(struct ggml_context * ctx, struct ggml_tensor * as, struct ggml_tensor * b,
                                     struct ggml_tensor * ids);
struct ggml_tensor * ggml_rms_norm(struct ggml_context * ctx, struct ggml_tensor * a, float eps);
struct ggml_tensor * ggml_norm(struct ggml_context * ctx, struct ggml_tensor * a, float eps);
struct ggml_tensor * ggml_soft_max_ext(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * mask,
                                       float scale, float max_bias);
struct ggml_tensor * ggml_rope_ext(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b,
                                   struct ggml_tensor * c, int n_dims, int mode, int n_ctx_orig, float freq_base,
                                   float freq_scale, float ext_factor, float attn_factor, float beta_fast,
                                   float beta_slow);
struct ggml_tensor * ggml_flash_attn_ext(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                         struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                         float max_bias, float logit_softcap);

struct ggml_tensor * ggml_reshape_4d(struct ggml_context * ctx, struct ggml_tensor * a, int64_t ne0, int64_t ne1,
                                     int64_t ne2, int64_t ne3);
struct ggml_tensor * ggml_view_4d(struct ggml_context * ctx, struct ggml_tensor * a, int64_t ne0, int64_t ne1,
                                  int64_t ne2, int64_t ne3, size_t nb1, size_t nb2, size_t nb3, size_t offset);
struct ggml_tensor * ggml_permute(struct ggml_context * ctx, struct ggml_tensor * a, int axis0, int axis1,
                                  int axis2, int axis3);
struct ggml_tensor * ggml_cont(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_concat(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b, int dim);
struct ggml_tensor * ggml_get_rows(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_set_rows(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b,
                                   struct ggml_tensor * c);
struct ggml_tensor * ggml_cpy(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_cast(struct ggml_context * ctx, struct ggml_tensor * a, enum ggml_type type);
struct ggml_tensor * ggml_pad_ext(struct ggml_context * ctx, struct ggml_tensor * a, int lp0, int rp0, int lp1,
                                  int rp1, int lp2, int rp2, int lp3, int rp3);
struct ggml_tensor * ggml_repeat(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_sum_rows(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_mean(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_argmax(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_argsort(struct ggml_context * ctx, struct ggml_tensor * a, enum ggml_sort_order order);
struct ggml_tensor * ggml_top_k(struct ggml_context * ctx, struct ggml_tensor * a, int k);
struct ggml_tensor * ggml_arange(struct ggml_context * ctx, float start, float stop, float step);
struct ggml_tensor * ggml_im2col(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b, int s0,
                                 int s1, int p0, int p1, int d0, int d1, bool is_2D, enum ggml_type dst_type);
struct ggml_tensor * ggml_conv_2d(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b, int s0,
                                  int s1, int p0, int p1, int d0, int d1);
struct ggml_tensor * ggml_pool_2d(struct ggml_context * ctx, struct ggml_tensor * a, enum ggml_op_pool op, int k0,
                                  int k1, int s0, int s1, float p0, float p1);
"""

CDEF_GGML_BACKEND_H = """
// ---- ggml-backend.h / ggml-alloc.h ----
typedef struct ggml_backend_buffer_type * ggml_backend_buffer_type_t;
typedef struct ggml_backend_buffer * ggml_backend_buffer_t;
typedef struct ggml_backend * ggml_backend_t;
typedef struct ggml_backend_reg * ggml_backend_reg_t;
typedef struct ggml_backend_device * ggml_backend_dev_t;
typedef struct ggml_backend_sched * ggml_backend_sched_t;
typedef struct ggml_gallocr * ggml_gallocr_t;
typedef ggml_backend_buffer_type_t * (*ggml_backend_dev_get_extra_bufts_t)(ggml_backend_dev_t device);

enum ggml_backend_dev_type {
    GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU,
    GGML_BACKEND_DEVICE_TYPE_ACCEL, ...
};
enum ggml_backend_buffer_usage {
    GGML_BACKEND_BUFFER_USAGE_ANY, GGML_BACKEND_BUFFER_USAGE_WEIGHTS, GGML_BACKEND_BUFFER_USAGE_COMPUTE, ...
};

const char * ggml_backend_buft_name(ggml_backend_buffer_type_t buft);
ggml_backend_buffer_t ggml_backend_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size);
bool ggml_backend_buft_is_host(ggml_backend_buffer_type_t buft);
void * ggml_backend_buffer_get_base(ggml_backend_buffer_t buffer);
enum ggml_status ggml_backend_tensor_alloc(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, void * addr);
size_t ggml_backend_buft_get_alignment(ggml_backend_buffer_type_t buft);
ggml_backend_buffer_t ggml_backend_alloc_ctx_tensors_from_buft(struct ggml_context * ctx,
                                                               ggml_backend_buffer_type_t buft);
void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
size_t ggml_backend_buffer_get_size(ggml_backend_buffer_t buffer);
void ggml_backend_buffer_set_usage(ggml_backend_buffer_t buffer, enum ggml_backend_buffer_usage usage);
void ggml_backend_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value);
bool ggml_backend_buffer_is_host(ggml_backend_buffer_t buffer);
ggml_backend_buffer_type_t ggml_backend_buffer_get_type(ggml_backend_buffer_t buffer);
void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
void ggml_backend_tensor_memset(struct ggml_tensor * tensor, uint8_t value, size_t offset, size_t size);

const char * ggml_backend_name(ggml_backend_t backend);
void ggml_backend_free(ggml_backend_t backend);
ggml_backend_buffer_type_t ggml_backend_get_default_buffer_type(ggml_backend_t backend);
bool ggml_backend_supports_op(ggml_backend_t backend, const struct ggml_tensor * op);
enum ggml_status ggml_backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph * cgraph);

size_t ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(ggml_backend_dev_t device);
const char * ggml_backend_dev_description(ggml_backend_dev_t device);
enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
ggml_backend_t ggml_backend_dev_init(ggml_backend_dev_t device, const char * params);
ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device);
ggml_backend_dev_t ggml_backend_dev_by_type(enum ggml_backend_dev_type type);
ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device);
void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);

ggml_backend_sched_t ggml_backend_sched_new(ggml_backend_t * backends, ggml_backend_buffer_type_t * bufts,
                                            int n_backends, size_t graph_size, bool parallel, bool op_offload);
void ggml_backend_sched_free(ggml_backend_sched_t sched);
bool ggml_backend_sched_reserve(ggml_backend_sched_t sched, struct ggml_cgraph * measure_graph);
bool ggml_backend_sched_alloc_graph(ggml_backend_sched_t sched, struct ggml_cgraph * graph);
enum ggml_status ggml_backend_sched_graph_compute(ggml_backend_sched_t sched, struct ggml_cgraph * graph);
void ggml_backend_sched_reset(ggml_backend_sched_t sched);
int ggml_backend_sched_get_n_splits(ggml_backend_sched_t sched);
void ggml_backend_sched_set_tensor_backend(ggml_backend_sched_t sched, struct ggml_tensor * node,
                                           ggml_backend_t backend);

ggml_gallocr_t ggml_gallocr_new(ggml_backend_buffer_type_t buft);
void ggml_gallocr_free(ggml_gallocr_t galloc);
bool ggml_gallocr_alloc_graph(ggml_gallocr_t galloc, struct ggml_cgraph * graph);
"""

CDEF_GGML_CPU_H = """
// ---- ggml-cpu.h (and the thread pool types from ggml.h) ----
struct ggml_threadpool;
typedef struct ggml_threadpool * ggml_threadpool_t;
struct ggml_threadpool_params { int n_threads; uint32_t poll; ...; };
struct ggml_threadpool_params ggml_threadpool_params_default(int n_threads);
struct ggml_threadpool * ggml_threadpool_new(struct ggml_threadpool_params * params);
void ggml_threadpool_free(struct ggml_threadpool * threadpool);
ggml_backend_t ggml_backend_cpu_init(void);
void ggml_backend_cpu_set_n_threads(ggml_backend_t backend_cpu, int n_threads);
void ggml_backend_cpu_set_threadpool(ggml_backend_t backend_cpu, ggml_threadpool_t threadpool);
void ggml_backend_cpu_set_use_ref(ggml_backend_t backend_cpu, bool use_ref);
ggml_backend_buffer_t ggml_backend_cpu_buffer_from_ptr(void * ptr, size_t size);
int ggml_cpu_has_avx2(void);
int ggml_cpu_has_avx512(void);
"""

CDEF_RPC = """
// ---- ggml-rpc.h, through the small C helpers below (they compile to 'not available' without GGML_RPC, so the
// build against the prebuilt wheel needs nothing new from its ggml) ----
int pyrunner_rpc_available(void);
ggml_backend_t pyrunner_rpc_backend(const char * endpoint);
ggml_backend_buffer_type_t pyrunner_rpc_buffer_type(const char * endpoint);
void pyrunner_rpc_device_memory(const char * endpoint, size_t * free, size_t * total);
int pyrunner_rpc_serve(const char * endpoint, int n_threads, bool use_ref, size_t mem_bytes);
void pyrunner_install_abort_hook(void);
int pyrunner_rpc_failure(char * buf, size_t size);
"""

CDEF_ROW_MATMUL = """
// ---- ggml/row_matmul.c: batch-invariant quantized mat-mul, weights read once for up to four columns ----
int pyrunner_row_matmul_supports(enum ggml_type type);
int64_t pyrunner_row_matmul_max_k(void);
int pyrunner_row_matmul_vec_type(enum ggml_type type);
int pyrunner_row_matmul_has_vnni(void);
struct ggml_tensor * pyrunner_row_matmul_q(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * bq,
                                           int vnni);
"""

CDEF_ROW_ATTENTION = """
// ---- ggml/row_attention.c: batch-invariant attention over an F16 KV cache, visible cells only ----
int pyrunner_row_attention_supported(void);
struct ggml_tensor * pyrunner_row_attention(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                            float softcap);
"""

CDEF_HOST_CACHE = """
// ---- ggml/host_cache.c: the KV cache's decode-step eviction, placement and attention mask, on the host ----
int64_t pyrunner_evict_decode(int32_t * pos, bool * member, int64_t capacity, int64_t n_rows, int64_t * summary,
                              const int64_t * seqs, const int64_t * thresholds, int64_t n, int32_t * freed);
int pyrunner_place_decode(int32_t * pos, bool * member, int64_t capacity, int64_t * summary, const int64_t * seqs,
                          const int32_t * positions, int64_t n, int64_t max_holes, int store, int64_t * cells);
void pyrunner_attention_mask(const int32_t * cell_pos, const bool * member, int64_t capacity, int64_t start,
                             int64_t n_kv, const int64_t * rows, const int32_t * lo, const int32_t * hi,
                             int64_t n_tokens, int64_t n_rows, int f16, void * out);
"""

CDEF_HOST_SAMPLE = """
// ---- ggml/host_sample.c: the sampler's penalties and top-k in one pass over a row of logits ----
int64_t pyrunner_sample_top_k(const float * row, int64_t n, int64_t * history, int64_t n_history, float repeat,
                              float presence, float frequency, uint8_t * seen, int64_t * pen_ids, float * pen_vals,
                              int64_t k, int64_t * out_ids, float * out_vals);
"""

CDEF_TIME_BOX = """
// ---- a time box for one CPU graph compute (the thread governor's trials) ----
void pyrunner_cpu_time_box(ggml_backend_t backend_cpu, double * deadline, double seconds);
// ---- before a graph is allocated again: drop the scheduler's earlier placement of its nodes ----
void pyrunner_graph_forget_allocation(struct ggml_cgraph * graph);
"""

CDEF = (CDEF_GGML_H + CDEF_GGML_BACKEND_H + CDEF_GGML_CPU_H + CDEF_RPC + CDEF_ROW_MATMUL + CDEF_ROW_ATTENTION
        + CDEF_HOST_CACHE + CDEF_HOST_SAMPLE + CDEF_TIME_BOX)

C_SOURCE = """
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ggml's CPU backend asks its abort callback after every node (thread 0 only); this one says stop once the
   monotonic clock passes *deadline. The graph then ends with GGML_STATUS_ABORTED and its outputs are not valid. A
   time box of 0 seconds or less removes the callback (so the usual compute pays nothing). */
static double pyrunner_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

static bool pyrunner_past_deadline(void * data) {
    return pyrunner_monotonic() > *(const double *) data;
}

/* A context that computes again after adding nodes hands the scheduler a graph whose earlier nodes still carry
   the addresses of the last allocation. ggml's allocator takes a tensor with an address for one that owns its
   memory, so it would place the new nodes over them, or leave them pointing into a compute buffer it has since
   freed and replaced by a larger one. Every node the scheduler placed (an op's result, or a view of one) is reset
   here so the allocator places it anew; leaves (weights, inputs, cache tensors) and views of them keep theirs. */
void pyrunner_graph_forget_allocation(struct ggml_cgraph * graph) {
    const int n = ggml_graph_n_nodes(graph);
    for (int i = 0; i < n; ++i) {
        struct ggml_tensor * t = ggml_graph_node(graph, i);
        const struct ggml_tensor * owner = t->view_src != NULL ? t->view_src : t;
        if (owner->op != GGML_OP_NONE) {
            t->data = NULL;
            t->buffer = NULL;
        }
    }
}

void pyrunner_cpu_time_box(ggml_backend_t backend_cpu, double * deadline, double seconds) {
    if (seconds <= 0.0) {
        ggml_backend_cpu_set_abort_callback(backend_cpu, NULL, NULL);
        return;
    }
    *deadline = pyrunner_monotonic() + seconds;
    ggml_backend_cpu_set_abort_callback(backend_cpu, pyrunner_past_deadline, deadline);
}

#ifdef PYRUNNER_RPC
#include "ggml-rpc.h"
#include "ggml-backend-impl.h"

/* An abort inside ggml's RPC client (a remote host that died or never answered) would end the whole runner
   with abort(). The hook records the message and parks the thread that hit it instead, so Python can notice the
   failure (pyrunner_rpc_failure), end the requests with an error and report it in /health. Any other abort
   keeps ggml's behaviour. */
static char pyrunner_failure[2048];
static volatile int pyrunner_failed = 0;

static void pyrunner_abort_hook(const char * message) {
    fprintf(stderr, "%s\\n", message);
    fflush(stderr);
    if (strstr(message, "ggml-rpc") == NULL) {
        return;  /* ggml_abort goes on to abort() */
    }
    if (!pyrunner_failed) {
        snprintf(pyrunner_failure, sizeof(pyrunner_failure), "%s", message);
        __sync_synchronize();
        pyrunner_failed = 1;
    }
    for (;;) {
        pause();
    }
}

void pyrunner_install_abort_hook(void) {
    ggml_set_abort_callback(pyrunner_abort_hook);
}

int pyrunner_rpc_failure(char * buf, size_t size) {
    if (!pyrunner_failed) {
        return 0;
    }
    snprintf(buf, size, "%s", pyrunner_failure);
    return 1;
}

int pyrunner_rpc_available(void) { return 1; }
ggml_backend_t pyrunner_rpc_backend(const char * endpoint) { return ggml_backend_rpc_init(endpoint, 0); }
ggml_backend_buffer_type_t pyrunner_rpc_buffer_type(const char * endpoint) {
    return ggml_backend_rpc_buffer_type(endpoint, 0);
}
void pyrunner_rpc_device_memory(const char * endpoint, size_t * free, size_t * total) {
    ggml_backend_rpc_get_device_memory(endpoint, 0, free, total);
}

/* The server's one device: the CPU device, except that the backends it makes use the runner's kernel choice
   (ggml's reference kernels unless fast kernels were asked for, so a layer computes the same bits on either side
   of the wire) and it may report a memory cap. */
static struct ggml_backend_device pyrunner_server_dev;
static ggml_backend_dev_t pyrunner_server_cpu;
static bool pyrunner_server_use_ref;
static size_t pyrunner_server_mem;

static void pyrunner_server_memory(ggml_backend_dev_t dev, size_t * free, size_t * total) {
    (void) dev;
    pyrunner_server_cpu->iface.get_memory(pyrunner_server_cpu, free, total);
    if (pyrunner_server_mem > 0) {
        *total = pyrunner_server_mem;
        *free = *free < pyrunner_server_mem ? *free : pyrunner_server_mem;
    }
}

static ggml_backend_t pyrunner_server_init(ggml_backend_dev_t dev, const char * params) {
    ggml_backend_t backend = pyrunner_server_cpu->iface.init_backend(pyrunner_server_cpu, params);
    if (backend != NULL) {
        ggml_backend_cpu_set_use_ref(backend, pyrunner_server_use_ref);
        backend->device = dev;  /* so the memory the server reports to clients is this device's */
    }
    return backend;
}

int pyrunner_rpc_serve(const char * endpoint, int n_threads, bool use_ref, size_t mem_bytes) {
    pyrunner_server_cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (pyrunner_server_cpu == NULL) {
        return -1;
    }
    pyrunner_server_use_ref = use_ref;
    pyrunner_server_mem = mem_bytes;
    pyrunner_server_dev = *pyrunner_server_cpu;
    pyrunner_server_dev.iface.get_memory = pyrunner_server_memory;
    pyrunner_server_dev.iface.init_backend = pyrunner_server_init;
    ggml_backend_dev_t devices[1] = { &pyrunner_server_dev };
    ggml_backend_rpc_start_server(endpoint, NULL, (size_t) (n_threads > 0 ? n_threads : 1), 1, devices);
    return -2;  /* start_server only returns when it could not serve (bad endpoint, port in use, ...) */
}
#else
int pyrunner_rpc_available(void) { return 0; }
ggml_backend_t pyrunner_rpc_backend(const char * endpoint) { (void) endpoint; return NULL; }
ggml_backend_buffer_type_t pyrunner_rpc_buffer_type(const char * endpoint) { (void) endpoint; return NULL; }
void pyrunner_rpc_device_memory(const char * endpoint, size_t * free, size_t * total) {
    (void) endpoint; *free = 0; *total = 0;
}
int pyrunner_rpc_serve(const char * endpoint, int n_threads, bool use_ref, size_t mem_bytes) {
    (void) endpoint; (void) n_threads; (void) use_ref; (void) mem_bytes; return -1;
}
void pyrunner_install_abort_hook(void) {}
int pyrunner_rpc_failure(char * buf, size_t size) { (void) buf; (void) size; return 0; }
#endif
"""


def make_builder() -> Any:
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(MODULE_NAME, C_SOURCE + ROW_MATMUL_C.read_text() + ROW_ATTENTION_C.read_text()
                           + HOST_CACHE_C.read_text() + HOST_SAMPLE_C.read_text())
    return ffibuilder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emit-c", type=Path, help="write the C source of the extension module here")
    args = parser.parse_args(argv)
    if args.emit_c is None:
        parser.error("--emit-c is required")
    builder = make_builder()
    tmp = args.emit_c.with_suffix(".tmp.c")
    builder.emit_c_code(str(tmp))
    # Only touch the output when it changed, so a second build does not recompile.
    new = tmp.read_bytes()
    if not args.emit_c.exists() or args.emit_c.read_bytes() != new:
        args.emit_c.write_bytes(new)
    tmp.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
