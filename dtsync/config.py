"""Typed configuration: one YAML file, validated up front so a typo fails at start-up naming its key.

Shape (see the commented example ``config.yaml`` at the repository root): top-level defaults for the metric
(``gamma``, ``tolerance``, ``reward_range``, ``window``, ``noise_floor``, ``top_states``), the evaluation
``schedule``, the ``trigger`` rule, the state ``encoder``, then ``cells`` -> ``twins`` with per-twin
overrides, and the service sections ``mqtt``, ``metrics``, ``daemon`` and (optional) ``coordination``.

Per-twin overrides (``gamma``, ``reward_range``, ``window``, ``trigger``) are merged over the top level:
``window`` and ``trigger`` key by key (``{threshold: 0.8}`` keeps the inherited ``rearm_below`` etc.), the
others replace the inherited value. The merged result is validated like the top level, and its errors are
reported under the twin's path (``cells.<cell>.twins.<twin>.<key>``).

Windows: the *real* stream of a cell is shared by all of its twins, so its window is always the top-level
``window``; a per-twin ``window`` override sizes only that twin's own window. The ``encoder`` (and
``max_states``) is cell-wide for the same reason: real and twin states must share one label space for the
per-state mismatch ``d(s, s)`` to mean anything, so it cannot be overridden per twin.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dtsync.trigger import ActOn, TriggerRule

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_name(name: str) -> str:
    """Cell, twin and instance names end up in MQTT topics and Prometheus labels: keep them plain."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


Name = Annotated[str, AfterValidator(_check_name)]


class ConfigError(Exception):
    """The configuration cannot be used; the message lists every problem as ``key.path: message``."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[str], source: str | None = None) -> ConfigError:
        """One header line (naming the file when there is one) and one indented line per problem."""
        head = f"{source}: invalid configuration" if source else "invalid configuration"
        return cls(head + ":\n" + "\n".join(f"  {p}" for p in problems), problems)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WindowSettings(_Section):
    """Sliding window bounds: the last ``count`` transitions and/or those at most ``seconds`` old.

    With both, a transition leaves as soon as either bound is exceeded. A key left out of the section is
    unbounded (``{seconds: 60}`` is a pure time window), except in a per-twin override, which merges.
    """

    count: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> WindowSettings:
        if self.count is None and self.seconds is None:
            raise ValueError("window needs count, seconds or both")
        return self


class ScheduleSettings(_Section):
    """Evaluate after ``every_seconds`` or ``every_transitions`` new transitions, whichever comes first.

    A key left out of the section disables that criterion.
    """

    every_seconds: float | None = Field(default=None, gt=0)
    every_transitions: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _at_least_one(self) -> ScheduleSettings:
        if self.every_seconds is None and self.every_transitions is None:
            raise ValueError("schedule needs every_seconds, every_transitions or both")
        return self


class TriggerSettings(_Section):
    """The resync rule as written in the file; cross-field rules live in :class:`TriggerRule` alone."""

    threshold: float = Field(ge=0)
    rearm_below: float | None = Field(default=None, ge=0)
    cooldown_seconds: float = Field(default=0.0, ge=0)
    min_samples: int = Field(default=0, ge=0)
    min_coverage: float = Field(default=0.0, ge=0, le=1)
    act_on: ActOn = "evidence"
    alpha: float = Field(default=0.01, gt=0, lt=0.5)
    min_state_samples: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _valid_rule(self) -> TriggerSettings:
        self.to_rule()
        return self

    def to_rule(self) -> TriggerRule:
        """The pure-core rule the trigger runs on."""
        return TriggerRule(**self.model_dump())


class EncoderSettings(_Section):
    """Bin edges for vector states, ``bins[j]`` for feature ``j``; null: states are plain labels only."""

    bins: tuple[tuple[float, ...], ...] | None = None

    @field_validator("bins")
    @classmethod
    def _increasing(cls, bins: tuple[tuple[float, ...], ...] | None) -> tuple[tuple[float, ...], ...] | None:
        for j, edges in enumerate(bins or ()):
            if any(not lo < hi for lo, hi in zip(edges, edges[1:], strict=False)):
                raise ValueError(f"bin edges of feature {j} must be strictly increasing, got {list(edges)}")
        return bins


class TlsSettings(_Section):
    """TLS towards the broker; ``cert_file``/``key_file`` for client-certificate authentication."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttSettings(_Section):
    """Broker connection. The password is never written in the file: read from a file or an env variable."""

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsSettings | None = None
    topic_prefix: str = "dtsync"
    client_id: str | None = None
    keepalive: int = Field(default=60, ge=1, le=65535)
    event_expiry_seconds: int = Field(default=300, ge=1)
    max_payload_bytes: int = Field(default=1_048_576, ge=64)
    max_batch: int = Field(default=100_000, ge=1)
    reconnect_min_seconds: float = Field(default=0.5, gt=0)
    # A short cap: after an outage of any length the daemon is back within about this long of the broker's
    # return (with 30 s it measured 16-21 s); an attempt against a broker that is down costs one TCP handshake.
    reconnect_max_seconds: float = Field(default=2.0, gt=0)
    # The retained liveness is re-published this often, with a v5 message expiry of 3x this (and a timestamp
    # for 3.1.1 consumers), so a stale `online` cannot outlive the daemon by more than that.
    liveness_seconds: float = Field(default=30.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: object) -> object:
        """YAML reads ``protocol: 5`` as an integer."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, prefix: str) -> str:
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
            raise ValueError("topic_prefix must be non-empty, without wildcards or leading/trailing '/'")
        return prefix

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttSettings:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError("reconnect_max_seconds must be >= reconnect_min_seconds")
        return self

    def password(self) -> str | None:
        """The broker password from ``password_file`` (``$VARS`` expanded, e.g. systemd's
        ``${CREDENTIALS_DIRECTORY}``) or ``password_env``; ConfigError naming the key if it cannot be read."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return value
        if self.password_file is not None:
            path = Path(os.path.expandvars(str(self.password_file)))
            try:
                return path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as e:
                raise ConfigError(f"mqtt.password_file: cannot read {path}: {e.strerror or e}") from None
        return None


