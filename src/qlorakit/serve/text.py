"""Stop strings on streamed text: hand out the text before the first stop, hold back a possible prefix.

For stop strings ``S`` and the text so far ``t``, the text that may be handed out is ``t`` up to the first
occurrence of any ``s in S`` (and then the request is finished), or, when none occurs yet, ``t`` without
its last ``max(len(s)) - 1`` characters (they may be the beginning of a stop string that the next token
completes). ``finish`` hands out what was held back once no more text will come.
"""

from __future__ import annotations


class StopScanner:
    """Feed text pieces; get the pieces that are safe to send, and whether a stop string was met."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything received
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add ``piece``; return the newly safe text (after a stop string: the text before it, then nothing)."""
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(cut)
        return self._emit(max(self.sent, len(self.text) - self.hold))

    def finish(self) -> str:
        """The held-back tail (nothing after a stop string)."""
        return "" if self.stopped else self._emit(len(self.text))

    @property
    def output(self) -> str:
        """The whole text handed out so far."""
        return self.text[: self.sent]

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece
