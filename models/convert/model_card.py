"""`general.*` authorship metadata (name, license, datasets, size label, ...) from the folder's model card."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf

logger = logging.getLogger(__name__)


def add_model_card(writer: gguf.GGUFWriter, src_dir: Path, total_params: int) -> None:
    """Write the general.* keys `gguf.Metadata` derives from README.md front matter, config.json and the
    folder name; an unreadable model card is logged and skipped, not fatal."""
    try:
        meta = gguf.Metadata.load(None, src_dir, None, total_params)
    except Exception as e:  # noqa: BLE001 - YAML/JSON errors of many kinds; the card is optional
        logger.warning("ignoring unreadable model card in %s: %s", src_dir, e)
        meta = gguf.Metadata.load(None, None, None, total_params)
    if meta.name is None:
        meta.name = src_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    meta.set_gguf_meta_model(writer)
