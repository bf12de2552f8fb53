"""EWMS services: the WMS, the TMS, the pilot and the event-queue clients, plus small shared
modules.

Layers, from the ground up: generated contracts (``ewms.v1``) → shared modules (``config``,
``logs``, ``auth``, ``ids``, ``errors``, ``sizes``) → event-queue clients (``events``) →
services (``wms``, ``tms``, ``pilot``) → ``cli``.
"""
