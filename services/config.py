"""Settings, read once from the environment (``EWMS_*``) into typed objects. Every variable is in
the README's configuration table."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DEFAULT_ORIGINAL_BASE_PATH = "/original"
DEFAULT_AUTH_ROLE_CLAIM = "realm_access.roles"
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_RABBITMQ_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672"
DEFAULT_QUEUE_RETENTION = 7 * 24 * 3600
DEFAULT_CREDENTIAL_GRACE = 5 * 60
# The task activity window (services/wms/control/activity.py): task runs kept per workflow, and
# workflows kept.
DEFAULT_ACTIVITY_MAX_TASK_RUNS = 5000
DEFAULT_ACTIVITY_MAX_WORKFLOWS = 16
QUEUE_BACKENDS = ("embedded", "rabbitmq")
DEFAULT_WMS_ADDRESS = f"localhost:{DEFAULT_GRPC_PORT}"
_LOCATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable and the rule."""


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``EWMS_DATA_DIR``, else the user's data directory (e.g. ``~/.local/share/ewms``)."""
    value = env.get("EWMS_DATA_DIR", "").strip()
    return Path(value).expanduser() if value else Path(platformdirs.user_data_dir("ewms"))


@dataclass(frozen=True)
class ClusterLocations:
    """Known cluster locations: canonical names, plus aliases that resolve to them."""

    names: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ClusterLocations:
        """Parse ``EWMS_CLUSTER_LOCATIONS``: comma-separated entries, each a name (``osg``) or an
        alias pointing at a name (``sub-2=osg``). Default ``local``."""
        names: list[str] = []
        aliases: dict[str, str] = {}
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            alias, _, target = entry.partition("=")
            alias, target = alias.strip(), target.strip()
            for part in (alias, target) if target else (alias,):
                if not _LOCATION_NAME.match(part):
                    raise ConfigError(
                        f"EWMS_CLUSTER_LOCATIONS: {part!r} is not a valid location name "
                        "(letters, digits, '.', '_', '-')"
                    )
            if target:
                aliases[alias] = target
            elif alias not in names:
                names.append(alias)
        if not names:
            raise ConfigError("EWMS_CLUSTER_LOCATIONS: at least one location name is required")
        for alias, target in aliases.items():
            if target not in names:
                raise ConfigError(
                    f"EWMS_CLUSTER_LOCATIONS: alias {alias!r} points at unknown location {target!r}"
                )
            if alias in names:
                raise ConfigError(
                    f"EWMS_CLUSTER_LOCATIONS: {alias!r} is both a location and an alias"
                )
        return cls(tuple(names), aliases)

    def resolve(self, name: str) -> str | None:
        """The canonical name of a location name or alias, or None if unknown."""
        if name in self.names:
            return name
        return self.aliases.get(name)

    def describe(self) -> str:
        """Human list for error messages: ``local, osg (aliases: sub-2 → osg)``."""
        text = ", ".join(self.names)
        if self.aliases:
            text += " (aliases: " + ", ".join(f"{a} → {t}" for a, t in self.aliases.items()) + ")"
        return text


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def max_event_bytes_from_env(env: Mapping[str, str]) -> int:
    """``EWMS_MAX_EVENT_BYTES``, the largest event payload; read alike by the WMS and the CLI."""
    return _int(env, "EWMS_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES, 1024, 1024 * 1024 * 1024)


DEFAULT_TMS_ACTION_RETRIES = 2
DEFAULT_TMS_RETRY_DELAY = 10.0


def _base_path(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip() or DEFAULT_ORIGINAL_BASE_PATH
    if not value.startswith("/") or value == "/" or value.endswith("/") or "//" in value:
        raise ConfigError(
            f"{name} must be a path like /original (no trailing slash), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class WmsSettings:
    """Settings of the WMS process."""

    data_dir: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    cluster_locations: ClusterLocations = field(
        default_factory=lambda: ClusterLocations(("local",))
    )
    log_level: str = "INFO"
    # Where new workflows' queues live: "embedded" (the WMS's SQLite) or "rabbitmq".
    queue_backend: str = "embedded"
    # AMQP URL with the admin credentials and vhost, for the rabbitmq backend.
    rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    # RabbitMQ management HTTP API with the admin credentials (creates per-workflow users).
    rabbitmq_management_url: str = DEFAULT_RABBITMQ_MANAGEMENT_URL
    # Largest event payload accepted; gRPC message limits are raised to match.
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    # Seconds after a workflow ends before its queues, events and credentials are deleted.
    queue_retention_seconds: int = DEFAULT_QUEUE_RETENTION
    # Seconds after a workflow ends before its broker user, whose write permission went at once,
    # is deleted (reading its last outputs straight from the broker needs a little while).
    queue_credential_grace_seconds: int = DEFAULT_CREDENTIAL_GRACE
    # Workers a location may run at once (launched, not complete); absent: unlimited.
    location_max_workers: Mapping[str, int] = field(default_factory=dict)
    # Failed submits (or removes) tolerated per taskforce before the WMS gives up (the original's).
    tms_action_retries: int = DEFAULT_TMS_ACTION_RETRIES
    # Seconds before a failed TMS action is sent again.
    tms_retry_delay: float = DEFAULT_TMS_RETRY_DELAY
    # Where pilots reach the WMS ("host:port"); empty: this host and the bound port.
    public_address: str = ""
    # The HTTP face (REST gateway, OpenAPI, the original's dialect, health, metrics). Built in code
    # the default is any free port, so test and embedded WMSs never collide; EWMS_HTTP_PORT
    # defaults to 8080.
    http_host: str = "127.0.0.1"
    http_port: int = 0
    # Base path of the original EWMS's REST dialect (its clients' base URL ends with this).
    original_base_path: str = DEFAULT_ORIGINAL_BASE_PATH
    # External OIDC identity provider (e.g. Keycloak); empty issuer: only the WMS's own tokens.
    auth_issuer: str = ""
    auth_audience: str = ""
    # JWKS URL; empty: discovered from the issuer's /.well-known/openid-configuration.
    auth_jwks_url: str = ""
    # Dotted path of the claim holding the caller's roles (Keycloak realm roles by default).
    auth_role_claim: str = DEFAULT_AUTH_ROLE_CLAIM
    # The in-memory task activity window WatchWorkflow streams: task runs kept per workflow, and
    # workflows kept (the least recently active dropped first).
    activity_max_task_runs: int = DEFAULT_ACTIVITY_MAX_TASK_RUNS
    activity_max_workflows: int = DEFAULT_ACTIVITY_MAX_WORKFLOWS

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WmsSettings:
        """Read every WMS setting from the environment."""
        backend = env.get("EWMS_QUEUE_BACKEND", "").strip() or "embedded"
        if backend not in QUEUE_BACKENDS:
            raise ConfigError(
                f"EWMS_QUEUE_BACKEND must be one of {', '.join(QUEUE_BACKENDS)}, got {backend!r}"
            )
        settings = cls(
            queue_backend=backend,
            rabbitmq_url=env.get("EWMS_RABBITMQ_URL", "").strip() or DEFAULT_RABBITMQ_URL,
            rabbitmq_management_url=env.get("EWMS_RABBITMQ_MANAGEMENT_URL", "").strip()
            or DEFAULT_RABBITMQ_MANAGEMENT_URL,
            max_event_bytes=max_event_bytes_from_env(env),
            queue_retention_seconds=_int(
                env, "EWMS_QUEUE_RETENTION", DEFAULT_QUEUE_RETENTION, 0, 10 * 365 * 24 * 3600
            ),
            queue_credential_grace_seconds=_int(
                env, "EWMS_QUEUE_CREDENTIAL_GRACE", DEFAULT_CREDENTIAL_GRACE, 0, 7 * 24 * 3600
            ),
            data_dir=default_data_dir(env),
            grpc_host=env.get("EWMS_GRPC_HOST", "").strip() or "127.0.0.1",
            grpc_port=_int(env, "EWMS_GRPC_PORT", DEFAULT_GRPC_PORT, 0, 65535),
            cluster_locations=ClusterLocations.parse(env.get("EWMS_CLUSTER_LOCATIONS", "local")),
            log_level=env.get("EWMS_LOG_LEVEL", "").strip() or "INFO",
            location_max_workers=parse_location_max_workers(
                env.get("EWMS_LOCATION_MAX_WORKERS", "")
            ),
            tms_action_retries=_int(env, "TMS_ACTION_RETRIES", DEFAULT_TMS_ACTION_RETRIES, 0, 1000),
            tms_retry_delay=_int(
                env, "EWMS_TMS_RETRY_DELAY", int(DEFAULT_TMS_RETRY_DELAY), 0, 3600
            ),
            public_address=env.get("EWMS_WMS_PUBLIC_ADDRESS", "").strip(),
            http_host=env.get("EWMS_HTTP_HOST", "").strip() or "127.0.0.1",
            http_port=_int(env, "EWMS_HTTP_PORT", DEFAULT_HTTP_PORT, 0, 65535),
            original_base_path=_base_path(env, "EWMS_HTTP_ORIGINAL_BASE"),
            auth_issuer=env.get("EWMS_AUTH_ISSUER", "").strip(),
            auth_audience=env.get("EWMS_AUTH_AUDIENCE", "").strip(),
            auth_jwks_url=env.get("EWMS_AUTH_JWKS_URL", "").strip(),
            auth_role_claim=env.get("EWMS_AUTH_ROLE_CLAIM", "").strip() or DEFAULT_AUTH_ROLE_CLAIM,
            activity_max_task_runs=_int(
                env, "EWMS_ACTIVITY_MAX_TASK_RUNS", DEFAULT_ACTIVITY_MAX_TASK_RUNS, 1, 100_000
            ),
            activity_max_workflows=_int(
                env, "EWMS_ACTIVITY_MAX_WORKFLOWS", DEFAULT_ACTIVITY_MAX_WORKFLOWS, 1, 10_000
            ),
        )
        check_auth_settings(
            settings.auth_issuer,
            settings.auth_audience,
            settings.auth_jwks_url,
            settings.auth_role_claim,
        )
        return settings


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_auth_settings(issuer: str, audience: str, jwks_url: str, role_claim: str) -> None:
    """ConfigError unless the external OIDC settings are usable and safe: https URLs (plain http
    only on loopback, for tests), an audience (else tokens the issuer mints for any of its other
    clients would be accepted), and a dotted role-claim path."""
    if not issuer:
        for name, value in (("EWMS_AUTH_AUDIENCE", audience), ("EWMS_AUTH_JWKS_URL", jwks_url)):
            if value:
                raise ConfigError(f"{name} is set but EWMS_AUTH_ISSUER is empty; set both")
        return
    check_auth_url("EWMS_AUTH_ISSUER", issuer)
    if jwks_url:
        check_auth_url("EWMS_AUTH_JWKS_URL", jwks_url)
    if not audience:
        raise ConfigError(
            "EWMS_AUTH_AUDIENCE is required when EWMS_AUTH_ISSUER is set: the audience (client id) "
            "the issuer puts in the 'aud' claim of tokens meant for this WMS"
        )
    if not role_claim or not all(part.strip() for part in role_claim.split(".")):
        raise ConfigError(
            "EWMS_AUTH_ROLE_CLAIM must be a dotted claim path such as realm_access.roles, "
            f"got {role_claim!r}"
        )


def check_auth_url(name: str, url: str) -> None:
    """ConfigError unless ``url`` is https (or http on loopback) with a host."""
    parts = urllib.parse.urlsplit(url)
    loopback = parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS
    if parts.scheme != "https" and not loopback:
        raise ConfigError(
            f"{name} must be an https:// URL (http:// only on 127.0.0.1 or localhost), got {url!r}"
        )
    if not parts.hostname:
        raise ConfigError(f"{name} must be a URL with a host, got {url!r}")


def parse_location_max_workers(text: str) -> dict[str, int]:
    """``EWMS_LOCATION_MAX_WORKERS``: ``N`` (every location) or ``name=N,name2=M``; the key ``*``
    is every location not named."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        name = name.strip() if sep else "*"
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number < 1 or not name:
            raise ConfigError(
                f"EWMS_LOCATION_MAX_WORKERS: {part!r} must be N or location=N with N >= 1"
            )
        out[name] = number
    return out


@dataclass(frozen=True)
class ClientSettings:
    """Settings of a client (the CLI): where the WMS is, which token to present, and the largest
    event it may publish."""

    wms_address: str = DEFAULT_WMS_ADDRESS
    token: str = ""
    data_dir: Path = field(default_factory=default_data_dir)
    # Larger events are refused before anything is published (the WMS would reject them anyway).
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientSettings:
        """Read every client setting from the environment."""
        return cls(
            wms_address=env.get("EWMS_WMS_ADDRESS", "").strip() or DEFAULT_WMS_ADDRESS,
            token=env.get("EWMS_TOKEN", "").strip(),
            data_dir=default_data_dir(env),
            max_event_bytes=max_event_bytes_from_env(env),
        )
