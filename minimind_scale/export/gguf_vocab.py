"""A transformers ByteLevel BPE tokenizer as llama.cpp's "gpt2" tokenizer: tokens, their types, merges, the
pre-tokenizer, special ids and the chat template.

The pre-tokenizer type names the regex llama.cpp splits text with before BPE. MiniMind's tokenizer (and every
one `train-tokenizer` makes) is a plain ByteLevel pre-tokenizer with GPT-2's split rule, which keeps runs of
digits together (" 2024" -> "Ġ20" "24"): llama.cpp's "gpt-2" type is that rule. Its "qwen2" type splits digits
one by one and so tokenises every number differently; the token-id tests hold the choice to account.
"""
from __future__ import annotations

import json
import tempfile

import gguf

from minimind_scale.errors import UserError

GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def pre_tokenizer_type(tokenizer) -> str:
    """llama.cpp's pre-tokenizer type for `tokenizer`, or a UserError when llama.cpp has none that matches."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or normalizer is not None:
        raise UserError("export --format gguf: the tokenizer must be a byte-level BPE without a normalizer "
                        f"(this one: model {model.get('type')}, normalizer {(normalizer or {}).get('type')})")
    if {k: pre.get(k) for k in GPT2_SPLIT} == GPT2_SPLIT:
        return "gpt-2"
    raise UserError("export --format gguf: the tokenizer's pre-tokenizer "
                    f"{json.dumps(pre)[:200]} is not one llama.cpp implements here (a ByteLevel pre-tokenizer "
                    "with GPT-2's split rule, as MiniMind's and train-tokenizer's)")


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token texts, llama.cpp token types) for ids 0..vocab_size-1.

    Regular tokens keep their byte-level text ("Ġ20"). Added tokens are matched in raw text before BPE, by
    transformers and llama.cpp alike: a special one is CONTROL, another (<think>, <tool_call>) USER_DEFINED.
    Ids the tokenizer does not use (a model row count above the vocabulary) are UNUSED placeholders.
    """
    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise UserError(f"export --format gguf: the tokenizer has id {max(by_id)} but the model only "
                        f"{vocab_size} embedding rows")
    texts, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            texts.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            texts.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            texts.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return texts, types


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Everything llama.cpp needs to tokenise, detokenise, stop and chat with the model's own template."""
    pre = pre_tokenizer_type(tokenizer)
    texts, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    # The gguf package's SpecialVocab reads merges, special ids and add_bos/add_eos from a saved tokenizer
    # directory, as llama.cpp's converter does.
    with tempfile.TemporaryDirectory(prefix="gguf_tokenizer_") as saved:
        tokenizer.save_pretrained(saved)
        special = gguf.SpecialVocab(saved, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError("export --format gguf: the tokenizer has no BPE merges")
    special.chat_template = None  # written below from the tokenizer object itself, character for character
    special.add_special_token = {}  # written below from what the tokenizer does, not from config flags
    special.add_to_gguf(writer, quiet=True)
    writer.add_chat_template(tokenizer.chat_template)
    plain, framed = (tokenizer("a", add_special_tokens=flag).input_ids for flag in (False, True))
    # llama.cpp prepends BOS to a gpt2 vocabulary unless told otherwise; MiniMind's tokenizer adds nothing.
    writer.add_add_bos_token(len(framed) > len(plain) and framed[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(framed) > len(plain) and framed[-1] == tokenizer.eos_token_id)