class MetricsSettings(_Section):
    """Prometheus exposition address, ``host:port`` (``[::1]:9108`` for IPv6)."""

    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen must be host:port, got {listen!r}")
        return listen

    @property
    def host(self) -> str:
        """Host part, brackets of an IPv6 literal removed."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part."""
        return int(self.listen.rpartition(":")[2])


class DaemonSettings(_Section):
    """The service: ``instance`` names this monitor in topics and events; where the outbox and the state
    snapshots live; when a stream or a twin counts as stale (``/healthz``); how many worker processes compute
    the metric; how far a transition's ``t`` may be from the receive clock; how long a resync event may wait for
    a controller's acknowledgement before the alert fires; logging."""

    instance: Name = "default"
    outbox_path: Path | None = None
    state_path: Path | None = None
    state_dir: Path | None = None  # one snapshot file per cell (shared among instances under `coordination`)
    snapshot_seconds: float = Field(default=30.0, gt=0)
    stale_seconds: float = Field(default=60.0, gt=0)
    workers: int | None = Field(default=None, ge=1)
    max_clock_skew_seconds: float | None = Field(default=300.0, gt=0)
    resync_ack_seconds: float = Field(default=600.0, gt=0)  # exported for the DtsyncResyncNotAcknowledged alert
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    def outbox_file(self) -> Path:
        """Where the event outbox lives: ``outbox_path``, else systemd's ``$STATE_DIRECTORY``, else the cwd."""
        if self.outbox_path is not None:
            return Path(os.path.expandvars(str(self.outbox_path)))
        return _state_directory() / f"dtsync-outbox-{self.instance}.sqlite"

    def state_file(self) -> Path:
        """Where window/trigger snapshots go: ``state_path``, else beside the outbox (``$STATE_DIRECTORY``)."""
        if self.state_path is not None:
            return Path(os.path.expandvars(str(self.state_path)))
        return self.outbox_file().parent / f"dtsync-state-{self.instance}.snapshot"

    def state_directory(self) -> Path | None:
        """Where per-cell snapshots go (``state_dir``, variables expanded), or None for one file per daemon."""
        return None if self.state_dir is None else Path(os.path.expandvars(str(self.state_dir)))

    def worker_count(self) -> int:
        """``workers``, else one per core this process may run on (each worker runs numba on one thread)."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)


def _state_directory() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or ".")


_ZK_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


class ZooKeeperConfig(_Section):
    """The ensemble the instances share cells through: ``hosts`` is a connection string
    ("zk1:2181,zk2:2181,zk3:2181"), ``path`` the znode under which they meet (one per fleet), and
    ``session_timeout`` how long a dead instance keeps its cells before the others take them (the servers
    clamp it to 2-20 ticks: 4-40 s at the default 2 s tick)."""

    hosts: str
    path: str = "/dtsync"
    session_timeout: float = Field(default=10.0, gt=0, le=600)

    @field_validator("hosts")
    @classmethod
    def _host_list(cls, hosts: str) -> str:
        for host in hosts.split(","):
            m = _ZK_HOST_RE.fullmatch(host.strip())
            if m is None or (m.group(2) is not None and not 0 < int(m.group(2)) < 65536):
                raise ValueError(f"hosts must be host[:port] separated by commas, got {hosts!r}")
        return hosts

    @field_validator("path")
    @classmethod
    def _znode(cls, path: str) -> str:
        parts = path.split("/")
        if not path.startswith("/") or path == "/" or any(p in ("", ".", "..") for p in parts[1:]):
            raise ValueError(f"path must be an absolute znode path such as /dtsync (no trailing '/'), got {path!r}")
        return path


class CoordinationSettings(_Section):
    """Cells shared among instances: each instance evaluates the cells the partitioner gives it."""

    zookeeper: ZooKeeperConfig


class TwinOverrides(_Section):
    """What one twin changes; unset keys inherit. Validated after merging (:meth:`Config.twin_settings`)."""

    gamma: float | None = None
    reward_range: tuple[float, float] | None = None
    window: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = None


class CellSettings(_Section):
    """A cell: one real stream and the twins compared against it."""

    twins: dict[Name, TwinOverrides] = Field(min_length=1)

    @field_validator("twins", mode="before")
    @classmethod
    def _bare_twins(cls, twins: object) -> object:
        """``twin-a:`` with nothing after it means "inherit everything", like ``twin-a: {}``."""
        if isinstance(twins, Mapping):
            return {k: {} if v is None else v for k, v in twins.items()}
        return twins

    @field_validator("twins")
    @classmethod
    def _not_real(cls, twins: dict[str, TwinOverrides]) -> dict[str, TwinOverrides]:
        """``real`` names the cell's real stream (topic ``<prefix>/<cell>/real``), so no twin may take it."""
        if "real" in twins:
            raise ValueError("'real' is reserved for the cell's real stream; name the twin otherwise")
        return twins


