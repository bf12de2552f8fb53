"""What the WMS sends down a long-lived bidirectional stream (a pilot's, a TMS's): messages queued
by whoever has something to say, then the stream's end, clean or with an error status."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

M = TypeVar("M")


class Outbox(Generic[M]):
    """The messages of one open stream, in order, and how it ends."""

    def __init__(self) -> None:
        self.ended = False
        self._queue: asyncio.Queue[M | Exception | None] = asyncio.Queue()

    def send(self, msg: M) -> None:
        """Queue a message down the stream (dropped once the stream ended)."""
        if not self.ended:
            self._queue.put_nowait(msg)

    def end(self, error: Exception | None = None) -> None:
        """End the stream after what is queued: cleanly, or with ``error``'s status."""
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(error)

    async def next(self) -> M | None:
        """The next message to send; None when the stream should end cleanly."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item
