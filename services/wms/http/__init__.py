"""The WMS's HTTP face: the REST gateway built from the ``google.api.http`` annotations, its
OpenAPI document, the original EWMS's REST dialect, health probes and Prometheus metrics — one
aiohttp application on the WMS's own event loop, calling the servicers in-process."""
