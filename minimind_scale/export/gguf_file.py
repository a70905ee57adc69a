"""Write one GGUF file (and the Ollama Modelfile beside it) with the gguf package's writer.

Tensor types follow llama.cpp's converter: 1-D tensors, norms and the MoE router stay f32, the rest take the
requested type; q8_0 needs rows that are a multiple of its 32-value block and falls back to f16 otherwise.
q4_k_m goes through llama.cpp's own quantiser from an f32 file (`quantize.py`), which picks its per-tensor
mixture (some tensors at q6_k, rows too short for k-quants at a smaller block type) as `llama-quantize` does.
The file is written under a temporary name and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from minimind_scale.errors import UserError
from minimind_scale.export.gguf_model import add_hyperparameters, gguf_architecture, named_tensors
from minimind_scale.export.gguf_vocab import add_tokenizer
from minimind_scale.export.ollama import MODELFILE, modelfile_text

Q = gguf.GGMLQuantizationType
# --gguf_type -> (the writer's tensor type, the file type recorded in general.file_type)
WRITTEN_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ALWAYS_F32 = ("_norm.weight", "ffn_gate_inp.weight")


def check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (unless `overwrite`) or a folder that is not there."""
    if out.suffix != ".gguf":
        raise UserError(f"--out_file {out}: name the file *.gguf (llama.cpp and Ollama go by the extension)")
    if not out.parent.is_dir():
        raise UserError(f"--out_file {out}: the folder {out.parent} does not exist")
    for path in (out, out.parent / MODELFILE):
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite true to replace it")
        if path.is_dir():
            raise UserError(f"{path} is a directory")


def tensor_type(name: str, array: np.ndarray, requested: Q) -> Q:
    if array.ndim <= 1 or name.endswith(ALWAYS_F32) or requested == Q.F32:
        return Q.F32
    if requested == Q.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return requested


def encoded(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` in `qtype`'s storage (the gguf package's own reference quantisation for bf16 and q8_0)."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_float_gguf(model, tokenizer, path: Path, gguf_type: str, name: str) -> None:
    """`model` as a GGUF file of one of the types the writer produces itself (f32, f16, bf16, q8_0), called
    `name` in its metadata."""
    arch = gguf_architecture(model)
    requested, file_type = WRITTEN_TYPES[gguf_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    add_hyperparameters(writer, model.config)
    writer.add_file_type(file_type)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for name, array in named_tensors(model, arch):
        qtype = tensor_type(name, array, requested)
        writer.add_tensor(name, encoded(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def write_gguf(model, tokenizer, out: Path, gguf_type: str) -> None:
    """Write `out` (of `gguf_type`) and the Ollama Modelfile beside it; both appear whole or not at all."""
    from minimind_scale.export.quantize import quantize

    model = model.to("cpu").float().eval()
    partial = out.with_name(f".{out.name}.partial")
    f32 = out.with_name(f".{out.name}.f32.partial")
    try:
        if gguf_type == "q4_k_m":
            write_float_gguf(model, tokenizer, f32, "f32", out.stem)
            quantize(f32, partial, gguf_type)
        else:
            write_float_gguf(model, tokenizer, partial, gguf_type, out.stem)
        modelfile = out.parent / MODELFILE
        modelfile_partial = modelfile.with_name(f".{MODELFILE}.partial")
        modelfile_partial.write_text(modelfile_text(out.name, tokenizer, model.generation_config))
        os.replace(partial, out)
        os.replace(modelfile_partial, modelfile)
    except OSError as e:
        raise UserError(f"{out}: could not be written ({e.strerror or e})") from None
    finally:
        for leftover in (partial, f32, out.parent / f".{MODELFILE}.partial"):
            leftover.unlink(missing_ok=True)
