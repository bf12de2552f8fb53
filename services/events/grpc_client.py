"""``GrpcQueueClient``: event queues through the WMS's ``EventService`` (any backend).

Publishing splits large batches so every call stays under the gRPC message limit. A subscription is
one ``Subscribe`` stream: acks travel together in one message (those of one event-loop turn, and
with a prefetch of 4 or more those of up to ``ACK_LINGER_SECONDS``), and closing the stream (or
the process dying) hands unacked deliveries back to the queue at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from ewms.v1 import event_service_pb2, event_service_pb2_grpc, queue_pb2
from services.events.client import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    QueueAccessDenied,
    QueueClosed,
    QueueError,
    QueueNotFound,
    QueueUnavailable,
)

# A publish call carries at most this many payload bytes or events (beyond one large event).
BATCH_BYTES = 4 * 1024 * 1024
BATCH_EVENTS = 1000
MESSAGE_OVERHEAD = 1024 * 1024
# A subscription's acks wait at most this long for others to travel with (see ``ack``).
ACK_LINGER_SECONDS = 0.02
ACK_BATCH_MAX = 64
# Long-lived streams: keepalive pings so a dead WMS or network is noticed (GRPC-PRACTICE.md).
# A channel whose WMS went away tries to reconnect at most every 2 s (gRPC's default backoff grows
# to 120 s), so that calls work again within seconds of the WMS's return, however long it was down.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# The WMS is unreachable or stopped answering: retrying later may succeed.
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def channel_options(max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> list[tuple[str, int]]:
    """Channel options for event traffic: keepalive and message limits fitting one event."""
    limit = max_event_bytes + MESSAGE_OVERHEAD
    return [
        *CHANNEL_OPTIONS,
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]


def queue_error(exc: grpc.aio.AioRpcError, queue_id: str) -> QueueError:
    """The client exception for a failed call."""
    code = exc.code()
    text = f"{queue_id}: {exc.details()}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return QueueAccessDenied(text)
    if code == grpc.StatusCode.NOT_FOUND:
        return QueueNotFound(text)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return QueueClosed(text)
    if code in OUTAGE_CODES:
        return QueueUnavailable(f"{text} ({code.name})")
    return QueueError(f"{text} ({code.name})")


class GrpcSubscription:
    """A ``Subscribe`` stream (implements ``services.events.client.Subscription``)."""

    def __init__(
        self, call: Any, queue_id: str, prefetch: int, *, ack_linger: float | None = None
    ) -> None:
        self._call = call
        self._queue_id = queue_id
        self._prefetch = prefetch
        self._ack_linger = ACK_LINGER_SECONDS if ack_linger is None else ack_linger
        self._acks: list[str] = []
        self._outgoing: asyncio.Queue[event_service_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._sender = asyncio.create_task(self._send(), name=f"subscribe-send-{queue_id}")
        self._flush_scheduled = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def prefetch(self) -> int:
        """Maximum unacked deliveries held at once."""
        return self._prefetch

    @property
    def _ack_batch(self) -> int:
        """Acks sent at once without waiting for the linger: half the prefetch (at most
        ACK_BATCH_MAX; 1 below a prefetch of 4); with no linger, ACK_BATCH_MAX (one loop turn)."""
        if self._ack_linger <= 0:
            return ACK_BATCH_MAX
        prefetch = self._prefetch
        return max(1, min(prefetch // 2 if prefetch >= 4 else 1, ACK_BATCH_MAX))

    async def __aiter__(self) -> AsyncIterator[queue_pb2.Delivery]:
        while True:
            try:
                resp = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                if self._closed and exc.code() == grpc.StatusCode.CANCELLED:
                    return
                raise queue_error(exc, self._queue_id) from exc
            except asyncio.CancelledError:
                if self._closed:
                    return
                raise
            if resp is grpc.aio.EOF:
                return
            kind = resp.WhichOneof("kind")
            if kind == "delivery":
                yield resp.delivery
            elif kind == "batch":
                for delivery in resp.batch.deliveries:
                    yield delivery

    async def ack(self, *deliveries: queue_pb2.Delivery) -> None:
        """Ack; acks go together in one message: those of one loop turn, and with a prefetch of 4
        or more, those of up to the ack linger (``ACK_LINGER_SECONDS`` unless the client was told
        otherwise; 0: one loop turn) until half the prefetch (at most ``ACK_BATCH_MAX``) is
        waiting. The WMS then sends as many deliveries together in one message, and the subscriber
        still holds the other half to work on meanwhile."""
        self._acks.extend(d.ack_id for d in deliveries)
        if len(self._acks) >= self._ack_batch:
            self._flush_acks()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop = asyncio.get_running_loop()
            if self._ack_batch > 1 and self._ack_linger > 0:
                self._flush_timer = loop.call_later(self._ack_linger, self._flush_acks)
            else:
                loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._acks:
            ids, self._acks = self._acks, []
            self._outgoing.put_nowait(
                event_service_pb2.SubscribeRequest(ack=event_service_pb2.SubscribeAck(ack_ids=ids))
            )

    async def nack(
        self, delivery: queue_pb2.Delivery, error: str, *, dead_letter: bool = False
    ) -> None:
        """Nack: requeue, or dead-letter at once or at the last attempt."""
        self._flush_acks()
        self._outgoing.put_nowait(
            event_service_pb2.SubscribeRequest(
                nack=event_service_pb2.SubscribeNack(
                    ack_id=delivery.ack_id, error=error, dead_letter=dead_letter
                )
            )
        )

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` unacked deliveries from now on (``SubscribePrefetch``)."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if prefetch == self._prefetch:
            return
        self._prefetch = prefetch
        self._outgoing.put_nowait(
            event_service_pb2.SubscribeRequest(
                prefetch=event_service_pb2.SubscribePrefetch(prefetch=prefetch)
            )
        )

    async def pause(self) -> None:
        """Ask the WMS to send no new deliveries; acks and nacks still work."""
        self._flush_acks()
        self._outgoing.put_nowait(
            event_service_pb2.SubscribeRequest(pause=event_service_pb2.SubscribePause())
        )

    async def _send(self) -> None:
        while True:
            req = await self._outgoing.get()
            if req is None:
                return
            try:
                await self._call.write(req)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream is gone: reading raises why, and the WMS has put back every delivery
                # this stream held, so the acks and nacks still queued have nothing to settle.
                return

    async def close(self) -> None:
        """Send pending acks, end the stream; unacked deliveries go back to the queue."""
        if self._closed:
            return
        self._flush_acks()
        self._closed = True
        self._outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(self._sender, 10)
            await self._call.done_writing()
            # The server ends the stream once it has released what this subscriber held.
            while await asyncio.wait_for(self._call.read(), 10) is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
            pass
        finally:
            self._sender.cancel()
            self._call.cancel()

    async def __aenter__(self) -> GrpcSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class GrpcQueueClient:
    """Event queues through ``EventService`` (implements ``services.events.client.QueueClient``)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        timeout: float = 60.0,
        own_channel: bool = False,
        ack_linger: float | None = None,
    ) -> None:
        self._channel = channel
        self._ack_linger = ack_linger
        self._stub = event_service_pb2_grpc.EventServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._max_event_bytes = max_event_bytes
        self._timeout = timeout
        self._own_channel = own_channel

    @classmethod
    def connect(
        cls,
        address: str,
        token: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        ack_linger: float | None = None,
    ) -> GrpcQueueClient:
        """A client with its own channel to the WMS at ``address``; ``ack_linger``: how long its
        subscriptions' acks wait for others (None: ``ACK_LINGER_SECONDS``; see
        ``GrpcSubscription.ack``)."""
        channel = grpc.aio.insecure_channel(address, options=channel_options(max_event_bytes))
        return cls(
            channel,
            token,
            max_event_bytes=max_event_bytes,
            own_channel=True,
            ack_linger=ack_linger,
        )

    @property
    def stub(self) -> event_service_pb2_grpc.EventServiceStub:
        """The raw stub, for the RPCs without a wrapper here."""
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the token."""
        return self._metadata

    async def publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> list[str]:
        """Publish in batches that fit the message limit; returns all event ids in order."""
        for i, event in enumerate(events):
            if len(event.payload) > self._max_event_bytes:
                raise EventTooLarge(
                    f"event {i} of {queue_id}: payload is {len(event.payload)} bytes, over the "
                    f"limit of {self._max_event_bytes} bytes"
                )
        ids: list[str] = []
        batch: list[queue_pb2.Event] = []
        size = 0
        for event in events:
            if batch and (size + len(event.payload) > BATCH_BYTES or len(batch) >= BATCH_EVENTS):
                ids += await self._publish(queue_id, batch)
                batch, size = [], 0
            batch.append(event)
            size += len(event.payload)
        if batch:
            ids += await self._publish(queue_id, batch)
        return ids

    async def _publish(self, queue_id: str, events: list[queue_pb2.Event]) -> list[str]:
        try:
            resp = await self._stub.Publish(
                event_service_pb2.PublishRequest(queue_id=queue_id, events=events),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload" in (
                exc.details() or ""
            ):
                raise EventTooLarge(f"{queue_id}: {exc.details()}") from exc
            raise queue_error(exc, queue_id) from exc
        return list(resp.event_ids)

    async def subscribe(
        self, queue_id: str, prefetch: int, *, lease_seconds: int = 0
    ) -> GrpcSubscription:
        """Open a ``Subscribe`` stream; returns once the WMS confirmed it."""
        call = self._stub.Subscribe(metadata=self._metadata)
        try:
            # Writing fails too when the WMS is unreachable: the same error as reading.
            await call.write(
                event_service_pb2.SubscribeRequest(
                    open=event_service_pb2.SubscribeOpen(
                        queue_id=queue_id, prefetch=prefetch, lease_seconds=lease_seconds
                    )
                )
            )
            first = await asyncio.wait_for(call.read(), self._timeout)
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise queue_error(exc, queue_id) from exc
        except asyncio.InvalidStateError:
            # The stream ended before the open could be written: its status says why.
            ended = grpc.aio.AioRpcError(
                await call.code(),
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
            )
            raise queue_error(ended, queue_id) from None
        except TimeoutError:
            call.cancel()
            raise QueueUnavailable(
                f"{queue_id}: the WMS did not confirm the subscription in {self._timeout:g} s"
            ) from None
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "opened":
            call.cancel()
            raise QueueError(f"{queue_id}: the WMS did not confirm the subscription")
        return GrpcSubscription(call, queue_id, first.opened.prefetch, ack_linger=self._ack_linger)

    async def stats(self, queue_id: str) -> queue_pb2.QueueStats:
        """The queue's counters."""
        try:
            stats: queue_pb2.QueueStats = await self._stub.GetQueueStats(
                event_service_pb2.GetQueueStatsRequest(queue_id=queue_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise queue_error(exc, queue_id) from exc
        return stats

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._own_channel:
            await self._channel.close()
