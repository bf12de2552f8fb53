"""Builders of workflow requests for the WMS tests: a valid minimal request, changed in exactly the
way a test needs. Requests are built as the original's JSON and parsed like the API parses it."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from ewms.v1 import workflow_service_pb2
from tests.conftest import seed_request

IMAGE = "/cvmfs/icecube.opensciencegrid.org/containers/path/to/my-apptainer-container:1.2.3"


def worker_config(**overrides: Any) -> dict[str, Any]:
    """A complete worker_config (all six required keys, no condor_requirements)."""
    config: dict[str, Any] = {
        "do_transfer_worker_stdouterr": True,
        "max_worker_runtime": 600,
        "n_cores": 1,
        "priority": 99,
        "worker_disk": "512M",
        "worker_memory": "512M",
    }
    config.update(overrides)
    return config


def minimal_task(**overrides: Any) -> dict[str, Any]:
    """A valid task at "local" reading queue "in" and writing queue "out"."""
    task: dict[str, Any] = {
        "cluster_locations": ["local"],
        "input_queue_aliases": ["in"],
        "output_queue_aliases": ["out"],
        "task_image": IMAGE,
        "task_args": "cp {{INFILE}} {{OUTFILE}}",
        "worker_config": worker_config(),
    }
    task.update(overrides)
    return task


def workflow_json(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A workflow request's JSON: the given tasks (one minimal task if none), "in" and "out" as
    public queues, plus any other top-level fields."""
    body: dict[str, Any] = {
        "public_queue_aliases": ["in", "out"],
        "tasks": list(tasks) or [minimal_task()],
    }
    body.update(fields)
    return body


def parse(body: dict[str, Any]) -> workflow_service_pb2.CreateWorkflowRequest:
    """A request's JSON parsed into CreateWorkflowRequest, as the gateway and CLI parse it."""
    return json_format.ParseDict(body, workflow_service_pb2.CreateWorkflowRequest())


def workflow_request(
    *tasks: dict[str, Any], **fields: Any
) -> workflow_service_pb2.CreateWorkflowRequest:
    """``workflow_json(...)`` parsed into a CreateWorkflowRequest."""
    return parse(workflow_json(*tasks, **fields))


def seed() -> workflow_service_pb2.CreateWorkflowRequest:
    """The seed's example request, unchanged."""
    return parse(seed_request())
