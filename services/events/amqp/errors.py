"""pika's errors and close reasons as :class:`~services.events.client.QueueError` s."""

from __future__ import annotations

import pika
import pika.exceptions

from services.events.client import QueueAccessDenied, QueueError, QueueNotFound


class _NothingSent(QueueError):
    """The publishing channel was already closed: none of the batch went out (safe to retry)."""


def broker_error(reason: BaseException, context: str = "") -> QueueError:
    """A pika exception (or close reason) as a QueueError: 403 → QueueAccessDenied, 404 →
    QueueNotFound."""
    if isinstance(reason, QueueError):
        return reason
    prefix = f"{context}: " if context else ""
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if isinstance(code, int):
        if code == 403:
            return QueueAccessDenied(f"{prefix}{text}")
        if code == 404:
            return QueueNotFound(f"{prefix}{text}")
        return QueueError(f"{prefix}RabbitMQ {code}: {text}")
    return QueueError(f"{prefix}{reason!r}")


def _connect_error(exc: BaseException, where: str, user: str) -> QueueError:
    """Why connecting failed, from pika's open error (possibly a workflow failure of attempts)."""
    last: BaseException = exc
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, list | tuple) and inner:
        last = inner[-1]
    auth = (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
        pika.exceptions.ProbableAccessDeniedError,
    )
    if isinstance(last, auth) or getattr(last, "reply_code", None) in (403, 530):
        return QueueAccessDenied(f"RabbitMQ at {where} refused user {user!r}: {last}")
    return QueueError(f"cannot connect to RabbitMQ at {where}: {last!r}")
