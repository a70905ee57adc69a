"""Export: what a run trained, for other tools. `command` is the `export` command; `sources` reads checkpoints
and model directories; the `gguf_*` modules, `quantize` and `ollama` write a GGUF file for llama.cpp and Ollama."""
from __future__ import annotations


def __getattr__(name: str):
    # `from minimind_scale.export import ExportConfig, run` kept working when this module became a package.
    if name in ("ExportConfig", "run"):
        from minimind_scale.export import command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
