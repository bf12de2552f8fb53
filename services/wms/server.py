"""The WMS process: one grpc.aio server with the EWMS services, health and reflection, over the
SQLite store."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    queue_pb2,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import TokenAuthority, ensure_admin_token, load_or_create_secret
from services.config import WmsSettings
from services.errors import DataDirInUse, PortInUse
from services.oidc import OidcVerifier
from services.private_files import PRIVATE_FILE, private_dir
from services.wms.auth_interceptor import AuthInterceptor
from services.wms.control.activity import TaskActivity
from services.wms.control.overview import WorkflowsOverview
from services.wms.control.pilots import PilotRegistry, PilotService
from services.wms.control.tms import Dispatcher, DispatchSettings, TaskManagerService
from services.wms.control.watch import WatchHub
from services.wms.http.server import HttpDeps, HttpServer, start_http
from services.wms.metrics import RequestMetricsInterceptor, WmsMetrics
from services.wms.queues.broker import Broker
from services.wms.queues.embedded import EmbeddedBroker
from services.wms.queues.event_service import EventService
from services.wms.queues.manager import BACKENDS, QueueManager, public_amqp_address
from services.wms.store import Store
from services.wms.workflows import WorkflowService

log = structlog.get_logger(__name__)

SERVING_SERVICES = [
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    pilot_service_pb2.DESCRIPTOR.services_by_name["PilotService"].full_name,
    task_manager_service_pb2.DESCRIPTOR.services_by_name["TaskManagerService"].full_name,
]
# gRPC messages may carry one event of the largest allowed size plus this much else.
MESSAGE_OVERHEAD = 1024 * 1024
# Long-lived TMS and pilot streams: allow clients' keepalive pings (GRPC-PRACTICE.md).
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@dataclass
class RunningWms:
    """A started WMS: its server, store and bound port."""

    server: grpc.aio.Server
    store: Store
    port: int
    authority: TokenAuthority
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    queues: QueueManager
    pilots: PilotRegistry
    dispatcher: Dispatcher
    hub: WatchHub
    http: HttpServer
    # The data directory's lock (see lock_data_dir), released once the store is closed.
    lock_fd: int = -1

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: where local clients reach it."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The base URL of the HTTP face (REST gateway, OpenAPI, health, metrics)."""
        return self.http.url

    async def stop(self, grace: float | None = 5.0) -> None:
        """End the pilots' streams and commit their pending state, stop serving (in-flight RPCs
        get ``grace`` seconds), then close the store."""
        await self.health.enter_graceful_shutdown()
        await self.http.stop()
        await self.dispatcher.close()
        # Pilot streams never finish by themselves: end them rather than wait out the grace.
        await self.pilots.close()
        await self.server.stop(grace)
        await self.queues.close()
        await self.store.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


