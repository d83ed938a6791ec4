# SPDX-License-Identifier: Apache-2.0
"""A progress line on stderr without a dependency: rewritten in place on a terminal, one line per
finished step otherwise (CI logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`total` units of work (timed rounds); `advance()` after each, `note()` to print a line
    without garbling the bar."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total = max(1, total)
        self.done = 0
        self.label = ""
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()
        self._last_line = 0.0

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw(force=True)

    def advance(self, units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        self._draw()

    def note(self, text: str) -> None:
        """Print `text` (to stdout) above the bar."""
        self._clear()
        print(text, flush=True)
        if self.tty:
            self._draw(force=True)

    def close(self) -> None:
        self._clear()
        elapsed = time.perf_counter() - self.start
        print(f"done in {_clock(elapsed)}", file=self.stream, flush=True)

    def _line(self) -> str:
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = f"eta {_clock(elapsed / frac * (1 - frac))}" if self.done else "eta ?"
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {frac:4.0%} {_clock(elapsed)} {eta}  {self.label}"

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r\033[K" + self._line())
            self.stream.flush()
        elif force or now - self._last_line > 30:  # a log gets a line per step, or every 30 s
            print(self._line(), file=self.stream, flush=True)
            self._last_line = now

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}:{s:02d}"
