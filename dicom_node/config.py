"""Node configuration: YAML file -> validated pydantic models, and live reload.

This is the only module that reads configuration files. The file is found as
``--config`` > ``$DICOM_NODE_CONFIG`` > ``config/node.yaml`` (relative to the working
directory). When no path was given and ``config/node.yaml`` does not exist, the embedded
defaults below are used, so ``dicom-node serve`` starts on a fresh machine. Relative paths in a
file (``storage.root``, SQLite database paths, ``logging.file``) resolve against the folder of
that file; with no file, against the working directory.

Every model is frozen: a reload builds a new :class:`NodeConfig` and hands it to the
subscribers of :class:`ConfigWatcher`; nothing mutates a config in place.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

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

DEFAULT_MAX_GAP_MM = 10.0
"""Widest gap between stored slices of a series that is still read as one volume."""

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_DEST_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _check_ae_title(value: str) -> str:
    """Validate a DICOM AE title (1-16 printable ASCII characters, no backslash)."""
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return stripped


AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """``node``: who the node is on the network and who may talk to it."""

    ae_title: AETitle = "FUSIONNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    shutdown_timeout_seconds: Annotated[float, Field(ge=0)] = 300.0

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [_check_ae_title(x) for x in v]


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

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)


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
    return cfg.model_copy(
        update={
            "storage": storage,
            "database": cfg.database.model_copy(update={"url": url}),
            "logging": cfg.logging.model_copy(update={"file": log_file}),
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


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """Keys that changed between two configs but take effect only after a restart."""
    keys = []
    for section, field in (
        ("node", "host"),
        ("node", "port"),
        ("node", "network_timeout_seconds"),
        ("storage", "root"),
        ("database", "url"),
        ("logging", "file"),
        ("worker", "embedded"),
    ):
        if getattr(getattr(old, section), field) != getattr(getattr(new, section), field):
            keys.append(f"{section}.{field}")
    return keys


Subscriber = Callable[[NodeConfig], None]


class ConfigWatcher:
    """Poll a config file and hand each valid new version to subscribers.

    The file is checked every ``interval`` seconds (at most 1 s by default) by a daemon
    thread; :meth:`check` does one poll and can be called from a scheduler instead. A change
    is applied only once the same new content has been seen on two consecutive polls, so a file
    caught half-written by an editor (empty, say, which would mean "all defaults" and an open
    allow-list) is never applied. An invalid edit is logged as an error and the last good config
    stays in force.
    """

    def __init__(
        self,
        path: Path,
        initial: NodeConfig,
        *,
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
    ) -> None:
        """Watch ``path``, starting from the already loaded ``initial`` config."""
        self.path = path
        self.interval = interval
        self._overrides = dict(overrides or {})
        self._current = initial
        self._signature = self._file_signature()
        self._pending: str | None = None
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> NodeConfig:
        """The last good config."""
        return self._current

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(new_config)`` after every successful reload."""
        self._subscribers.append(callback)

    def _file_signature(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self) -> bool:
        """Poll once; reload and notify when the file changed. True when a new config applied."""
        with self._lock:
            sig = self._file_signature()
            if sig == self._signature:
                self._pending = None
                return False
            if sig != self._pending:  # first sight of this content: let the write settle
                self._pending = sig
                return False
            self._pending = None
            self._signature = sig
            if sig is None:
                log.error("config file %s disappeared; keeping the last good config", self.path)
                return False
            try:
                new = read_config_file(self.path, self._overrides)
            except ConfigError as exc:
                log.error("config reload rejected, keeping the last good config:\n%s", exc)
                return False
            old, self._current = self._current, new
            for key in restart_needed(old, new):
                log.warning("config %s changed in %s: takes effect after a restart", key, self.path)
            log.info("config reloaded from %s", self.path)
            for callback in self._subscribers:
                try:
                    callback(new)
                except Exception:
                    log.exception("config reload subscriber %r failed", callback)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the watcher thread die
                log.exception("config watcher poll failed")

    def start(self) -> None:
        """Start the polling thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
