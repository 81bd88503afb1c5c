"""Reading the JSON files of a Hugging Face model folder, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.convert.errors import ConversionError


def _read_json(path: Path, kind: type, what: str) -> Any:
    """Parse `path` as JSON of type `kind`; a missing, unreadable or mistyped file is a `ConversionError`."""
    if not path.is_file():
        raise ConversionError(f"missing file: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if not isinstance(data, kind):
        raise ConversionError(f"{path} is not a JSON {what}")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse `path` as a JSON object; a missing, unreadable or non-object file is a `ConversionError`."""
    obj: dict[str, Any] = _read_json(path, dict, "object")
    return obj


def read_optional_json_object(path: Path) -> dict[str, Any] | None:
    """Like `read_json_object`, but an absent file is `None` rather than an error."""
    return read_json_object(path) if path.is_file() else None


def read_json_list(path: Path) -> list[Any]:
    """Parse `path` as a JSON array (e.g. sentence-transformers' modules.json)."""
    arr: list[Any] = _read_json(path, list, "array")
    return arr
