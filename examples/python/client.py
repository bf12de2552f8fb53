"""Drive one workflow from Python on the generated stubs (``ewms.v1``): submit the text-transform
example, publish three lines, read the three outputs, finish the workflow.

Needs a running WMS with a TMS for location "local" (``ewms up``). Settings: EWMS_WMS_ADDRESS
(default 127.0.0.1:50051) and EWMS_TOKEN (default: the admin token ``ewms up`` wrote into its data
directory, ``ewms token create --role user --subject me`` makes another).

    python examples/python/client.py
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
from google.protobuf import json_format

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    queue_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE.parent / "text-transform" / "workflow.json"
LINES = ["hello", "event workflow", "management"]


def token() -> str:
    if os.environ.get("EWMS_TOKEN"):
        return os.environ["EWMS_TOKEN"]
    from services.auth import read_admin_token
    from services.config import default_data_dir

    found = read_admin_token(default_data_dir(os.environ))
    if not found:
        raise SystemExit("set EWMS_TOKEN (no local admin token found)")
    return found


async def main() -> None:
    address = os.environ.get("EWMS_WMS_ADDRESS", "127.0.0.1:50051")
    md = (("authorization", f"Bearer {token()}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)

        # The request JSON maps onto CreateWorkflowRequest field by field.
        request = json_format.Parse(
            WORKFLOW.read_text(), workflow_service_pb2.CreateWorkflowRequest()
        )
        created = await workflows.CreateWorkflow(request, metadata=md, timeout=30)
        workflow_id = created.workflow.workflow_id
        queues = {q.alias: q.queue_id for q in created.queues}
        print("workflow", workflow_id)

        await events.Publish(
            event_service_pb2.PublishRequest(
                queue_id=queues["lines"],
                events=[
                    queue_pb2.Event(payload=line.encode(), content_type="text/plain")
                    for line in LINES
                ],
            ),
            metadata=md,
            timeout=30,
        )

        outputs: list[str] = []
        while len(outputs) < len(LINES):
            got = await events.Receive(
                event_service_pb2.ReceiveRequest(
                    queue_id=queues["shouted"], max_events=10, wait_seconds=30
                ),
                metadata=md,
                timeout=60,
            )
            if not got.deliveries:
                raise SystemExit("no output within 30 s: is a TMS for 'local' running?")
            outputs += [d.event.payload.decode().strip() for d in got.deliveries]
            await events.Ack(
                event_service_pb2.AckRequest(
                    queue_id=queues["shouted"], ack_ids=[d.ack_id for d in got.deliveries]
                ),
                metadata=md,
                timeout=30,
            )
        print(json.dumps(sorted(outputs)))

        await workflows.FinishWorkflow(
            workflow_service_pb2.FinishWorkflowRequest(workflow_id=workflow_id),
            metadata=md,
            timeout=30,
        )
        print("finished", workflow_id)


if __name__ == "__main__":
    asyncio.run(main())
