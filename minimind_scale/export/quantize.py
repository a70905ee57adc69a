"""llama.cpp's own quantiser (`llama_model_quantize`, what `llama-quantize` runs), through the llama-cpp-python
bindings: k-quant types are llama.cpp's code, not a re-implementation."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from minimind_scale.errors import UserError

INSTALL_HINT = "pip install 'minimind_scale[gguf]' (it builds llama.cpp from llama-cpp-python's source)"


def llama_cpp_module():
    """The llama_cpp bindings, or a UserError saying how to install them."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"llama.cpp's Python bindings are not installed: {INSTALL_HINT}") from None
    return llama_cpp


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """Quantise the GGUF file `source` into `target` (`gguf_type` is one of llama.cpp's file types, by name)."""
    llama_cpp = llama_cpp_module()
    file_type = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if file_type is None:
        raise UserError(f"--gguf_type {gguf_type}: llama.cpp's quantiser has no such type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = os.cpu_count() or 1
    print(f"quantising to {gguf_type} with llama.cpp ...", flush=True)
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"llama.cpp's quantiser failed on {source} (code {code}); its log above says why")
