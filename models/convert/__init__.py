"""Converters from Hugging Face checkpoints to GGUF."""
from __future__ import annotations

from models.convert.bert import convert, main
from models.convert.errors import ConversionError

__all__ = ["ConversionError", "convert", "main"]
