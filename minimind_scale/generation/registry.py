"""Generation backends by name: registering one, making one, and the `generation_backend` option type.

A backend is registered as its class or as "module:Class", imported on first use: the built-in "hf"
(generation/hf.py) is registered that way, so that parsing a command's options imports no torch, and an
optional backend's heavy package (vLLM, SGLang) loads only when a run asks for it. Another backend registers
itself with `register_backend(name, ...)`, here beside "hf" or from a `--plugin` file, and is then a valid
value of every `--generation_backend` option.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from minimind_scale.config import did_you_mean
from minimind_scale.errors import UserError

if TYPE_CHECKING:
    from minimind_scale.generation.interface import GenerationBackend

DEFAULT_BACKEND = "hf"

_BACKENDS: dict[str, type[GenerationBackend] | str] = {DEFAULT_BACKEND: "minimind_scale.generation.hf:HFBackend"}


def register_backend(name: str, backend: type[GenerationBackend] | str) -> None:
    """Make `backend` (a GenerationBackend subclass, or "module:Class" naming one) available as `name`; a later
    registration of the same name replaces it."""
    if isinstance(backend, str) and backend.count(":") != 1:
        raise ValueError(f"generation backend '{name}': {backend!r} is not of the form 'module:Class'")
    _BACKENDS[name] = backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[GenerationBackend]:
    """The class registered as `name` (imported now when it was registered by path)."""
    from minimind_scale.generation.interface import GenerationBackend

    if name not in _BACKENDS:
        raise UserError(_unknown(name))
    backend = _BACKENDS[name]
    if isinstance(backend, str):
        module, attribute = backend.split(":")
        backend = getattr(importlib.import_module(module), attribute)
    if not (isinstance(backend, type) and issubclass(backend, GenerationBackend)):
        raise TypeError(f"generation backend '{name}' is {backend!r}, not a GenerationBackend subclass")
    _BACKENDS[name] = backend
    return backend


def create_backend(name: str, model, *, pad_id: int) -> GenerationBackend:
    """A `name` backend generating with the live module `model` (a trainer's policy)."""
    return backend_class(name).from_model(model, pad_id=pad_id)


def load_backend(name: str, model_dir: str, **options) -> tuple[GenerationBackend, object]:
    """(backend, tokenizer) of a model directory, for the inference commands; `options` as
    inference.loading.load_chat_model takes them."""
    return backend_class(name).from_pretrained(model_dir, **options)


def backend_for(model, backend: GenerationBackend | str = DEFAULT_BACKEND, *, pad_id: int) -> GenerationBackend:
    """What a generating function uses: `backend` when it is a backend (its owner keeps its weights current),
    else `model` when it is one, else a new backend named `backend` on the live module `model` (for hf that is
    free: it holds the module)."""
    from minimind_scale.generation.interface import GenerationBackend

    if isinstance(backend, GenerationBackend):
        return backend
    if isinstance(model, GenerationBackend):
        return model
    return create_backend(backend, model, pad_id=pad_id)


def _unknown(name: str) -> str:
    registered = ", ".join(backend_names())
    return f"unknown generation backend '{name}'{did_you_mean(name, _BACKENDS)} (registered: {registered})"


def _registered(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(_unknown(name))
    return name


BackendName = Annotated[str, AfterValidator(_registered), Field(
    description="what generates the tokens: hf (transformers' generate) or a backend a --plugin registered")]
