"""pika's connection classes, changed only in how they write to the socket: one write per
message."""

from __future__ import annotations

from collections.abc import Sequence

from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils.io_services_utils import (
    _AsyncPlaintextTransport as _PlaintextTransport,
)


class _OneWritePerMessage:
    """pika hands the transport each frame of a message (method, header, body) separately, and
    the transport sends each with its own ``send()``; this joins them, so a published message costs
    one system call instead of three (on a loopback connection each one also runs the broker's
    side of TCP)."""

    def _output_marshaled_frames(self, marshaled_frames: Sequence[bytes]) -> None:
        if len(marshaled_frames) == 1:
            super()._output_marshaled_frames(marshaled_frames)  # type: ignore[misc]
            return
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)  # type: ignore[attr-defined]
        self.frames_sent += len(marshaled_frames)  # type: ignore[attr-defined]
        self._adapter_emit_data(data)  # type: ignore[attr-defined]


class _SelectConnection(_OneWritePerMessage, SelectConnection):  # type: ignore[misc]
    """pika's SelectConnection (run by an I/O thread), one write per message."""


class _AsyncioConnection(_OneWritePerMessage, AsyncioConnection):  # type: ignore[misc]
    """pika's AsyncioConnection (on the event loop), one write per message, sent at once.

    pika's transport never sends in ``write()``: it buffers, asks the loop to watch the socket
    for writability, sends on the next turn and stops watching -- two ``epoll_ctl`` calls and a
    loop turn per message. When nothing is buffered this sends straight away (as asyncio's own
    transports do) and hands the transport only what the socket did not take."""

    def _adapter_emit_data(self, data: bytes) -> None:
        transport = self._transport
        if (
            isinstance(transport, _PlaintextTransport)
            and transport._state == transport._STATE_ACTIVE
            and not transport.get_write_buffer_size()
        ):
            try:
                sent = transport._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport's own write path meets the error and reports it
            if sent == len(data):
                return
            data = data[sent:]
        super()._adapter_emit_data(data)
