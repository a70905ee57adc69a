"""The chat markup MiniMind-family models read and write, defined once.

Every module that writes or looks for a turn marker, a think block or a tool-call tag imports it from here;
tests/test_markup.py fails if one of these literals appears in code anywhere else (docstrings and comments may
mention them); chat/template.py builds the chat template itself from these constants.
"""
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
CONTROL_MARKERS = (TURN_START, TURN_END)  # never allowed inside a message's text
ASSISTANT_HEADER = TURN_START + "assistant\n"  # the loss-bearing span of a turn starts right after it

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_PROMPT_OPEN = THINK_OPEN + "\n"  # how the generation prompt ends when thinking is left open
EMPTY_THINK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"  # a reply without reasoning, as the template writes it

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
