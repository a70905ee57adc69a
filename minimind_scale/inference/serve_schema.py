"""OpenAI's chat-completions schema, as far as `serve` speaks it: requests checked field by field,
responses and stream chunks built, and every refusal in OpenAI's error shape.

A request is checked strictly (a string where a number belongs is refused, not converted), because a
client that sends the wrong type has a bug it should hear about. Fields of the API that this server
does not implement and that would change the answer (`n` > 1, `stop`, `logprobs`, a JSON
`response_format`, a forced `tool_choice`) are refused by name; fields that only describe the caller
(`user`, `metadata`, `store`, ...) are accepted and ignored.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minimind_scale.chat.messages import normalize_messages
from minimind_scale.chat.reply_parser import Piece, ToolCall
from minimind_scale.errors import RecordError

# Below this a temperature is sampled as greedy: dividing logits by a smaller one overflows them to inf and nan.
GREEDY_BELOW = 1e-5
# Request JSON nested deeper than this is refused before it is parsed: no real request comes near it, and
# parsing and checking a much deeper one recurses past Python's stack limit.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


class ApiError(Exception):
    """A refused request: the HTTP status and OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSchema(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSchema


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description=f"0 (or below {GREEDY_BELOW:g}): greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    seed: int | None = None
    n: Literal[1] | None = None
    stop: None = None
    logprobs: Literal[False] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    open_thinking: bool | None = None

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


_UNSUPPORTED = {"n": "only n=1 is supported", "stop": "stop sequences are not supported",
                "logprobs": "logprobs are not supported", "tool_choice": "only \"auto\" and \"none\" are supported"}


def _inner_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[Message] | None`, if any."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _inner_model(a)) is not None), None)


def param_name(loc: tuple) -> str | None:
    """A validation error's location as a parameter path (`messages[0].role`), without the union member names
    pydantic appends."""
    path, model = "", ChatRequest
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if model is None or part not in model.model_fields:
            break
        path += ("." if path else "") + part
        model = _inner_model(model.model_fields[part].annotation)
    return path or None


def sampling_temperature(temperature: float) -> float:
    """The temperature to sample with: 0 (greedy) for any below GREEDY_BELOW."""
    return 0.0 if temperature < GREEDY_BELOW else temperature


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b"", body)):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def decode_body(body: bytes) -> Any:
    """The request body's JSON, or an ApiError (400) when it is not JSON or nests deeper than MAX_JSON_DEPTH."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def _not_unicode(data: Any) -> str | None:
    """The path (`messages[0].content`) of the first key or string in `data` that is not valid Unicode (a lone
    UTF-16 surrogate, which JSON's \\u escapes can spell), or None. Walked without recursion."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str) and not _encodes(value):
            return path or "(body)"
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                shown = key.encode("utf-8", "backslashreplace").decode("utf-8")  # a path the answer can carry
                inner = f"{path}.{shown}" if path else shown
                if not _encodes(key):
                    return inner
                pending.append((inner, item))
        elif isinstance(value, list):
            pending += reversed([(f"{path}[{i}]", item) for i, item in enumerate(value)])
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(data: Any) -> ChatRequest:
    """The request, or an ApiError (400) naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    if (bad := _not_unicode(data)) is not None:
        raise ApiError(400, f"{bad}: the text is not valid Unicode (it holds a lone UTF-16 surrogate)", param=bad)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = param_name(err["loc"])
        why = _UNSUPPORTED.get(str(err["loc"][0])) if err["loc"] else None
        raise ApiError(400, f"{param}: {why or err['msg']}", param=param) from None
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
    return request


def _text(content: str | list[TextPart] | None) -> str | None:
    return "".join(p.text for p in content) if isinstance(content, list) else content


def _history_message(m: Message) -> dict:
    """One OpenAI message as the project's conversations spell it (see chat.messages.normalize_messages)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content) or ""}
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
    return out


def prompt_parts(request: ChatRequest, raw_tools: list | None) -> tuple[list[dict], list | None, dict]:
    """(messages, tool schemas, chat-template keyword arguments) to render the request's prompt.

    `raw_tools` are the schemas as the client sent them, rendered unchanged. Thinking is asked for with
    `open_thinking` (MiniMind's template), at the top level or in `chat_template_kwargs`, where Qwen3's
    `enable_thinking` means the same.
    """
    history = [_history_message(m) for m in request.messages]
    # An assistant turn that said nothing is a real answer in a conversation (training data refuses it, as
    # it teaches nothing), so it is checked as a placeholder and rendered empty.
    said_nothing = [m["role"] == "assistant" and not m["content"] and "tool_calls" not in m for m in history]
    try:
        messages, _ = normalize_messages(
            {"messages": [dict(m, content=" ") if empty else m for m, empty in zip(history, said_nothing)]},
            require_assistant=False)
    except RecordError as e:
        raise ApiError(400, f"{e.field}: {e.reason}", param=e.field) from None
    for message, empty in zip(messages, said_nothing):
        if empty:
            message["content"] = ""
    kwargs = dict(request.chat_template_kwargs or {})
    think = kwargs.pop("enable_thinking", None)
    think = kwargs.pop("open_thinking", think)
    if request.open_thinking is not None:
        think = request.open_thinking
    if think is not None and not isinstance(think, bool):
        raise ApiError(400, "chat_template_kwargs.open_thinking: must be true or false",
                       param="chat_template_kwargs.open_thinking")
    if think:
        kwargs["open_thinking"] = True
    return messages, (raw_tools if request.uses_tools else None), kwargs


# ------------------------------------------------------------------------------------------ responses
# The response bodies as models, for the published OpenAPI document only: the bodies themselves are built as
# dicts by the functions below.

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal: a 4xx (or 503 when the queue is full), OpenAI's error shape."""

    error: ErrorDetail


class ReplyFunction(BaseModel):
    name: str
    arguments: str


class ReplyToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ReplyFunction


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ReplyToolCall] | None = None


class ReplyChoice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A non-streamed answer; a streamed one is `text/event-stream` of `chat.completion.chunk`s ending `[DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ReplyChoice]
    usage: Usage


def request_schemas(ref_prefix: str) -> dict[str, dict]:
    """JSON schemas of ChatRequest and the models inside it, by name, their references under `ref_prefix`."""
    schema = ChatRequest.model_json_schema(ref_template=ref_prefix + "{model}")
    return {**schema.pop("$defs", {}), "ChatRequest": schema}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


def finish_reason(stopped: str, pieces_have_calls: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the model ended its turn to call tools."""
    return "tool_calls" if stopped == "stop" and pieces_have_calls else stopped


def completion(cid: str, model: str, pieces: list[Piece], stopped: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """The non-streamed response: the pieces joined into one assistant message."""
    content = "".join(p.text for p in pieces if p.kind == "content")
    reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
    calls = [p.call for p in pieces if p.call is not None]
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [tool_call_json(c) for c in calls]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(stopped, bool(calls))}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None,
          choices: bool = True) -> dict:
    """One `chat.completion.chunk` of a stream (`choices` False: the closing usage-only chunk)."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                           if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def piece_delta(piece: Piece, call_index: int) -> dict:
    if piece.call is not None:
        return {"tool_calls": [tool_call_json(piece.call, call_index)]}
    return {"reasoning_content" if piece.kind == "reasoning" else "content": piece.text}
