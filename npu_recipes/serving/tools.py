"""Tool calling in Qwen's format: tool definitions through the chat template, ``<tool_call>`` blocks parsed back.

Qwen2.5 (and Qwen2's later templates) render ``tools`` into the system turn and expect the model
to answer with blocks ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; tool
results come back as ``role: tool`` turns. :func:`render_chat` passes ``tools`` to the model's own
template when the template uses them. A template that ignores them (Qwen2-7B-Instruct's, the tiny
test model's) gets the same information in a system turn written here, and assistant tool calls
and tool results as text in those blocks, so the model still sees what it is asked to do.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import List, Optional, Tuple

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_PROBE_TOOL = {"type": "function", "function": {"name": "npu_recipes_probe", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def template_uses_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list (a probe renders differently with one)."""
    messages = [{"role": "user", "content": "hi"}]
    try:
        with_tools = tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return with_tools != tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _system_text(tools: List[dict]) -> str:
    lines = ["You can call functions. Their signatures, as JSON, one per line:"]
    lines += [json.dumps(tool["function"], ensure_ascii=False) for tool in tools]
    lines.append(f'To call one, answer with {OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{CLOSE} '
                 "(one such block per call).")
    return "\n".join(lines)


def _as_text_turns(messages: List[dict], tools: Optional[List[dict]]) -> List[dict]:
    converted = []
    for message in messages:
        if message.get("tool_calls"):
            blocks = [f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n{CLOSE}"
                      for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message["content"] else []) + blocks)
            converted.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            converted.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            converted.append({"role": message["role"], "content": message["content"]})
    if tools:
        if converted and converted[0]["role"] == "system":
            converted[0] = {"role": "system", "content": converted[0]["content"] + "\n\n" + _system_text(tools)}
        else:
            converted.insert(0, {"role": "system", "content": _system_text(tools)})
    return converted


def render_chat(tokenizer, messages: List[dict], tools: Optional[List[dict]], template_has_tools: bool) -> str:
    """The prompt text for ``messages`` (template-input dicts) and OpenAI ``tools`` (None: no tools).

    Raises:
        jinja2.exceptions.TemplateError: the template rejects the conversation.
    """
    uses_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if template_has_tools or not (tools or uses_tool_turns):
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(_as_text_turns(messages, tools), tokenize=False, add_generation_prompt=True)


def parse_tool_calls(text: str, names: List[str]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """Split a reply into its text and the calls in its ``<tool_call>`` blocks.

    A block counts when it holds a JSON object with a ``name`` among ``names`` and ``arguments``
    that are a JSON object; its arguments are re-serialised as strict JSON (the model may have
    written raw control characters inside strings). Other blocks stay in the text.

    Returns:
        (the text without the counted blocks, stripped, or None when nothing is left;
        [(function name, arguments JSON text), ...] in order).
    """
    calls, kept, position = [], [], 0
    for match in _BLOCK.finditer(text):
        try:
            call = json.loads(match.group(1), strict=False)
        except ValueError:
            continue
        arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(arguments, dict):
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append((call["name"], json.dumps(arguments, ensure_ascii=False)))
    kept.append(text[position:])
    content = "".join(kept).strip()
    return (content or None), calls


def call_id() -> str:
    """A fresh tool-call id (``call_`` and 24 hex digits, OpenAI's shape)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolTextFilter:
    """For streaming: lets reply text through until a ``<tool_call>`` block may begin, then holds the rest.

    :meth:`feed` returns the text safe to stream as content now; at the end, :meth:`held` is
    the text from the first possible block on, which the caller parses with :func:`parse_tool_calls`.
    """

    def __init__(self):
        self._pending = ""
        self._holding = False
        self._held = ""

    def feed(self, text: str) -> str:
        """Add reply text; return what can be sent as content now."""
        if self._holding:
            self._held += text
            return ""
        self._pending += text
        found = self._pending.find(OPEN)
        if found >= 0:
            out, self._held, self._holding = self._pending[:found], self._pending[found:], True
            self._pending = ""
            return out
        # Hold back a tail that could be the start of the marker.
        keep = max((k for k in range(1, len(OPEN)) if self._pending.endswith(OPEN[:k])), default=0)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return out

    def held(self) -> str:
        """Everything not yet sent (the possible tool-call part of the reply)."""
        return self._held + self._pending
