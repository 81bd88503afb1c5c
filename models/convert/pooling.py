"""The sentence-transformers pooling mode of a model folder (modules.json → N_Pooling/config.json)."""
from __future__ import annotations

from pathlib import Path

from gguf import PoolingType

from models.convert.errors import ConversionError
from models.convert.hf_files import read_json_list, read_json_object

# Newer sentence-transformers write a single "pooling_mode" string instead of the boolean flags.
_MODE_NAMES = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "lasttoken": PoolingType.LAST}


def _pooling_dir(src_dir: Path) -> Path | None:
    """The folder of the first Pooling module listed in modules.json, if there is one."""
    modules_path = src_dir / "modules.json"
    if not modules_path.is_file():
        return None
    for module in read_json_list(modules_path):
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            return src_dir / str(module.get("path", ""))
    return None


def read_pooling_type(src_dir: Path) -> PoolingType | None:
    """The pooling the model was trained with, or `None` when the folder declares none (plain BERT)."""
    pooling_dir = _pooling_dir(src_dir)
    if pooling_dir is None:
        return None
    config_path = pooling_dir / "config.json"
    cfg = read_json_object(config_path)
    # The flags are checked in this order; a config with several set gets the first.
    if cfg.get("pooling_mode_mean_tokens"):
        return PoolingType.MEAN
    if cfg.get("pooling_mode_cls_token"):
        return PoolingType.CLS
    if cfg.get("pooling_mode_lasttoken"):
        return PoolingType.LAST
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str) and mode in _MODE_NAMES:
        return _MODE_NAMES[mode]
    raise ConversionError(f"{config_path}: unsupported pooling (only mean, cls and last-token pooling are supported)")
