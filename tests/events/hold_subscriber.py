"""A subscriber process for the kill -9 test: subscribes through the WMS, prints one JSON line per
delivery (event id, attempt) and never acks, until it is killed.

Usage: python -m tests.events.hold_subscriber grpc ADDRESS TOKEN QUEUE_ID PREFETCH
       python -m tests.events.hold_subscriber amqp AMQP_URL - QUEUE_ID PREFETCH
       python -m tests.events.hold_subscriber amqp-loop AMQP_URL - QUEUE_ID PREFETCH
"""

from __future__ import annotations

import asyncio
import json
import sys

from services.events.amqp import AmqpQueueClient
from services.events.client import QueueClient
from services.events.grpc_client import GrpcQueueClient


async def main(kind: str, address: str, token: str, queue_id: str, prefetch: int) -> None:
    client: QueueClient
    if kind == "grpc":
        client = GrpcQueueClient.connect(address, token)
    else:
        client = await AmqpQueueClient.connect(address, io_thread=kind != "amqp-loop")
    sub = await client.subscribe(queue_id, prefetch)
    async for delivery in sub:
        line = {"event_id": delivery.event.event_id, "attempt": delivery.event.attempt}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
