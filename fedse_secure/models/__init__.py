"""Offline model resolution and loading (see :mod:`fedse_secure.models.loading`)."""

from fedse_secure.models.loading import (
    DEFAULT_MODEL,
    TINY_MODEL,
    LoadedModel,
    ModelDoesNotFitError,
    ModelNotAvailableError,
    cache_dir,
    load_model_and_tokenizer,
    prepare_default_model,
    prepare_tiny_model,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "LoadedModel",
    "ModelDoesNotFitError",
    "ModelNotAvailableError",
    "cache_dir",
    "load_model_and_tokenizer",
    "prepare_default_model",
    "prepare_tiny_model",
    "resolve_model_path",
]
