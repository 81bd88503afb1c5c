"""The one error the converter raises on purpose."""
from __future__ import annotations

from ml.errors import RunnerError


class ConversionError(RunnerError, ValueError):
    """A Hugging Face model folder cannot be converted; the message names the file and the problem."""