class _MetricFields(_Section):
    """Settings a twin sees: the top level holds the defaults, a twin's merged view is validated as this."""

    gamma: float = Field(default=0.9, gt=0, lt=1)
    tolerance: float = Field(default=1e-8, gt=0)
    reward_range: tuple[float, float] | None = None
    window: WindowSettings = WindowSettings(count=5000)
    noise_floor: bool = True
    top_states: int = Field(default=5, ge=0)
    trigger: TriggerSettings = TriggerSettings(threshold=0.5)
    encoder: EncoderSettings = EncoderSettings()

    @field_validator("reward_range")
    @classmethod
    def _ordered(cls, rr: tuple[float, float] | None) -> tuple[float, float] | None:
        if rr is not None and not rr[0] < rr[1]:
            raise ValueError(f"reward_range must be [min, max] with min < max, got {list(rr)}")
        return rr


@dataclass(frozen=True)
class TwinSettings:
    """Effective settings of one (cell, twin) pair, overrides applied: what a monitor is built from."""

    cell: str
    twin: str
    gamma: float
    tolerance: float
    reward_range: tuple[float, float] | None
    window: WindowSettings
    real_window: WindowSettings
    trigger: TriggerRule
    bins: tuple[tuple[float, ...], ...] | None
    noise_floor: bool
    top_states: int


