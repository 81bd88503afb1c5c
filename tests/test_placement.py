"""Layer placement (ggml/placement.py) on fake device lists: --n-gpu-layers, --main-gpu, --tensor-split and RPC
devices, without a GPU or a remote host. Expected layouts are worked out by hand from the rule in the module
docstring (offloaded layers counted from the end, cut into contiguous shares)."""
from __future__ import annotations

import itertools

import pytest

from ggml.placement import CPU, main_first, place_layer, split_target
from ggml.runtime import Runtime, RuntimeOptions
from runner.flags import RPC_ENV, parse_args, parse_rpc_endpoints

N_LAYER = 30  # SmolLM2's block count; "layer" 30 is the output layer


def layout(n_gpus: int, n_remotes: int, ngl: int, split: tuple[float, ...] = (), n_layer: int = N_LAYER) -> list[int]:
    return [place_layer(il, n_layer, n_gpus=n_gpus, n_remotes=n_remotes, n_gpu_layers=ngl, tensor_split=split)
            for il in range(n_layer + 1)]


def test_no_device_keeps_everything_on_the_cpu() -> None:
    assert layout(0, 0, 99, (1, 1)) == [CPU] * 31


def test_n_gpu_layers_counts_from_the_output_layer_back() -> None:
    assert layout(1, 0, 31) == [0] * 31
    assert layout(1, 0, 99) == [0] * 31  # more than there are: all
    assert layout(1, 0, 10) == [CPU] * 21 + [0] * 10  # blocks 21..29 and the output layer
    assert layout(1, 0, 1) == [CPU] * 30 + [0]  # the output layer alone
    assert layout(1, 0, 0) == [CPU] * 31


def test_tensor_split_cuts_contiguous_shares() -> None:
    # 3:1 over 31 layers: layer il goes to GPU 0 while il/31 < 3/4, i.e. il <= 23
    assert layout(2, 0, 31, (3, 1)) == [0] * 24 + [1] * 7
    # 10 offloaded (21..30), equal shares: 5 and 5
    assert layout(2, 0, 10, (1, 1)) == [CPU] * 21 + [0] * 5 + [1] * 5
    # no split given: equal shares
    assert layout(2, 0, 10) == layout(2, 0, 10, (1, 1))
    # a zero share gets nothing; missing entries count zero; extra ones are ignored
    assert layout(2, 0, 31, (0, 1)) == [1] * 31
    assert layout(3, 0, 31, (1,)) == [0] * 31
    assert layout(1, 0, 31, (1, 5, 5)) == [0] * 31
    # all-zero shares: equal
    assert layout(2, 0, 10, (0, 0)) == layout(2, 0, 10)


def test_rpc_devices_without_gpu_share_the_layers_with_the_local_cpu() -> None:
    # local, remote 0, remote 1 in equal thirds of 31: il < 31/3 -> CPU, il < 62/3 -> remote 0, rest remote 1
    assert layout(0, 2, 0) == [CPU] * 11 + [0] * 10 + [1] * 10
    assert layout(0, 2, 0, (1, 1, 1)) == layout(0, 2, 0)
    assert layout(0, 2, 0, (0, 1, 1)) == [0] * 16 + [1] * 15  # nothing local
    assert layout(0, 2, 0, (2, 1)) == [CPU] * 21 + [0] * 10  # remote 1's share is missing: zero
    assert layout(0, 1, 0, (1, 0)) == [CPU] * 31


def test_rpc_devices_with_a_gpu_follow_n_gpu_layers_and_come_after_the_gpus() -> None:
    assert layout(1, 1, 31, (1, 1)) == [0] * 16 + [1] * 15
    assert layout(1, 1, 0, (1, 1)) == [CPU] * 31  # llama.cpp's rule: remote devices need -ngl too
    assert layout(1, 2, 6) == [CPU] * 25 + [0] * 2 + [1] * 2 + [2] * 2


def test_every_layout_is_cpu_first_then_ascending_devices() -> None:
    for n_gpus, n_remotes, ngl, split, n_layer in itertools.product(
            range(3), range(3), (0, 1, 7, 40), ((), (1,), (0, 2, 1), (5, 0, 0, 1)), (1, 2, 13)):
        got = layout(n_gpus, n_remotes, ngl, split, n_layer)
        assert got == sorted(got), (n_gpus, n_remotes, ngl, split, n_layer, got)
        assert all(CPU <= d < n_gpus + n_remotes for d in got)


def test_split_target_edges() -> None:
    assert split_target(0, 4, 5, (1,), 0) == CPU  # no targets
    assert split_target(4, 4, -3, (1,), 1) == CPU  # negative count: nothing offloaded


def test_main_gpu_goes_first() -> None:
    assert main_first(["CUDA0", "CUDA1", "CUDA2"], 2) == ["CUDA2", "CUDA0", "CUDA1"]
    assert main_first(["CUDA0", "CUDA1"], 0) == ["CUDA0", "CUDA1"]
    assert main_first(["CUDA0", "CUDA1"], 5) == ["CUDA0", "CUDA1"]  # out of range: unchanged


def test_runtime_places_over_its_device_lists() -> None:
    """The runtime's own method, on fake GPU and remote lists (a CPU-only machine has neither)."""
    rt = Runtime(RuntimeOptions(threads=1, n_gpu_layers=10, tensor_split=(1, 1)))
    try:
        assert [rt.device_of_layer(il, N_LAYER) for il in range(31)] == [CPU] * 31
        rt.gpus = [object(), object()]  # type: ignore[list-item]
        assert [rt.device_of_layer(il, N_LAYER) for il in range(31)] == layout(2, 0, 10, (1, 1))
        rt.gpus, rt.remotes = [], [object(), object()]  # type: ignore[list-item]
        assert [rt.device_of_layer(il, N_LAYER) for il in range(31)] == layout(0, 2, 0, (1, 1))
    finally:
        rt.gpus, rt.remotes = [], []
        rt.close()


def test_rpc_flag_and_environment() -> None:
    cfg, _ = parse_args(["--model", "m", "--rpc", "10.0.0.2:50052, host-b:7000"], {})
    assert cfg.rpc == ("10.0.0.2:50052", "host-b:7000")
    cfg, _ = parse_args(["--model", "m"], {RPC_ENV: "127.0.0.1:1,127.0.0.1:1"})
    assert cfg.rpc == ("127.0.0.1:1",)  # one device per endpoint
    cfg, _ = parse_args(["--model", "m", "--rpc", ""], {RPC_ENV: "127.0.0.1:1"})
    assert cfg.rpc == ()  # the flag wins, even empty
    assert parse_args(["--model", "m"], {})[0].rpc == ()
    with pytest.raises(ValueError, match=RPC_ENV):
        parse_args(["--model", "m"], {RPC_ENV: "nohost"})


@pytest.mark.parametrize("bad", ["host", ":50052", "host:", "host:0", "host:65536", "host:5x", "::1:50052",
                                 "a:1,,b:2", "host:\u00b2"])
def test_bad_rpc_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid RPC endpoint"):
        parse_rpc_endpoints(bad)
