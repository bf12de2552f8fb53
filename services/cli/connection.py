"""How the CLI reaches the WMS: address and token discovery, and one blocking channel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from ewms.v1 import workflow_service_pb2_grpc
from services.auth import read_admin_token
from services.config import ClientSettings

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})
RPC_TIMEOUT = 30.0
T = TypeVar("T")


def is_local(address: str) -> bool:
    """Whether a WMS address (``host:port``, ``[v6]:port``, ``unix:path``) is on this machine."""
    if address.startswith("unix:"):
        return True
    address = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("["):
        host = address[1 : address.find("]")]
    elif address.count(":") == 1:
        host = address.split(":")[0]
    else:
        host = address
    return host in LOCAL_HOSTS


def resolve_token(explicit: str, settings: ClientSettings, address: str, data_dir: Path) -> str:
    """--token, else EWMS_TOKEN, else (for a WMS on this machine) the local admin token."""
    if explicit:
        return explicit
    if settings.token:
        return settings.token
    if is_local(address):
        return read_admin_token(data_dir) or ""
    return ""


@dataclass
class Connection:
    """A channel to the WMS with the caller's token attached to every call."""

    address: str
    token: str

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(self.address)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self._channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def call(self, method: Callable[..., T], request: object) -> T:
        """Call a unary RPC of a stub with the caller's token and the CLI's deadline."""
        return method(request, metadata=self.metadata, timeout=RPC_TIMEOUT)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
