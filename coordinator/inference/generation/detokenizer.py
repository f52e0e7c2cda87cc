"""Token ids -> streamed text deltas: complete UTF-8 only, stop strings cut and never shown.

Decoding the whole sequence at every step costs O(n) per token; instead, as in TGI's
``decode_token`` and vLLM's detokenizer, only a short window is decoded: the text of
``ids[prefix:]`` minus the text of ``ids[prefix:read]``. The window keeps enough left context for
tokenizers whose decoding of a token depends on its neighbour (SentencePiece's leading space). A
window that ends inside a multi-byte character (``\\ufffd``) is held until the next token.

Stop strings: text that might be the beginning of a stop string is held back, so that a client
never receives a part of a stop string that is later cut off.
"""

from __future__ import annotations

from typing import Any


class StreamingDetokenizer:
    """Turns one request's generated ids into deltas (see the module docstring)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.pending = ""  # decoded but not yet released (a possible stop-string start)
        self.text = ""  # released so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; return the text that may be released now ("" if none)."""
        return add_tokens([self], [token])[0]

    def _windows(self, token: int) -> tuple[list[int], list[int]]:
        """Append ``token``; the (before, after) windows to decode."""
        self.ids.append(token)
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def _advance(self, before: str, after: str) -> str:
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet, or a character split across tokens
        self.pending += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        window = self.text[-max(len(s) for s in self.stop) :] + self.pending
        cut = min((window.find(s) for s in self.stop if s in window), default=-1)
        if cut >= 0:  # a stop string is complete: release what comes before it, then stop
            released = len(window) - len(self.pending)  # the window's already-released head
            kept = window[released:cut] if cut > released else ""
            self.pending = ""
            self.stopped = True
            self.text += kept
            return kept
        hold = _longest_stop_prefix_suffix(window, self.stop)
        hold = min(hold, len(self.pending))
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation: release held text (no stop string completed)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.text += out
        return out


def add_tokens(detokenizers: list[StreamingDetokenizer], tokens: list[int]) -> list[str]:
    """One new token for each of several requests' detokenizers (all of one tokenizer): the
    releasable text of each. Their windows are decoded in one ``batch_decode`` call, since a
    decode call from Python costs more than the decoding itself when 32 streams step at once."""
    if not detokenizers:
        return []
    windows = [d._windows(t) for d, t in zip(detokenizers, tokens, strict=True)]
    texts = detokenizers[0].tokenizer.batch_decode(
        [w for pair in windows for w in pair], skip_special_tokens=True
    )
    return [d._advance(texts[2 * i], texts[2 * i + 1]) for i, d in enumerate(detokenizers)]


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
