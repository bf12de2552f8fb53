"""Placeholder, replaced in this change."""

from __future__ import annotations

from aiohttp import web


def install(app: web.Application) -> None:
    """Register /metrics and the request middleware."""
