"""Model architectures, registered by GGUF `general.architecture`, plus the weight loader and tokenizers."""
from __future__ import annotations

from models import (bert, gemma, granite, llama, llama4, mistral3, mllama, nomic_bert, olmo2,  # noqa: F401
                    phi3, qwen3)  # (imported for registration)
from models.registry import Model, load_model, supported_architectures, takes_projector, widened_types

__all__ = ["Model", "load_model", "supported_architectures", "takes_projector", "widened_types"]
