"""Node configuration: YAML file -> validated pydantic models, and live reload.

This is the only module that reads configuration files. The file is found as
``--config`` > ``$DICOM_NODE_CONFIG`` > ``config/node.yaml`` (relative to the working
directory). When no path was given and ``config/node.yaml`` does not exist, the embedded
defaults below are used, so ``dicom-node serve`` starts on a fresh machine. Relative paths in a
file (``storage.root``, SQLite database paths, ``logging.file``) resolve against the folder of
that file; with no file, against the working directory.

Every model is frozen: a reload builds a new :class:`NodeConfig` and hands it to the
subscribers of :class:`dicom_node.config_watcher.ConfigWatcher`; nothing mutates a config in
place.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.config_base import AETitle, Port, check_ae_title, resolve_paths_in
from dicom_node.config_base import Section as _Section
from dicom_node.config_security import AuditSection, DestinationTls, TlsServerSection
from dicom_node.errors import ConfigError
from dicom_node.states import ALL_DERIVED_KINDS, DerivedKind, PrefetchMethod
from fusion_engine.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CT_WINDOW, DEFAULT_STRATEGY

log = logging.getLogger(__name__)

ENV_VAR = "DICOM_NODE_CONFIG"
DEFAULT_CONFIG_PATH = Path("config") / "node.yaml"
DEFAULT_STORAGE_DIR = "dicom-node-data"
DB_FILENAME = "index.sqlite3"

MAX_UID_ROOT_LENGTH = 32
"""Longest ``derive.uid_root``: leaves at least 31 decimal digits of hash in a 64-character UID,
so derived UIDs stay unique (see :func:`dicom_node.imaging.derive.derive_uid`)."""

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
PASSWORD_FILE = Path("console") / "users.json"
"""Admin console password hashes, below ``storage.root`` unless ``http.password_file`` says."""

DEFAULT_MAX_GAP_MM = 10.0
"""Widest gap between stored slices of a series that is still read as one volume."""

_DEST_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class NodeSection(_Section):
    """``node``: who the node is on the network and who may talk to it."""

    ae_title: AETitle = "FUSIONNODE"
    host: str = "0.0.0.0"
    port: Port | None = 11112
    tls: TlsServerSection | None = None
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    shutdown_timeout_seconds: Annotated[float, Field(ge=0)] = 300.0

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [check_ae_title(x) for x in v]

    @model_validator(mode="after")
    def _listens(self) -> NodeSection:
        if self.port is None and self.tls is None:
            raise ValueError("port is null and tls is not set: the node would not listen at all")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.port} is also the plain port")
        return self


class StorageSection(_Section):
    """``storage``: where received files go and how much disk must stay free."""

    root: Path = Path(DEFAULT_STORAGE_DIR)
    min_free_mb: Annotated[int, Field(ge=0)] = 500


class DatabaseSection(_Section):
    """``database``: the SQLAlchemy URL of the index (None: SQLite under storage.root)."""

    url: str | None = None


class Destination(_Section):
    """One ``destinations.<NAME>`` entry: a DICOM peer that receives derived series."""

    ae_title: AETitle
    host: str
    port: Port
    send: list[DerivedKind] = Field(default_factory=lambda: list(ALL_DERIVED_KINDS))
    tls: DestinationTls | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)


class RoutingSection(_Section):
    """``routing``: which destinations receive the derived series of every job."""

    send_to: list[str] = Field(default_factory=list)


class MrRule(_Section):
    """A preference rule for choosing the MR series of a pair."""

    series_description_regex: str
    weight: float = 1.0

    @field_validator("series_description_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v


class PairingSection(_Section):
    """``pairing``: when a series counts as complete and how CT and MR are paired."""

    series_quiet_seconds: Annotated[float, Field(gt=0)] = 30.0
    per_aet_quiet_seconds: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    min_slices: Annotated[int, Field(ge=1)] = 20
    max_days_between: Annotated[int, Field(ge=0)] = 90
    mr_rules: list[MrRule] = Field(default_factory=list)
    scan_interval_seconds: Annotated[float, Field(gt=0)] | None = None


class JobsSection(_Section):
    """``jobs``: retry policy of fusion jobs."""

    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 60.0
    max_backoff_seconds: Annotated[float, Field(ge=0)] = 3600.0
    send_max_attempts: Annotated[int, Field(ge=1)] = 10
    lease_seconds: Annotated[float, Field(gt=0)] = 60.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] | None = None


class WorkerSection(_Section):
    """``worker``: where and how the fusion worker computes, and whether serve runs one."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None
    poll_seconds: Annotated[float, Field(gt=0)] = 2.0
    embedded: bool = True