class Config(_MetricFields):
    """The whole configuration: from :func:`load_config`, :func:`parse_config` or :func:`default_config`."""

    schedule: ScheduleSettings = ScheduleSettings(every_seconds=5.0, every_transitions=500)
    # Caps on distinct labels per cell (reason too_many_labels beyond): the metric's arrays are dense in
    # states x actions x states, so these bound an evaluation's memory; README "Reliability" has the figures.
    max_states: int = Field(default=256, ge=1)
    max_actions: int = Field(default=16, ge=1)
    cells: dict[Name, CellSettings] = Field(default_factory=dict)
    mqtt: MqttSettings = MqttSettings()
    metrics: MetricsSettings = MetricsSettings()
    daemon: DaemonSettings = DaemonSettings()
    coordination: CoordinationSettings | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """Every (cell, twin) in file order."""
        return [(cell, twin) for cell, settings in self.cells.items() for twin in settings.twins]

    def _merged(self, cell: str, twin: str) -> _MetricFields:
        """Top-level metric settings with the twin's overrides merged in; ValidationError if invalid."""
        merged: dict[str, Any] = self.model_dump(include=set(_MetricFields.model_fields))
        overrides = self.cells[cell].twins[twin]
        for key, value in overrides.model_dump(exclude_unset=True).items():
            if key in ("window", "trigger") and value is not None:
                merged[key] = {**merged[key], **value}
            elif key == "reward_range" or value is not None:
                merged[key] = value  # reward_range: null in a twin means "observed", not "inherit"
        return _MetricFields.model_validate(merged)

    def twin_settings(self, cell: str, twin: str) -> TwinSettings:
        """Effective settings for ``twin`` of ``cell``; KeyError if the pair is not configured."""
        if cell not in self.cells or twin not in self.cells[cell].twins:
            raise KeyError(f"no twin {twin!r} in cell {cell!r}")
        m = self._merged(cell, twin)
        return TwinSettings(
            cell=cell,
            twin=twin,
            gamma=m.gamma,
            tolerance=m.tolerance,
            reward_range=m.reward_range,
            window=m.window,
            real_window=self.window,
            trigger=m.trigger.to_rule(),
            bins=m.encoder.bins,
            noise_floor=m.noise_floor,
            top_states=m.top_states,
        )

    def with_overrides(
        self, gamma: float | None = None, window_count: int | None = None, threshold: float | None = None
    ) -> Config:
        """Apply the CLI flags ``--gamma``, ``--window N`` and ``--threshold X`` everywhere.

        A flag beats the file at the top level and in every twin override. ``--window N`` makes every window
        the last N transitions (any ``seconds`` bound is dropped). ``--threshold X`` lowers a ``rearm_below``
        above X to X, since a re-arm level above the threshold is meaningless.
        """
        data = self._raw()
        twins = [ov for cell in data.get("cells", {}).values() for ov in cell["twins"].values()]
        if gamma is not None:
            data["gamma"] = gamma
            for ov in twins:
                ov.pop("gamma", None)
        if window_count is not None:
            data["window"] = {"count": window_count, "seconds": None}
            for ov in twins:
                ov.pop("window", None)
        if threshold is not None:
            top = data.setdefault("trigger", {})
            top["threshold"] = threshold
            twin_sections = [ov["trigger"] for ov in twins if ov.get("trigger")]
            for section in twin_sections:
                section.pop("threshold", None)
            for section in (top, *twin_sections):
                rearm = section.get("rearm_below")
                if isinstance(rearm, int | float) and rearm > threshold:
                    section["rearm_below"] = threshold
        return parse_config(data)

    def for_replay(self, twin_names: Iterable[str]) -> Config:
        """This config with one cell ``replay`` holding ``twin_names`` (twins come from the command line).

        A twin keeps the overrides of the first cell (in file order) that declares it; others inherit all.
        """
        names = list(dict.fromkeys(twin_names))
        if not names:
            raise ConfigError.from_problems(["replay: at least one twin name is needed"])
        data = self._raw()
        twins: dict[str, Any] = {}
        for name in names:
            declared = (c.twins[name] for c in self.cells.values() if name in c.twins)
            first = next(declared, None)
            twins[name] = first.model_dump(exclude_unset=True) if first is not None else {}
        data["cells"] = {"replay": {"twins": twins}}
        return parse_config(data)

    def _raw(self) -> dict[str, Any]:
        """What the file said (defaults left out), as a fresh dict to edit and re-validate."""
        return copy.deepcopy(self.model_dump(exclude_unset=True))


def _format_errors(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    """``key.path: message`` per pydantic error, minus pydantic's internal markers."""
    problems = []
    for err in error.errors():
        path = ".".join(str(p) for p in (*prefix, *err["loc"]) if p != "[key]") or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}")
    return problems


def parse_config(data: Any, source: str | None = None) -> Config:
    """Validate a parsed mapping, including every twin's merged settings; raises ConfigError listing all."""
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError.from_problems(_format_errors(e), source) from None
    problems: list[str] = []
    if config.coordination is not None and config.daemon.state_dir is None:
        problems.append("coordination: needs daemon.state_dir, a directory every instance can read (each cell's "
                        "snapshot waits there for its next owner)")  # fmt: skip
    for cell, twin in config.pairs():
        try:
            config._merged(cell, twin)
        except ValidationError as e:
            problems += _format_errors(e, ("cells", cell, "twins", twin))
    if problems:
        raise ConfigError.from_problems(problems, source)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; any failure (missing, unreadable, bad YAML, invalid) is ConfigError."""
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: cannot read: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{name}: invalid YAML: {where}{e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    return parse_config({} if data is None else data, source=name)


def broker_settings(
    path: str | os.PathLike[str] | None, host: str | None = None, port: int | None = None
) -> MqttSettings:
    """The `mqtt` section of a config file (defaults without one), with --host/--port overrides: how the CLI
    companions (publish, watch, testbed publish) reach the broker the daemon uses."""
    settings = (load_config(path) if path is not None else default_config()).mqtt
    return settings.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})


def default_config() -> Config:
    """Built-in defaults, no cells: what ``dtsync replay`` runs with when no --config is given."""
    return parse_config({})
