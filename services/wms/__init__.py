"""The WMS: the public entry point and owner of all state."""

from services.wms.server import RunningWms, serve, start_wms

__all__ = ["RunningWms", "serve", "start_wms"]