class FusionSection(_Section):
    """``fusion``: fusion strategy and CT intensity window."""

    strategy: str = DEFAULT_STRATEGY
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    batch_size: Annotated[int, Field(ge=1)] = DEFAULT_BATCH_SIZE
    precision: Literal["auto", "fp32", "channels_last", "bf16"] = "auto"

    @field_validator("ct_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] <= 0:
            raise ValueError("window width (second value) must be > 0")
        return v


class DeriveSection(_Section):
    """``derive``: identity of the derived DICOM objects."""

    uid_root: str = "2.25"
    series_number_base: Annotated[int, Field(ge=0)] = 9000

    @field_validator("uid_root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.rstrip(".")
        if not _UID_ROOT_RE.match(v) or len(v) > MAX_UID_ROOT_LENGTH:
            raise ValueError(
                f"{v!r} is not a valid UID root (digits and dots, "
                f"at most {MAX_UID_ROOT_LENGTH} characters)"
            )
        return v


class VolumesSection(_Section):
    """``volumes``: how stored series are read as volumes."""

    max_gap_mm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GAP_MM


class RetentionSection(_Section):
    """``retention``: optional deletion of old received and derived data."""

    enabled: bool = False
    days: Annotated[int, Field(ge=1)] = 30


class PrefetchSection(_Section):
    """``prefetch``: retrieve the MR of a waiting CT from the PACS (Query/Retrieve SCU).

    The time window and the series preferences are the pairing settings
    (``pairing.max_days_between``, ``pairing.mr_rules``); backoff between attempts is
    ``jobs.retry_backoff_seconds`` / ``jobs.max_backoff_seconds``.
    """

    enabled: bool = False
    source: str | None = None
    method: PrefetchMethod = PrefetchMethod.MOVE
    max_series: Annotated[int, Field(ge=1)] = 1
    max_attempts: Annotated[int, Field(ge=1)] = 10


class HttpSection(_Section):
    """``http``: the admin console (web pages, REST API, /metrics, /healthz, /readyz).

    Served by ``dicom-node serve`` in its own process when this section is present. The default
    host is the loopback interface: the console is reachable from other machines only when an
    admin says so (or through a reverse proxy that adds TLS).
    """

    host: str = DEFAULT_HTTP_HOST
    port: Port = DEFAULT_HTTP_PORT
    password_file: Path | None = None
    session_idle_minutes: Annotated[float, Field(gt=0)] = 30.0


class LoggingSection(_Section):
    """``logging``: level and optional log file."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None


class NodeConfig(_Section):
    """The whole node configuration; one object is passed down, never global."""

    node: NodeSection = Field(default_factory=NodeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    pairing: PairingSection = Field(default_factory=PairingSection)
    jobs: JobsSection = Field(default_factory=JobsSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    fusion: FusionSection = Field(default_factory=FusionSection)
    derive: DeriveSection = Field(default_factory=DeriveSection)
    volumes: VolumesSection = Field(default_factory=VolumesSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    prefetch: PrefetchSection = Field(default_factory=PrefetchSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    http: HttpSection | None = None

    @field_validator("destinations")
    @classmethod
    def _dest_names(cls, v: dict[str, Destination]) -> dict[str, Destination]:
        for name in v:
            if not _DEST_NAME_RE.match(name):
                raise ValueError(f"destination name {name!r} may use only letters, digits, _ . -")
        return v

    @model_validator(mode="after")
    def _routing_known(self) -> NodeConfig:
        unknown = [n for n in self.routing.send_to if n not in self.destinations]
        if unknown:
            raise ValueError(
                f"routing.send_to names unknown destination(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.destinations)) or 'none'}"
            )
        return self

    @model_validator(mode="after")
    def _prefetch_source_known(self) -> NodeConfig:
        source = self.prefetch.source
        if source is not None and source not in self.destinations:
            raise ValueError(
                f"prefetch.source names unknown destination {source!r}; "
                f"known: {', '.join(sorted(self.destinations)) or 'none'}"
            )
        if self.prefetch.enabled and source is None:
            raise ValueError("prefetch.enabled needs prefetch.source (a destinations entry)")
        return self

    @property
    def database_url(self) -> str:
        """The effective database URL (same as ``database.url`` after :func:`load_config`)."""
        if self.database.url is not None:
            return self.database.url
        return f"sqlite:///{self.storage.root / DB_FILENAME}"

    @property
    def password_file(self) -> Path:
        """The admin console's password file (``http.password_file``, else under storage)."""
        if self.http is not None and self.http.password_file is not None:
            return self.http.password_file
        return self.storage.root / PASSWORD_FILE


def _resolve_paths(cfg: NodeConfig, base: Path) -> NodeConfig:
    """Make every path absolute against ``base`` and fill ``database.url``."""
    root = cfg.storage.root.expanduser()
    if not root.is_absolute():
        root = base / root
    root = Path(os.path.normpath(root))
    storage = cfg.storage.model_copy(update={"root": root})
    url = cfg.database.url
    if url is None:
        url = f"sqlite:///{root / DB_FILENAME}"
    elif url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///") :]
        if rel and rel != ":memory:" and not rel.startswith(("/", "file:")) and "?" not in rel:
            url = f"sqlite:///{os.path.normpath(base / rel)}"
    log_file = cfg.logging.file
    if log_file is not None and not log_file.expanduser().is_absolute():
        log_file = Path(os.path.normpath(base / log_file))
    http = cfg.http
    if http is not None and http.password_file is not None:
        pw = http.password_file.expanduser()
        http = http.model_copy(update={"password_file": pw if pw.is_absolute() else base / pw})
    return cfg.model_copy(
        update={
            "storage": storage,
            "database": cfg.database.model_copy(update={"url": url}),
            "logging": cfg.logging.model_copy(update={"file": log_file}),
            # certificate, key and audit files: relative to the config file's folder too
            "node": resolve_paths_in(cfg.node, base),
            "destinations": {n: resolve_paths_in(d, base) for n, d in cfg.destinations.items()},
            "audit": resolve_paths_in(cfg.audit, base),
            "http": http,
        }
    )


def _format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: ``file: key.path: what is wrong``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or not supported here)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        given = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and not isinstance(given, dict | list):
            msg += f" (got {given!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'``, creating sections."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_config(
    data: Any, *, source: str, base: Path, overrides: Mapping[str, Any] | None = None
) -> NodeConfig:
    """Validate already-loaded YAML data (plus ``overrides`` as dotted keys)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: (top level): must be a mapping of sections, not {type(data).__name__}"
        )
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
    return _resolve_paths(cfg, base)


def read_config_file(path: Path, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Read and validate one YAML file; raises :class:`ConfigError` naming file, key, problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    return parse_config(data, source=str(path), base=path.parent.resolve(), overrides=overrides)


def config_path(path: Path | None = None) -> tuple[Path, bool]:
    """The config file to use and whether it was asked for explicitly (flag or env)."""
    if path is not None:
        return path.expanduser().absolute(), True
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute(), True
    return DEFAULT_CONFIG_PATH.absolute(), False


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[NodeConfig, Path]:
    """Load the node config: ``path`` > ``$DICOM_NODE_CONFIG`` > ``config/node.yaml``.

    Returns the config and the file path it came from (or would come from). An explicitly
    named file must exist; without one and with no ``config/node.yaml``, the embedded
    defaults are used with paths relative to the working directory. ``overrides`` maps dotted
    keys (``"node.port"``) to values that replace the file's (command-line flags).
    """
    resolved, explicit = config_path(path)
    if resolved.exists() or explicit:
        return read_config_file(resolved, overrides), resolved
    log.debug("no config file at %s: using embedded defaults", resolved)
    return parse_config({}, source="(defaults)", base=Path.cwd(), overrides=overrides), resolved
