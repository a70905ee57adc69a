"""Chat markup and conversations: messages, the chat template, assistant-only labels, tool-call and reply parsing."""
