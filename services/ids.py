"""Object ids. They are hierarchical, like the original's: a child's id embeds its parent's, so the
workflow of any task, taskforce or queue can be read from the string."""

from __future__ import annotations

import secrets
import time


def _token() -> str:
    return secrets.token_hex(4)


def workflow_id(now: float | None = None) -> str:
    """``WF-<hex epoch seconds>-<8 hex>``."""
    return f"WF-{int(now if now is not None else time.time()):x}-{_token()}"


def task_id(workflow: str) -> str:
    """``TK-<workflow id without WF->-<8 hex>``."""
    return f"TK-{workflow.removeprefix('WF-')}-{_token()}"


def taskforce_uuid(task: str) -> str:
    """``TF-<task id without TK->-<8 hex>``."""
    return f"TF-{task.removeprefix('TK-')}-{_token()}"


def queue_id(workflow: str) -> str:
    """``Q-<workflow id without WF->-<8 hex>``."""
    return f"Q-{workflow.removeprefix('WF-')}-{_token()}"


def event_id() -> str:
    """``EV-<32 hex>``."""
    return f"EV-{secrets.token_hex(16)}"
