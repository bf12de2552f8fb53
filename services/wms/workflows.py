"""WorkflowService: the workflow lifecycle. Each RPC checks the caller, validates, then runs one
store transaction; ownership is enforced in the queries themselves (others' objects are
NOT_FOUND)."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from ewms.v1 import (
    queue_pb2,
    taskforce_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services import ids
from services.auth import Principal, current_principal
from services.config import ClusterLocations
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
    grpc_errors,
    quoted,
)
from services.events.client import DEFAULT_MAX_ATTEMPTS
from services.wms import limits
from services.wms.control.overview import WorkflowsOverview, selection_of
from services.wms.control.phases import log_phase, now_ts
from services.wms.control.pilots import PilotRegistry, deactivation_command
from services.wms.control.tms import Dispatcher
from services.wms.control.watch import WatchHub
from services.wms.pagination import page_of
from services.wms.queues.manager import QueueManager
from services.wms.store import (
    QUEUES,
    TASK_DIRECTIVES,
    TASKFORCES,
    WORKFLOWS,
    M,
    Store,
    Table,
    Tx,
)
from services.wms.validation import (
    MAX_WORKFLOW_PRIORITY,
    n_workers_rule,
    require_fields,
    validate_create_workflow,
)

Phase = taskforce_pb2.TaskforcePhase
Ctx = Any  # grpc.aio.ServicerContext; grpc ships no type information

# Phases a taskforce leaves for CANCELLED when deactivated: it was never submitted.
NOT_YET_SUBMITTED = (
    Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION,
    Phase.TASKFORCE_PHASE_PRE_LAUNCH,
    Phase.TASKFORCE_PHASE_PENDING_STARTER,
)
# "Ending or finished" phases (the original's term): deactivation leaves them alone.
ENDING = (
    Phase.TASKFORCE_PHASE_PENDING_STOPPER,
    Phase.TASKFORCE_PHASE_CONDOR_RM,
    Phase.TASKFORCE_PHASE_CONDOR_COMPLETE,
    Phase.TASKFORCE_PHASE_CANCELLED,
)
SOURCE_USER = "User"


def _owner_filter(principal: Principal) -> str | None:
    """Owner to restrict queries to: the caller, unless an admin."""
    return None if principal.is_admin else principal.subject


def _listed_owner(principal: Principal, requested: str) -> str | None:
    """Whose workflows a list or overview shows: a user's own (PERMISSION_DENIED for another
    owner); for an admin, the requested owner's, or everyone's (None)."""
    if principal.is_admin:
        return requested or None
    if requested and requested != principal.subject:
        raise PermissionDenied("only admins may list other owners' workflows")
    return principal.subject


def build_workflow(
    req: workflow_service_pb2.CreateWorkflowRequest,
    *,
    owner: str,
    when: timestamp_pb2.Timestamp,
    queue_backend: queue_pb2.QueueBackend.ValueType,
    queue_address: str,
) -> workflow_service_pb2.CreateWorkflowResponse:
    """The objects of a validated, normalized request: workflow, task directives, one taskforce per
    task and location (in pre-mq-activation), one queue per distinct alias."""
    wf = workflow_pb2.Workflow(
        workflow_id=ids.workflow_id(when.seconds),
        owner=owner,
        priority=req.priority,
        timestamp=when,
        public_queue_aliases=req.public_queue_aliases,
    )
    resp = workflow_service_pb2.CreateWorkflowResponse(workflow=wf)
    public = set(req.public_queue_aliases)
    queues: dict[str, queue_pb2.Queue] = {}
    for task in req.tasks:
        for alias in [*task.input_queue_aliases, *task.output_queue_aliases]:
            if alias not in queues:
                queues[alias] = resp.queues.add(
                    queue_id=ids.queue_id(wf.workflow_id),
                    workflow_id=wf.workflow_id,
                    alias=alias,
                    public=alias in public,
                    backend=queue_backend,
                    address=queue_address,
                    max_attempts=DEFAULT_MAX_ATTEMPTS,
                )
        for alias in task.input_queue_aliases:
            queues[alias].max_attempts = task.max_attempts
    for task in req.tasks:
        td = resp.task_directives.add(
            task_id=ids.task_id(wf.workflow_id),
            workflow_id=wf.workflow_id,
            cluster_locations=task.cluster_locations,
            task_image=task.task_image,
            task_args=task.task_args,
            task_env=task.task_env,
            init_image=task.init_image,
            init_args=task.init_args,
            init_env=task.init_env,
            input_queues=[queues[a].queue_id for a in task.input_queue_aliases],
            output_queues=[queues[a].queue_id for a in task.output_queue_aliases],
            timestamp=when,
        )
        for location in task.cluster_locations:
            tf = resp.taskforces.add(
                taskforce_uuid=ids.taskforce_uuid(td.task_id),
                task_id=td.task_id,
                workflow_id=wf.workflow_id,
                timestamp=when,
                priority=wf.priority,
                cluster_location=location,
                n_workers=task.n_workers,
                pilot_config=task.pilot_config,
                worker_config=task.worker_config,
            )
            log_phase(
                tf,
                Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION,
                ok=True,
                source=SOURCE_USER,
                context="created with the workflow",
                when=when,
            )
    return resp


def deactivate(
    tx: Tx,
    workflow_id: str,
    owner: str | None,
    kind: workflow_pb2.Deactivation.ValueType,
    when: timestamp_pb2.Timestamp,
) -> workflow_service_pb2.DeactivateWorkflowResponse:
    """Deactivate a workflow and stop its taskforces: submitted ones go to pending-stopper (their
    TMS removes the cluster), never-submitted ones to cancelled, ending ones get a failed log
    entry."""
    wf = tx.get(WORKFLOWS, workflow_id, owner)
    if wf is None:
        raise NotFound(f"workflow {workflow_id!r} not found")
    if wf.deactivated:
        state = workflow_pb2.Deactivation.Name(wf.deactivated).removeprefix("DEACTIVATION_")
        raise FailedPrecondition(
            f"workflow {workflow_id} is already deactivated ({state} at "
            f"{wf.deactivated_ts.ToJsonString()})"
        )
    wf.deactivated = kind
    wf.deactivated_ts.CopyFrom(when)
    tx.update(WORKFLOWS, wf)
    reason = f"workflow {workflow_pb2.Deactivation.Name(kind).removeprefix('DEACTIVATION_')}"
    n = 0
    for _, tf in tx.select(TASKFORCES, [("workflow_id = ?", workflow_id)]):
        if tf.phase in NOT_YET_SUBMITTED:
            target, ok, n = Phase.TASKFORCE_PHASE_CANCELLED, True, n + 1
            context = f"{reason} before the taskforce was submitted"
        elif tf.phase in ENDING:
            target, ok = Phase.TASKFORCE_PHASE_PENDING_STOPPER, False
            context = f"{reason}, but the taskforce is already {Phase.Name(tf.phase)}"
        else:
            target, ok, n = Phase.TASKFORCE_PHASE_PENDING_STOPPER, True, n + 1
            context = reason
        log_phase(tf, target, ok=ok, source=SOURCE_USER, context=context, when=when)
        tx.update(TASKFORCES, tf)
    return workflow_service_pb2.DeactivateWorkflowResponse(
        workflow_id=workflow_id, n_taskforces=n, workflow=wf
    )


class WorkflowService(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """The users' API on the WMS."""

    def __init__(
        self,
        store: Store,
        locations: ClusterLocations,
        queues: QueueManager,
        pilots: PilotRegistry,
        *,
        dispatcher: Dispatcher | None = None,
        hub: WatchHub | None = None,
        overview: WorkflowsOverview | None = None,
    ) -> None:
        self._store = store
        self._locations = locations
        self._queues = queues
        self._pilots = pilots
        self._dispatcher = dispatcher
        self._hub = hub
        self._overview = overview
        # Where clients reach embedded queues; set by the server once its port is bound.
        self.queue_address = ""

    @grpc_errors
    async def CreateWorkflow(
        self, request: workflow_service_pb2.CreateWorkflowRequest, context: Ctx
    ) -> workflow_service_pb2.CreateWorkflowResponse:
        principal = current_principal()
        size = request.ByteSize()
        req = await limits.off_loop_if_large(
            size, validate_create_workflow, request, self._locations
        )
        resp = await limits.off_loop_if_large(
            size,
            build_workflow,
            req,
            owner=principal.subject,
            when=now_ts(),
            queue_backend=self._queues.default_backend,
            queue_address=self.queue_address,
        )
        # The broker's queues exist before the workflow does (creating them is idempotent).
        await self._queues.provision(resp.workflow.workflow_id, resp.queues)

        def insert(tx: Tx) -> None:
            owner, created = principal.subject, resp.workflow.timestamp.ToNanoseconds() / 1e9
            tx.insert(WORKFLOWS, resp.workflow, owner=owner)
            for q in resp.queues:
                tx.insert(QUEUES, q, owner=owner, created=created)
            for td in resp.task_directives:
                tx.insert(TASK_DIRECTIVES, td, owner=owner)
            for tf in resp.taskforces:
                tx.insert(TASKFORCES, tf, owner=owner)

        await self._store.run(insert)
        if self._hub is not None:
            self._hub.workflow_changed(resp.workflow.workflow_id)  # a new row for WatchWorkflows
        if self._dispatcher is not None:
            self._dispatcher.wake()
        return resp

    @grpc_errors
    async def GetWorkflow(
        self, request: workflow_service_pb2.GetWorkflowRequest, context: Ctx
    ) -> workflow_pb2.Workflow:
        limits.check(request)
        require_fields(workflow_id=request.workflow_id)
        owner = _owner_filter(current_principal())
        wf = await self._store.run(
            lambda tx: tx.get(WORKFLOWS, request.workflow_id, owner), write=False
        )
        if wf is None:
            raise NotFound(f"workflow {request.workflow_id!r} not found")
        return wf

    @grpc_errors
    async def ListWorkflows(
        self, request: workflow_service_pb2.ListWorkflowsRequest, context: Ctx
    ) -> workflow_service_pb2.ListWorkflowsResponse:
        limits.check(request)
        owner = _listed_owner(current_principal(), request.owner)
        conditions: list[tuple[str, object]] = []
        if owner:
            conditions.append(("owner = ?", owner))
        if request.state:
            conditions.append(("state = ?", int(request.state)))
        if request.HasField("created_after"):
            conditions.append(("created >= ?", request.created_after.ToNanoseconds() / 1e9))
        if request.HasField("created_before"):
            conditions.append(("created < ?", request.created_before.ToNanoseconds() / 1e9))
        items, token = await self._page(
            WORKFLOWS, conditions, request.page_size, request.page_token
        )
        return workflow_service_pb2.ListWorkflowsResponse(workflows=items, next_page_token=token)

    @grpc_errors
    async def AbortWorkflow(
        self, request: workflow_service_pb2.AbortWorkflowRequest, context: Ctx
    ) -> workflow_service_pb2.DeactivateWorkflowResponse:
        limits.check(request)
        return await self._deactivate(request.workflow_id, workflow_pb2.DEACTIVATION_ABORTED)

    @grpc_errors
    async def FinishWorkflow(
        self, request: workflow_service_pb2.FinishWorkflowRequest, context: Ctx
    ) -> workflow_service_pb2.DeactivateWorkflowResponse:
        limits.check(request)
        return await self._deactivate(request.workflow_id, workflow_pb2.DEACTIVATION_FINISHED)

    async def _deactivate(
        self, workflow_id: str, kind: workflow_pb2.Deactivation.ValueType
    ) -> workflow_service_pb2.DeactivateWorkflowResponse:
        require_fields(workflow_id=workflow_id)
        owner = _owner_filter(current_principal())
        when = now_ts()

        def run(tx: Tx) -> tuple[workflow_service_pb2.DeactivateWorkflowResponse, list[str]]:
            resp = deactivate(tx, workflow_id, owner, kind, when)
            rows = tx.sql.execute(
                "SELECT taskforce_uuid FROM taskforces WHERE workflow_id = ? ORDER BY seq",
                (workflow_id,),
            )
            return resp, [uuid for (uuid,) in rows]

        resp, taskforce_uuids = await self._store.run(run)
        self._queues.workflow_ended()
        if self._hub is not None:
            self._hub.workflow_changed(workflow_id, all_taskforces=True)
        if self._dispatcher is not None:
            self._dispatcher.wake()
        # Finished: pilots drain (finish what they hold); aborted: they stop now.
        command = deactivation_command(kind)
        if command is not None:
            for uuid in taskforce_uuids:
                self._pilots.command(uuid, command)
        return resp

    @grpc_errors
    async def WatchWorkflow(
        self, request: workflow_service_pb2.WatchWorkflowRequest, context: Ctx
    ) -> Any:
        limits.check(request)
        require_fields(workflow_id=request.workflow_id)
        if self._hub is None:
            raise Unimplemented("this WMS has no watch hub")
        owner = _owner_filter(current_principal())
        async for msg in self._hub.watch(
            request.workflow_id, owner, include_task_activity=request.include_task_activity
        ):
            yield msg

    @grpc_errors
    async def WatchWorkflows(
        self, request: workflow_service_pb2.WatchWorkflowsRequest, context: Ctx
    ) -> Any:
        limits.check(request)
        owner = _listed_owner(current_principal(), request.owner)
        selection = selection_of(request, owner)
        if self._overview is None:
            raise Unimplemented("this WMS has no workflows overview")
        async for msg in self._overview.watch(selection):
            yield msg

    @grpc_errors
    async def GetTaskDirective(
        self, request: workflow_service_pb2.GetTaskDirectiveRequest, context: Ctx
    ) -> workflow_pb2.TaskDirective:
        limits.check(request)
        require_fields(task_id=request.task_id)
        owner = _owner_filter(current_principal())
        td = await self._store.run(
            lambda tx: tx.get(TASK_DIRECTIVES, request.task_id, owner), write=False
        )
        if td is None:
            raise NotFound(f"task directive {request.task_id!r} not found")
        return td

    @grpc_errors
    async def ListTaskDirectives(
        self, request: workflow_service_pb2.ListTaskDirectivesRequest, context: Ctx
    ) -> workflow_service_pb2.ListTaskDirectivesResponse:
        limits.check(request)
        conditions = self._visible(current_principal(), workflow_id=request.workflow_id)
        items, token = await self._page(
            TASK_DIRECTIVES, conditions, request.page_size, request.page_token
        )
        return workflow_service_pb2.ListTaskDirectivesResponse(
            task_directives=items, next_page_token=token
        )

    @grpc_errors
    async def AddWorkers(
        self, request: workflow_service_pb2.AddWorkersRequest, context: Ctx
    ) -> taskforce_pb2.Taskforce:
        limits.check(request)
        violations: list[tuple[str, str]] = []
        if not request.task_id:
            violations.append(("task_id", "required"))
        location = self._locations.resolve(request.cluster_location)
        if not request.cluster_location:
            violations.append(("cluster_location", "required"))
        elif location is None:
            violations.append(
                (
                    "cluster_location",
                    f"unknown cluster location {quoted(request.cluster_location)}; "
                    f"known: {self._locations.describe()}",
                )
            )
        if not 1 <= request.n_workers <= limits.MAX_N_WORKERS:
            violations.append(("n_workers", n_workers_rule(request.n_workers)))
        if violations:
            raise InvalidArgument(violations)
        assert location is not None
        principal = current_principal()
        owner = _owner_filter(principal)
        when = now_ts()

        def add(tx: Tx) -> taskforce_pb2.Taskforce:
            td = tx.get(TASK_DIRECTIVES, request.task_id, owner)
            if td is None:
                raise NotFound(f"task directive {request.task_id!r} not found")
            wf = tx.get(WORKFLOWS, td.workflow_id)
            assert wf is not None
            if wf.deactivated:
                raise FailedPrecondition(
                    f"workflow {wf.workflow_id} is deactivated; no workers can be added"
                )
            siblings = [
                tf for _, tf in tx.select(TASKFORCES, [("workflow_id = ?", wf.workflow_id)])
            ]
            template = next(tf for tf in siblings if tf.task_id == td.task_id)
            tf = taskforce_pb2.Taskforce(
                taskforce_uuid=ids.taskforce_uuid(td.task_id),
                task_id=td.task_id,
                workflow_id=wf.workflow_id,
                timestamp=when,
                # Above any first-launch priority, so added workers start ahead of the queue.
                priority=wf.priority + MAX_WORKFLOW_PRIORITY,
                cluster_location=location,
                n_workers=request.n_workers,
                pilot_config=template.pilot_config,
                worker_config=template.worker_config,
            )
            context = f"created by add-workers ({principal.role.value} {principal.subject})"
            log_phase(
                tf,
                Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION,
                ok=True,
                source=SOURCE_USER,
                context=context,
                when=when,
            )
            if any(s.phase != Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION for s in siblings):
                log_phase(
                    tf,
                    Phase.TASKFORCE_PHASE_PRE_LAUNCH,
                    ok=True,
                    source=SOURCE_USER,
                    context="auto-advanced: the workflow's queues are already activated",
                    when=when,
                )
            tx.insert(TASKFORCES, tf, owner=wf.owner)
            return tf

        tf = await self._store.run(add)
        if self._hub is not None:
            self._hub.taskforces_changed(tf.workflow_id, [tf.taskforce_uuid])
        if self._dispatcher is not None:
            self._dispatcher.wake()
        return tf

    @grpc_errors
    async def GetTaskforce(
        self, request: workflow_service_pb2.GetTaskforceRequest, context: Ctx
    ) -> taskforce_pb2.Taskforce:
        limits.check(request)
        require_fields(taskforce_uuid=request.taskforce_uuid)
        owner = _owner_filter(current_principal())
        tf = await self._store.run(
            lambda tx: tx.get(TASKFORCES, request.taskforce_uuid, owner), write=False
        )
        if tf is None:
            raise NotFound(f"taskforce {request.taskforce_uuid!r} not found")
        return tf

    @grpc_errors
    async def ListTaskforces(
        self, request: workflow_service_pb2.ListTaskforcesRequest, context: Ctx
    ) -> workflow_service_pb2.ListTaskforcesResponse:
        limits.check(request)
        location = ""
        if request.cluster_location:
            resolved = self._locations.resolve(request.cluster_location)
            if resolved is None:
                raise InvalidArgument(
                    [
                        (
                            "cluster_location",
                            f"unknown cluster location {quoted(request.cluster_location)}; "
                            f"known: {self._locations.describe()}",
                        )
                    ]
                )
            location = resolved
        conditions = self._visible(
            current_principal(),
            workflow_id=request.workflow_id,
            task_id=request.task_id,
            cluster_location=location,
            phase=int(request.phase),
        )
        items, token = await self._page(
            TASKFORCES, conditions, request.page_size, request.page_token
        )
        return workflow_service_pb2.ListTaskforcesResponse(taskforces=items, next_page_token=token)

    @grpc_errors
    async def ListQueues(
        self, request: workflow_service_pb2.ListQueuesRequest, context: Ctx
    ) -> workflow_service_pb2.ListQueuesResponse:
        limits.check(request)
        require_fields(workflow_id=request.workflow_id)
        owner = _owner_filter(current_principal())

        def queues(tx: Tx) -> list[queue_pb2.Queue] | None:
            if tx.get(WORKFLOWS, request.workflow_id, owner) is None:
                return None
            return [q for _, q in tx.select(QUEUES, [("workflow_id = ?", request.workflow_id)])]

        found = await self._store.run(queues, write=False)
        if found is None:
            raise NotFound(f"workflow {request.workflow_id!r} not found")
        return workflow_service_pb2.ListQueuesResponse(queues=found)

    async def _page(
        self, table: Table[M], conditions: list[tuple[str, object]], page_size: int, token: str
    ) -> tuple[list[M], str]:
        """One page of a list: the objects matching ``conditions`` and the next page's token."""
        page = page_of(page_size, token, conditions)
        rows = await self._store.run(
            lambda tx: tx.select(table, conditions, after_seq=page.after_seq, limit=page.size),
            write=False,
        )
        return [m for _, m in rows], page.next_token(rows[-1][0] if rows else None, len(rows))

    @staticmethod
    def _visible(principal: Principal, **equal: str | int) -> list[tuple[str, object]]:
        """Equality conditions for the non-empty filters, plus the caller's ownership."""
        conditions: list[tuple[str, object]] = [(f"{k} = ?", v) for k, v in equal.items() if v]
        owner = _owner_filter(principal)
        if owner is not None:
            conditions.append(("owner = ?", owner))
        return conditions
