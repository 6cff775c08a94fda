"""Terminal chat: multi-turn history, a system prompt, commands, and tokens printed as they are generated.

Reads one user turn per line from stdin (line editing through ``readline`` on a terminal), so it
works the same typed by hand, piped, or driven through a pseudo-terminal.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from npu_recipes.infer import generation
from npu_recipes.infer.loading import LoadedModel

PROMPT = ">>> "
HELP = (
    "commands: /clear forgets the conversation, /system TEXT sets the system prompt (and clears), "
    "/quit or /exit (or Ctrl-D) ends the chat"
)


class Conversation:
    """The turns so far, with the optional system prompt first."""

    def __init__(self, system: Optional[str] = None):
        self.system = system
        self.turns: List[generation.Messages] = []

    def messages(self, user_text: str) -> generation.Messages:
        """The history plus a new user turn, as the model is prompted with it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m for turn in self.turns for m in turn] + [{"role": "user", "content": user_text}]

    def add(self, user_text: str, reply: str) -> None:
        self.turns.append([{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}])

    def clear(self) -> None:
        self.turns.clear()


def _say(text: str) -> None:
    print(text, flush=True)


def run(loaded: LoadedModel, config, system: Optional[str] = None) -> int:
    """Chat on stdin/stdout until ``/quit``, ``/exit`` or end of input; returns the number of replies.

    Each reply is streamed to stdout token by token (transformers ``TextStreamer``) and then kept
    in the history, so the next turn sees the whole conversation. Ctrl-C during a reply stops that
    reply (it is not added to the history); Ctrl-C at the prompt ends the chat.

    Args:
        config: the ``GenerationConfig`` to generate with (:func:`generation.generation_config`).
        system: the initial system prompt (``infer.system``).
    """
    from transformers import TextStreamer

    if sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    conversation = Conversation(system)
    replies = 0
    adapters = f" + {', '.join(str(a.path) for a in loaded.adapters)}" if loaded.adapters else ""
    _say(f"chatting with {loaded.base.name_or_path}{adapters}\n{HELP}")
    while True:
        try:
            text = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            _say("")
            return replies
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return replies
        if text == "/clear":
            conversation.clear()
            _say("(conversation cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            conversation.system = text[len("/system"):].strip() or None
            conversation.clear()
            _say(f"(system prompt {'set' if conversation.system else 'removed'}; conversation cleared)")
            continue
        if text.startswith("/"):
            _say(f"unknown command {text.split()[0]!r}; {HELP}")
            continue
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = generation.generate(loaded, [conversation.messages(text)], config, streamer=streamer)[0]
        except KeyboardInterrupt:
            _say("\n(reply interrupted; not kept)")
            continue
        conversation.add(text, reply.text)
        replies += 1
