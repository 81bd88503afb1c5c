"""Which device holds each layer: pure functions of the flags and the device list, so they are tested without one.

Layers are numbered 0..n_layer-1; "layer" n_layer is the output layer (output norm and projection). Offloading
counts from the end, as in llama.cpp and Ollama: `n_offload` = n_layer + 1 puts every block and the output layer on
the targets. The offloaded layers are cut into contiguous runs, one per target, in the proportions of
`tensor_split` (equal shares when it is empty; missing entries count 0, extra ones are ignored).
"""
from __future__ import annotations

from collections.abc import Sequence

CPU = -1
"""The device index of the local CPU (every layer that is not offloaded)."""


def split_target(il: int, n_layer: int, n_offload: int, split: Sequence[float], n_targets: int) -> int:
    """Index in 0..n_targets-1 of the target that holds layer `il`, or CPU (-1) when it is not offloaded."""
    if n_targets <= 0:
        return CPU
    n_off = max(0, min(n_offload, n_layer + 1))
    first_offloaded = n_layer + 1 - n_off
    if n_off == 0 or il < first_offloaded:
        return CPU
    shares = [float(s) for s in split[:n_targets]]
    shares += [0.0] * (n_targets - len(shares))
    total = sum(shares)
    if total <= 0:
        shares, total = [1.0] * n_targets, float(n_targets)
    frac = (il - first_offloaded) / n_off
    acc = 0.0
    for i, s in enumerate(shares):
        acc += s / total
        if frac < acc:
            return i
    return max(i for i, s in enumerate(shares) if s > 0)


def place_layer(il: int, n_layer: int, *, n_gpus: int, n_remotes: int, n_gpu_layers: int,
                tensor_split: Sequence[float]) -> int:
    """Device index for layer `il` over the device list [local GPUs..., remote (RPC) devices...], or CPU (-1).

    With a local GPU, `n_gpu_layers` counts the layers offloaded and `tensor_split` shares them among the GPUs
    and the remote devices (llama.cpp's rule). Without one but with remote devices, the local CPU is the first
    share: every layer is placed and `tensor_split` reads "local, remote 1, remote 2, ...".
    """
    if n_gpus > 0:
        return split_target(il, n_layer, n_gpu_layers, tensor_split, n_gpus + n_remotes)
    if n_remotes > 0:
        target = split_target(il, n_layer, n_layer + 1, tensor_split, 1 + n_remotes)
        return CPU if target == 0 else target - 1
    return CPU


def main_first(items: Sequence[str], main_gpu: int) -> list[str]:
    """The device list with the main GPU first (it then gets the output layer's share and the scheduler's
    preference); an out-of-range `main_gpu` leaves the order as it is."""
    out = list(items)
    if 0 < main_gpu < len(out):
        out.insert(0, out.pop(main_gpu))
    return out
