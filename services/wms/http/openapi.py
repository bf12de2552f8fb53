"""Placeholder, replaced in this change."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application, *args: object) -> None:
    """Register this part's routes."""
