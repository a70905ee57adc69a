"""full_sft (alias sft): supervised fine-tuning on chat conversations, loss on assistant tokens only.

Two of MiniMind's SFT augmentations apply as conversations are tokenised (lora and distill share them):
a system prompt drawn from ten assistant prompts for a share of the records that have none (and no tools),
and the removal of the empty `<think>` block of replies without reasoning from most records, so the model
learns to answer both with and without it. Each is decided per record from --seed and the record's file
and line, so every prepare of the same data gives the same rows.
"""
from typing import Annotated

from pydantic import Field

from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.chat.conversation import encode_chat, encode_chats, normalize_messages, render_chat
from minimind_scale.config import BatchSize, Epochs, LearningRate, MaxSeqLen, ModelSource, OutDir, Packing
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.data.record_draws import RecordPosition
from minimind_scale.errors import RecordError
from minimind_scale.losses.causal_lm import causal_lm_loss, count_label_tokens

AddSystemRatio = Annotated[float, Field(
    ge=0, le=1, description="share of conversations without a system turn or tools that get a system prompt drawn "
    "from ten zh/en assistant prompts (decided per record from seed, file and line)")]
EmptyThinkRatio = Annotated[float, Field(
    ge=0, le=1, description="share of conversations that keep the empty <think> block of replies without reasoning; "
    "the others have it removed (decided per record from seed, file and line)")]
# The options the augmentations read: they change the tokenised rows, so they join the cache key.
AUGMENTATION_FIELDS = ("add_system_ratio", "empty_think_ratio", "seed")

# What MiniMind's chat template writes before a reply that has no reasoning.
EMPTY_THINK = "<think>\n\n</think>\n\n"
SYSTEM_PROMPTS = (
    "你是一个乐于助人、回答准确的智能助手。",
    "你是一位知识丰富的AI助手，请用清晰简洁的语言回答用户的问题。",
    "你是一个友好的对话助手，会认真理解用户的需求并给出有用的回复。",
    "作为AI助手，你应当诚实、耐心，并尽力提供可靠的信息。",
    "你是一个小型语言模型助手，擅长用中文和英文与人交流。",
    "You are a helpful assistant that answers accurately and concisely.",
    "You are a friendly AI assistant. Work out what the user needs and reply clearly.",
    "You are a knowledgeable assistant; give honest, well-organised answers.",
    "As an AI assistant, you help people with questions, writing and reasoning.",
    "You are a small but capable language model assistant who speaks English and Chinese.",
)


class FullSFTConfig(TrainConfig):
    """Defaults for fine-tuning a pretrained model: lr 1e-5 (MiniMind goes lower, 1e-6, on its large
    SFT mixes; 1e-5 moves a small model visibly on small data), 768-token conversations, 2 epochs."""

    model: ModelSource = Field("out/pretrain/final", description="a Hugging Face model directory (usually a "
                               "pretrain run's final/) or a preset name")
    learning_rate: LearningRate = 1e-5
    batch_size: BatchSize = 16
    max_seq_len: MaxSeqLen = 768
    epochs: Epochs = 2
    packing: Packing = True
    add_system_ratio: AddSystemRatio = 0.2
    empty_think_ratio: EmptyThinkRatio = 0.2
    out_dir: OutDir = "out/full_sft"


def augmented(messages: list[dict], tools: list | None, tokenizer, cfg,
              position: RecordPosition | None) -> tuple[list[dict], str]:
    """The conversation with MiniMind's augmentations, and its rendering: maybe a system prompt first,
    maybe the empty <think> blocks cut from the rendered text (so labels follow the text as stored).
    A record without a position (encoded outside data preparation) is left as it is."""
    if (position is not None and tools is None and messages[0]["role"] != "system"
            and position.draw(cfg.seed, "add_system") < cfg.add_system_ratio):
        prompt = position.choice(cfg.seed, "system_prompt", SYSTEM_PROMPTS)
        messages = [{"role": "system", "content": prompt}, *messages]
    text = render_chat(messages, tools, tokenizer)
    if position is not None and position.draw(cfg.seed, "empty_think") >= cfg.empty_think_ratio:
        text = text.replace(EMPTY_THINK, "")
    return messages, text


def encode(record: dict, tokenizer, cfg, position: RecordPosition | None = None) -> dict:
    messages, tools = normalize_messages(record)
    messages, text = augmented(messages, tools, tokenizer, cfg, position)
    return encode_chat(messages, tools, tokenizer, cfg.max_seq_len, text)


def encode_batch(records: list[dict], tokenizer, cfg,
                 positions: list[RecordPosition] | None = None) -> list[dict | RecordError]:
    """`encode` of each record: the valid conversations rendered one by one, then tokenised in one call."""
    out: list = [None] * len(records)
    conversations, texts, where = [], [], []
    for i, record in enumerate(records):
        try:
            messages, tools = normalize_messages(record)
        except RecordError as e:
            out[i] = e
            continue
        messages, text = augmented(messages, tools, tokenizer, cfg, None if positions is None else positions[i])
        conversations.append((messages, tools))
        texts.append(text)
        where.append(i)
    for i, encoded in zip(where, encode_chats(conversations, tokenizer, cfg.max_seq_len, texts)):
        out[i] = encoded
    return out


def collate(rows, tokenizer, cfg):
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))


SPEC = register_stage(StageSpec(
    name="full_sft",
    aliases=("sft",),
    help="supervised fine-tuning on conversations (loss on assistant turns)",
    config=FullSFTConfig,
    encode=encode,
    encode_batch=encode_batch,
    collate=collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    fixed_length=True,
    cross_entropy_variants=True,
    record_positions=True,
    data_fields=AUGMENTATION_FIELDS,
))