LOCK_FILE = "wms.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Hold the data directory's lock (``wms.lock``, an exclusive ``flock`` kept for the life of
    the returned descriptor, released by the kernel even on ``kill -9``), or raise DataDirInUse
    naming the directory and the holder's pid."""
    private_dir(data_dir)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(
            f"another WMS (pid {holder}) is serving from the data directory {data_dir}; stop it, "
            "or give this one another data directory (--data-dir or EWMS_DATA_DIR)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def start_wms(settings: WmsSettings) -> RunningWms:
    """Lock the data directory, open the store, create the auth secret and admin token if
    needed, and start serving."""
    lock_fd = lock_data_dir(settings.data_dir)
    try:
        wms = await _start_wms(settings)
    except BaseException:
        os.close(lock_fd)
        raise
    wms.lock_fd = lock_fd
    return wms


async def _start_wms(settings: WmsSettings) -> RunningWms:
    secret = load_or_create_secret(settings.data_dir)
    authority = TokenAuthority(secret, OidcVerifier.from_settings(settings))
    admin_token_path = ensure_admin_token(settings.data_dir, authority)
    metrics = WmsMetrics()
    store = await Store.open(settings.data_dir, metrics)
    queues: QueueManager | None = None
    pilots: PilotRegistry | None = None
    dispatcher: Dispatcher | None = None
    http: HttpServer | None = None
    started: grpc.aio.Server | None = None
    try:
        pilots = await PilotRegistry.open(store)
        brokers: dict[queue_pb2.QueueBackend.ValueType, Broker] = {
            queue_pb2.QUEUE_BACKEND_EMBEDDED: await EmbeddedBroker.open(
                store, metrics.events("embedded")
            )
        }
        if settings.queue_backend == "rabbitmq":
            from services.wms.queues.rabbitmq import RabbitBroker

            brokers[queue_pb2.QUEUE_BACKEND_RABBITMQ] = await RabbitBroker.open(
                settings, metrics.events("rabbitmq")
            )
        queues = QueueManager(
            store,
            brokers,
            BACKENDS[settings.queue_backend],
            settings.queue_retention_seconds,
            credential_grace_seconds=settings.queue_credential_grace_seconds,
        )
        limit = settings.max_event_bytes + MESSAGE_OVERHEAD
        options = [
            *SERVER_OPTIONS,
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # The port is ours alone: with gRPC's default SO_REUSEPORT a second WMS binds it too
            # and the kernel splits new connections between the two.
            ("grpc.so_reuseport", 0),
        ]
        # Metrics outermost: calls refused by authentication are counted too.
        interceptors = [RequestMetricsInterceptor(metrics), AuthInterceptor(authority)]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        dispatcher = Dispatcher(
            store,
            authority,
            settings.cluster_locations,
            pilots,
            DispatchSettings(
                location_max_workers=settings.location_max_workers,
                tms_action_retries=settings.tms_action_retries,
                tms_retry_delay=settings.tms_retry_delay,
            ),
        )
        activity = TaskActivity(
            settings.activity_max_task_runs,
            settings.activity_max_workflows,
            # Half the send limit: a snapshot's other fields (taskforces) have room to spare.
            max_message_bytes=limit // 2,
        )
        pilots.listen(activity.on_pilot_change)
        hub = WatchHub(store, queues, dispatcher.live, activity)
        dispatcher.listen(hub.taskforces_changed)
        workflows = WorkflowService(
            store,
            settings.cluster_locations,
            queues,
            pilots,
            dispatcher=dispatcher,
            hub=hub,
            overview=WorkflowsOverview(store, queues, hub, dispatcher.live),
        )
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(workflows, server)
        pilot_service_pb2_grpc.add_PilotServiceServicer_to_server(PilotService(pilots), server)
        task_manager_service_pb2_grpc.add_TaskManagerServiceServicer_to_server(
            TaskManagerService(dispatcher, settings.cluster_locations), server
        )
        events = EventService(store, queues, settings.max_event_bytes, hub.queues_changed)
        event_service_pb2_grpc.add_EventServiceServicer_to_server(events, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection(
            [*SERVING_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server
        )
        port = bind_port(server, settings.grpc_host, settings.grpc_port)
        workflows.queue_address = (
            public_amqp_address(settings.rabbitmq_url)
            if settings.queue_backend == "rabbitmq"
            else f"{settings.grpc_host}:{port}"
        )
        dispatcher.public_address = settings.public_address or public_address(
            settings.grpc_host, port
        )
        await server.start()
        started = server
        queues.start()
        dispatcher.start()
        http = await start_http(
            HttpDeps(
                settings=settings,
                authority=authority,
                servicers={SERVING_SERVICES[0]: workflows, SERVING_SERVICES[1]: events},
                store=store,
                queues=queues,
                pilots=pilots,
                dispatcher=dispatcher,
                hub=hub,
                metrics=metrics,
            )
        )
    except BaseException:
        if http is not None:
            await http.stop()
        if started is not None:
            await started.stop(0)
        if dispatcher is not None:
            await dispatcher.close()
        if pilots is not None:
            await pilots.close()
        if queues is not None:
            await queues.close()
        await store.close()
        raise
    for name in ["", *SERVING_SERVICES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "wms listening",
        grpc_host=settings.grpc_host,
        grpc_port=port,
        http_url=http.url,
        data_dir=str(settings.data_dir),
        admin_token_file=str(admin_token_path),
        cluster_locations=settings.cluster_locations.describe(),
        queue_backend=settings.queue_backend,
    )
    return RunningWms(
        server, store, port, authority, health_servicer, queues, pilots, dispatcher, hub, http
    )


def bind_port(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind ``host:port`` exclusively; PortInUse naming the address otherwise."""
    try:
        bound = int(server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:  # grpcio's "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise PortInUse(
            f"cannot listen on {host}:{port}: the address is in use (another WMS?) or not "
            "local; choose another with --port/EWMS_GRPC_PORT or stop the other process"
        )
    return bound


def public_address(host: str, port: int) -> str:
    """Where pilots reach a WMS bound to ``host``: this machine's name for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


async def serve(settings: WmsSettings) -> None:
    """Run the WMS until SIGINT or SIGTERM, then stop gracefully."""
    wms = await start_wms(settings)
    print(
        f"ewms wms serve: gRPC at {settings.grpc_host}:{wms.port}, HTTP at {wms.http_url} "
        f"(dashboard {wms.http_url}/, REST /v1, OpenAPI {wms.http_url}/v1/openapi.json, "
        f"API page {wms.http_url}/docs, "
        f"original API {wms.http_url}{settings.original_base_path}/v1); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("wms stopping")
    await wms.stop()
    log.info("wms stopped")


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(services: list[str], server: grpc.aio.Server) -> None:
    """Serve server reflection as ``grpc.reflection.v1`` (what buf curl and grpcurl ask for first)
    and ``grpc.reflection.v1alpha``. grpcio-reflection ships only v1alpha, but v1 is the same
    protocol renamed (identical messages and field numbers), so one v1alpha servicer answers both,
    and a renamed copy of its proto file lets clients describe the v1 service too."""
    add_reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer(
        [*services, reflection.SERVICE_NAME, REFLECTION_V1]
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def add_reflection_v1_descriptor() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` in the default pool (once): v1alpha's file
    under v1's name and package."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's java/go packages and its deprecation
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)
