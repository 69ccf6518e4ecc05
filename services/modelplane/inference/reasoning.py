"""Thinking split from the answer, for models whose chat template uses <think>...</think>.

The thought goes to `reasoning_content`, never into the answer's text, and neither tag is ever sent:
text that may be the start of a tag is held back until the next piece shows whether it is one.
A template may open the thought itself (its generation prompt ends in "<think>"); the model's
output then starts inside it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_close(text: str) -> int:
    """Length of the longest end of `text` that begins "</think>" without completing it."""
    for n in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if text.endswith(CLOSE[:n]):
            return n
    return 0


class ReasoningSplitter:
    def __init__(self, prompt: str) -> None:
        self._thinking = prompt.rstrip().endswith(OPEN)
        self._started = self._thinking  # a thought opens only at the start of the answer
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text that is safe to send now."""
        text = self._held + text
        self._held = ""
        reasoning, answer = [], []
        while text:
            if not self._started:
                stripped = text.lstrip()
                if OPEN.startswith(stripped) and len(stripped) < len(OPEN):
                    self._held = text  # may still become "<think>"
                    break
                self._started = True
                if stripped.startswith(OPEN):
                    self._thinking = True
                    text = stripped[len(OPEN) :]
                continue
            if self._thinking:
                end = text.find(CLOSE)
                if end >= 0:
                    reasoning.append(text[:end])
                    text = text[end + len(CLOSE) :].lstrip("\n")
                    self._thinking = False
                    continue
                keep = _partial_close(text)
                reasoning.append(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
                break
            answer.append(text)
            break
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What was held back when the generation ended."""
        held, self._held = self._held, ""
        return (held, "") if self._thinking else ("", held)
