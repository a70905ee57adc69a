"""Transitional: the names this module held, now in modules with one job each.

`chat.messages` validates records (`normalize_messages`), `chat.template` renders them (`render_chat`,
`CHAT_TEMPLATE`), `chat.encoding` turns them into token ids and labels (`encode_chat`, `encode_chats`,
`encode_prompt`, `encode_prompts`), and `chat.markup` holds the markup (`ASSISTANT_HEADER`, `TURN_END`,
`CONTROL_MARKERS`). This module re-exports them until every importer uses their new homes.
"""

from __future__ import annotations

from minimind_scale.chat.encoding import (
    assistant_char_spans,
    encode_chat,
    encode_chats,
    encode_prompt,
    encode_prompts,
)
from minimind_scale.chat.markup import ASSISTANT_HEADER, CONTROL_MARKERS, TURN_END
from minimind_scale.chat.messages import ROLES, normalize_messages
from minimind_scale.chat.template import PORTED_TEMPLATES, render_chat

__all__ = [
    "ASSISTANT_HEADER", "CONTROL_MARKERS", "PORTED_TEMPLATES", "ROLES", "TURN_END", "assistant_char_spans",
    "encode_chat", "encode_chats", "encode_prompt", "encode_prompts", "normalize_messages", "render_chat",
]
