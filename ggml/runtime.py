"""Devices, backends, the persistent CPU thread pool and the graph scheduler, owned together.

Layer placement follows Ollama's flags (ggml/placement.py): `n_gpu_layers` counts from the last block; `n_layer + 1`
also offloads the output layer; `tensor_split` apportions offloaded layers between GPUs and remote (RPC) devices;
quantized CPU weights go to the CPU_REPACK buffer type (ggml's repacked layouts are the fast path for mat-vec on
AVX2/AVX-512).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

from ggml import rpc
from ggml._lib import CData, check, ffi, lib
from ggml.placement import main_first, place_layer
from ml.errors import ModelLoadError
from ggml._lib import CData, check, check_status, ffi, lib
from ggml.threads import ThreadGovernor

log = logging.getLogger(__name__)

GRAPH_SIZE = 8192  # nodes the scheduler is sized for; models with more pass max_nodes to new_context


@dataclass(frozen=True)
class RuntimeOptions:
    """What the runner's flags say about placement and threads."""

    threads: int = 2
    n_gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    flash_attention: bool = False
    fast_kernels: bool = False
    """ggml's fastest CPU kernels, whose results depend on the batch's shape: tiled and KV-split attention, tiled
    K-quant matmuls, fused ops, repacked Q4_K weights (GEMM for many rows, GEMV for few). Off (the default), the CPU
    runs kernels that compute each element the same way whatever the batch (ggml's per-row reference kernels, the
    row kernels of ggml/row_matmul.py, the repacked Q4_0/IQ4_NL ones), so a token's logits are bit-identical
    whatever else shares its batch:
    --parallel and the batch size never change a greedy or seeded text. Costs prefill speed, not decode
    (bench/generate.py, 2 threads: SmolLM2 Q4_1 -7% / -12% on 128 / 512-token prompts, Gemma 3 Q4_K_M -30% / -27%;
    a Q4_K GEMM runs at a third of the tiled kernel's speed)."""
    use_repack: bool = True
    """Keep matmul weights in ggml's repacked CPU layout (AVX2): Q4_0 and IQ4_NL always (their repacked kernels
    are batch-invariant), Q4_K too with fast_kernels."""
    row_matmul: bool = True
    """Without fast_kernels: run Q4_1/Q8_0/Q4_K/Q6_K mat-muls on the row kernels (ggml/row_matmul.py), which read each
    weight block once for up to four columns and compute every element as ggml's reference kernel does."""
    row_attention: bool = False
    """Without fast_kernels: fused attention over an F16 KV cache in host memory runs on ggml/row_attention.c (each
    query row and head over its visible cells only, F32 sums) instead of ggml's flash_attn_ext. Off by default (the
    runner: OLLAMA_PYRUNNER_ROW_ATTENTION=1): its more accurate sums flip a near tie in SmolLM2's greedy text against
    llama.cpp's. Ignored with rpc-servers, whose layers cannot run it."""
    rpc: tuple[str, ...] = ()
    """`host:port` of ggml rpc-servers: each is one more device for layer placement (see ggml/placement.py)."""
    adaptive_threads: bool = True
    """Let a ThreadGovernor run repeated graphs with fewer threads while that is faster (another process taking a
    core); `threads` stays the most it uses. Results do not depend on it."""


@dataclass
class _Device:
    name: str
    description: str
    handle: CData = field(repr=False)
    backend: CData = field(repr=False)
    buft: CData = field(repr=False)


def _free_runtime(sched: CData, backends: list[CData], threadpool: CData) -> None:
    if rpc.failed():
        return  # freeing would wait on the parked connection thread of a dead RPC host: leave it to the exit
    if sched is not None:
        lib.ggml_backend_sched_free(sched)
    for b in backends:
        lib.ggml_backend_free(b)
    if threadpool is not None:
        lib.ggml_threadpool_free(threadpool)


class Runtime:
    """The CPU backend (with a persistent thread pool), any GPU and RPC backends, and one scheduler over all."""

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        self.options = opts = options or RuntimeOptions()
        self.n_layer = 0  # set by the backend that loads a model; places layers and the output layer
        # The token of the context whose graph the scheduler allocated last: only that graph may run again
        # without a new allocation (GgmlContext.recompute). None when no graph's allocation is known valid.
        self.sched_user: object | None = None
        self.compute_seconds = 0.0  # time spent inside ggml's graph compute (the benches subtract it)
        self.compute_thread_seconds = 0.0  # CPU time of the calling thread in there (robust to a busy machine)
        self.cpu_backend = check(lib.ggml_backend_cpu_init(), "ggml_backend_cpu_init")
        params = lib.ggml_threadpool_params_default(max(1, opts.threads))
        self._threadpool = check(lib.ggml_threadpool_new(ffi.new("struct ggml_threadpool_params *", params)),
                                 "ggml_threadpool_new", f"n_threads={opts.threads}")
        lib.ggml_backend_cpu_set_threadpool(self.cpu_backend, self._threadpool)
        lib.ggml_backend_cpu_set_n_threads(self.cpu_backend, max(1, opts.threads))
        lib.ggml_backend_cpu_set_use_ref(self.cpu_backend, not opts.fast_kernels)
        self.cpu_buft = lib.ggml_backend_get_default_buffer_type(self.cpu_backend)
        self.row_matmul = opts.row_matmul and not opts.fast_kernels
        # Not with rpc-servers: their layers cannot run a custom op, and a split run computes a single process's bits
        self.row_attention = (opts.row_attention and not opts.fast_kernels and not opts.rpc
                              and bool(lib.pyrunner_row_attention_supported()))
        # ggml's repack set_tensor dereferences the layout it picked, which exists for these types only with AVX2.
        use_repack = opts.use_repack and bool(lib.ggml_cpu_has_avx2())
        self.repack_buft = self._find_repack_buft() if use_repack else None
        self._repackable = _REPACKABLE if opts.fast_kernels else _REPACKABLE_INVARIANT
        self.gpus = self._init_gpus()
        self._log_ignored()
        self._failure: str | None = None
        self.remotes = self._init_remotes()
        self.devices = self.gpus + self.remotes  # the device indexes of placement: local GPUs, then remotes
        backends = [d.backend for d in self.devices] + [self.cpu_backend]
        arr = ffi.new("ggml_backend_t[]", backends)
        self._sched = check(lib.ggml_backend_sched_new(arr, ffi.NULL, len(backends), GRAPH_SIZE, False, True),
                            "ggml_backend_sched_new", f"{len(backends)} backends")
        self._finalizer = weakref.finalize(self, _free_runtime, self._sched, backends, self._threadpool)
        self._threads_now = max(1, opts.threads)
        self._deadline = ffi.new("double *")  # the time box's deadline, read by the C abort callback
        self.governor = (ThreadGovernor(self._threads_now)
                         if opts.adaptive_threads and self._threads_now > 1 and not self.gpus else None)

    def run_graph(self, graph: CData, repeat_of: object | None = None) -> None:
        """Compute an allocated graph. `repeat_of` names it when it ran before (its timing then compares with
        the last runs', and the thread governor may try another thread count on it)."""
        gov = self.governor
        n = gov.threads(repeat_of) if gov is not None else self._threads_now
        budget = gov.budget(n) if gov is not None else None
        if budget is not None:
            if self._compute(n, graph, repeat_of, budget):
                return
            assert gov is not None
            n = gov.threads(repeat_of)  # the trial lost (its observation ended it): the current count redoes it
        self._compute(n, graph, repeat_of, None)

    def _compute(self, n: int, graph: CData, repeat_of: object | None, budget: float | None) -> bool:
        """Compute `graph` with `n` threads, stopped after `budget` seconds when given; whether it finished (a
        stopped graph's outputs are not valid, so it must be computed again)."""
        if n != self._threads_now:
            self._set_threads(n)
        if budget is not None:
            lib.pyrunner_cpu_time_box(self.cpu_backend, self._deadline, budget)
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            status = lib.ggml_backend_sched_graph_compute(self._sched, graph)
        finally:
            if budget is not None:
                lib.pyrunner_cpu_time_box(self.cpu_backend, self._deadline, 0.0)
        seconds = time.perf_counter() - started
        cpu_seconds = time.thread_time() - cpu_started
        self.compute_seconds += seconds
        self.compute_thread_seconds += cpu_seconds
        aborted = budget is not None and status == lib.GGML_STATUS_ABORTED
        if not aborted:
            check_status(status, "ggml_backend_sched_graph_compute")
        if self.governor is not None:
            self.governor.observe(repeat_of, n, seconds, finished=not aborted, cpu=cpu_seconds)
        return not aborted

    def _set_threads(self, n: int) -> None:
        # One thread runs without the pool: its idle workers would otherwise wake and spin at every graph.
        # ggml pauses the pool when it is detached and resumes it at the next graph that uses it.
        lib.ggml_backend_cpu_set_threadpool(self.cpu_backend, self._threadpool if n > 1 else ffi.NULL)
        lib.ggml_backend_cpu_set_n_threads(self.cpu_backend, n)
        self._threads_now = n

    @property
    def threads_now(self) -> int:
        """Threads the last graph ran with."""
        return self._threads_now

    def _find_repack_buft(self) -> CData | None:
        dev = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
        if dev == ffi.NULL:
            return None
        reg = lib.ggml_backend_dev_backend_reg(dev)
        fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if fn == ffi.NULL:
            return None
        bufts = ffi.cast("ggml_backend_dev_get_extra_bufts_t", fn)(dev)
        i = 0
        while bufts != ffi.NULL and bufts[i] != ffi.NULL:
            if ffi.string(lib.ggml_backend_buft_name(bufts[i])) == b"CPU_REPACK":
                return bufts[i]
            i += 1
        return None

    def _init_gpus(self) -> list[_Device]:
        gpus: list[_Device] = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            if lib.ggml_backend_dev_type(dev) != lib.GGML_BACKEND_DEVICE_TYPE_GPU:
                continue
            name = ffi.string(lib.ggml_backend_dev_name(dev)).decode()
            backend = check(lib.ggml_backend_dev_init(dev, ffi.NULL), "ggml_backend_dev_init", name)
            gpus.append(_Device(name, ffi.string(lib.ggml_backend_dev_description(dev)).decode(), dev, backend,
                                lib.ggml_backend_dev_buffer_type(dev)))
        # The main GPU first: the scheduler prefers it and it takes the first share of the offloaded layers.
        order = main_first([str(i) for i in range(len(gpus))], self.options.main_gpu)
        return [gpus[int(i)] for i in order]

    def _init_remotes(self) -> list[_Device]:
        """One device per RPC endpoint, each probed first: ggml's own connect aborts the process on failure."""
        remotes: list[_Device] = []
        if not self.options.rpc:
            return remotes
        if not rpc.available():
            raise ModelLoadError("--rpc needs ggml's RPC backend, which this build lacks (GGML_RPC=OFF)")
        for endpoint in self.options.rpc:
            try:
                rpc.probe(endpoint)
            except rpc.RpcError as e:
                raise ModelLoadError(str(e)) from None
        rpc.install_abort_hook()
        for endpoint in self.options.rpc:
            backend = check(lib.pyrunner_rpc_backend(endpoint.encode()), "ggml_backend_rpc_init", endpoint)
            buft = check(lib.pyrunner_rpc_buffer_type(endpoint.encode()), "ggml_backend_rpc_buffer_type", endpoint)
            remotes.append(_Device(f"RPC[{endpoint}]", endpoint, ffi.NULL, backend, buft))
        log.info("RPC devices: %s", ", ".join(self.options.rpc))
        return remotes

    def _log_ignored(self) -> None:
        opts = self.options
        if not self.gpus and not self.options.rpc:
            ignored = [f"{k}={v}" for k, v in (("n_gpu_layers", opts.n_gpu_layers), ("main_gpu", opts.main_gpu),
                                                ("tensor_split", opts.tensor_split)) if v]
            if ignored:
                log.info("no GPU device in this build or machine; ignoring %s", ", ".join(ignored))
        elif self.gpus:
            log.info("GPUs: %s", ", ".join(f"{g.name} ({g.description})" for g in self.gpus))

    @property
    def sched(self) -> CData:
        return self._sched

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def device_of_layer(self, il: int, n_layer: int) -> int:
        """Index in `devices` for block `il` (il == n_layer means the output layer), or -1 for the CPU."""
        return place_layer(il, n_layer, n_gpus=len(self.gpus), n_remotes=len(self.remotes),
                           n_gpu_layers=self.options.n_gpu_layers, tensor_split=self.options.tensor_split)

    def failure(self) -> str | None:
        """Why a remote device can no longer be used (its host died or stopped answering), if one has failed."""
        if not self.remotes:
            return None
        if self._failure is None:
            reason = rpc.failure()
            if reason is None:
                return None
            # ggml's message does not say which host; the ones that no longer accept a connection do.
            dead = [d.description for d in self.remotes if not rpc.accepts(d.description)]
            where = f"RPC endpoint {', '.join(dead)} is gone" if dead else "an RPC endpoint failed"
            self._failure = f"{where}: {reason}"
        return self._failure

    def weight_buft(self, device: int, dtype_id: int, shape: tuple[int, ...], for_matmul: bool) -> CData:
        """Buffer type for a weight: the GPU's, else CPU_REPACK for quantized matmul weights, else plain CPU.

        Repacked tensors can only feed mul_mat and cannot be read back, so embeddings (get_rows) stay plain.
        """
        if device >= 0:
            return self.devices[device].buft
        if (for_matmul and len(shape) == 2 and self.repack_buft is not None and dtype_id in self._repackable
                and shape[1] % 8 == 0):
            return self.repack_buft
        return self.cpu_buft

    def layer_buft(self, device: int) -> CData:
        """Buffer type for non-weight persistent tensors (KV cache) of a layer on `device`."""
        return self.devices[device].buft if device >= 0 else self.cpu_buft

    def close(self) -> None:
        self._finalizer()


# Types ggml 0.25's CPU repack lays out on x86 with AVX2 (ggml-cpu/repack.cpp), when ne[1] % 8 == 0:
# Q4_0, Q4_K, IQ4_NL. (Q8_0/Q5_K/Q6_K repack only on ARM; Q2_K needs AVX-512.)
_REPACKABLE = frozenset({2, 12, 20})
# Those whose repacked GEMV (few columns) and GEMM (4-column tiles) compute every element with the same operations:
# Q4_0 and IQ4_NL, bit for bit over every batch size and thread count (tests/test_repack_invariance.py). Q4_K's
# GEMV and GEMM differ in the last bits, so under batch invariance it stays in the plain layout.
_REPACKABLE_INVARIANT = frozenset({2, 20})
