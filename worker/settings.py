"""All configuration, read once from ``RELAY_*`` environment variables.

Nested values use ``__``: ``RELAY_TENANTS__DEFAULT__ESET__PASSWORD=…`` sets the password
of the ESET account of tenant ``default``. Secrets are ``SecretStr`` so they never print.
Any setting may come from a file instead: ``RELAY_X_FILE``, or a file named ``RELAY_X`` in
``RELAY_SECRETS_DIR`` (``worker/secret_files.py``).

The one source of every default: components take their group (:attr:`Settings.consumer`,
:attr:`Settings.handler_timings`, :attr:`Settings.retry`) and declare none of their own;
the rules that derive one setting from others live here too.

Tenant names are case-insensitive: they are kept in lower case (``RELAY_TENANTS__ACME__…``
configures ``acme``), and a command naming ``ACME`` or ``Acme`` finds it.

Without a broker or idempotency URL, the embedded SQLite files live in the user's data
directory (``~/.local/share/command-relay`` on Linux, see :func:`data_dir`), whatever the
working directory, so ``run`` and ``send`` started anywhere meet on the same broker.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar, overload
from urllib.parse import parse_qsl, urlsplit

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from schemas.commands import MAX_OBJECTS_PER_BATCH
from worker.secret_files import (
    FileVariablesSource,
    secrets_directory_source,
    without_file_variables,
)

EsetRegion = Literal["eu", "de", "us", "ca", "jpn"]
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
HEARTBEAT_S = 30  # AMQP heartbeats: a dead connection is noticed within about twice this
DEFER_POLL_S = 0.5  # without delay queues: how often a duplicate of running work looks again
APP_NAME = "command-relay"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
T = TypeVar("T")


def data_dir() -> Path:
    """Where the embedded defaults keep their SQLite files: the user's data directory
    (``$XDG_DATA_HOME/command-relay``, by default ``~/.local/share/command-relay``)."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def _default_broker_url() -> str:
    return f"sqla+sqlite:///{data_dir() / 'broker.sqlite3'}"


def _default_idempotency_url() -> str:
    return f"sqlite:///{data_dir() / 'idempotency.sqlite3'}"


def is_https(url: str) -> bool:
    """Whether a vendor URL (or host template) is https://."""
    return urlsplit(url).scheme.lower() == "https"


def _plain(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS client trusts and presents (the broker's ``amqps://``, Redis's
    ``rediss://``). The server's certificate and its name are always verified;
    ``ca_file`` names the CAs (PEM) that sign it (None: the system's), ``cert_file`` and
    ``key_file`` a client certificate for a server that asks for one (None: none)."""

    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None  # None with a cert_file: the key is in that file


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the broker (``worker/broker/connection.py``), to Redis (the idempotency
    and rate-limit stores) and to the vendors (``worker/vendors/transport.py``)."""

    broker: TlsFiles
    redis: TlsFiles
    vendor_ca_file: Path | None  # the CAs vendor certificates are checked with; None: certifi's
    vendor_proxy_url: SecretStr | None  # the proxy vendor calls go through; None: none


@dataclass(frozen=True)
class ConsumerSettings:
    """What the consumer needs (``worker/broker/consumer.py``)."""

    broker_url: str
    concurrency: int  # handlers running at once for the command queue
    prefetch: int  # its deliveries held at once: running, waiting for a slot or for confirms
    poll_interval_s: float  # how often the embedded broker (no socket) is polled
    delivery_limit: int
    shutdown_grace_s: float
    heartbeat_s: int
    lane_poll_interval_s: float  # how often lane backlogs are asked for (metrics)
    max_message_bytes: int
    reply_to_prefixes: tuple[str, ...]  # reply_to is honoured for these only
    broker_tls: TlsFiles  # for amqps://
    # Publishers are checked (Settings.publisher_binding): what the worker re-publishes
    # (lanes, delay queues, dead letters) carries its publisher, under the worker's user_id.
    bind_publishers: bool = False


@dataclass(frozen=True)
class HandlerTimings:
    """What the handler needs (``worker/handler.py``)."""

    command_timeout_s: float  # the longest one delivery works on a command (collects too)
    # With delay queues (RabbitMQ), back-off beyond ``retry_in_process_s`` goes through
    # them instead of holding the delivery; without (embedded broker) ``retry_delays_s`` is
    # empty and retries stay in process for the whole command timeout.
    retry_in_process_s: float
    retry_delays_s: tuple[float, ...]
    defer_s: float  # a duplicate of work in progress elsewhere comes back after this
    claim_lease_s: float  # renewed every third of it while a command is worked on
    defer_poll_s: float  # without delay queues: how often a duplicate looks again
    http_timeout_s: float  # a command ends at most this long after its deadline


@dataclass(frozen=True)
class RateLimitSettings:
    """The vendors' limits and where their pace is kept (``worker/vendors/ratelimit.py``)."""

    limits: Mapping[str, str]  # by vendor, in the limits notation ("10/second")
    storage_url: str  # memory:// or redis://…
    margin: float  # calls paced this much slower than the limit
    outage_hold_s: float  # how long a call waits for an unreachable pace store
    storage_tls: TlsFiles  # for rediss://


@dataclass(frozen=True)
class PublisherBinding:
    """Which AMQP users may publish commands for which tenant (``worker/handler.py``)."""

    publishers: Mapping[str, frozenset[str]]  # by configured tenant (lower case)
    required: bool  # a tenant naming none is refused, rather than open to every publisher

    def allows(self, tenant: str, publisher: str | None) -> bool:
        """Whether ``publisher`` (None: unknown) may act for ``tenant``. An unconfigured
        tenant is not this check's to refuse (``unknown_tenant`` says so)."""
        named = self.publishers.get(tenant.lower())
        if named is None or not (named or self.required):
            return True
        return publisher in named


@dataclass(frozen=True)
class RetrySettings:
    """The numbers of the vendor retry policy (``worker/vendors/retries.py``)."""

    max_attempts: int
    initial_wait_s: float
    max_wait_s: float


class _Account(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EsetAccount(_Account):
    """A dedicated ESET Connect API user (Integrations switched on)."""

    region: EsetRegion = "eu"
    username: str
    password: SecretStr


class FylrAccount(_Account):
    """A fylr OAuth2 client; with ``username`` the password grant, else client credentials."""

    base_url: str
    client_id: str
    client_secret: SecretStr
    username: str | None = None
    password: SecretStr | None = None


class SpaazaAccount(_Account):
    """A Spaaza privileged access token, sent as ``Bearer id:secret``."""

    base_url: str
    token_id: str
    token_secret: SecretStr


class Tenant(_Account):
    """The vendor accounts one tenant acts with; a command names the tenant, never a host."""

    # A sandbox or test endpoint: its vendor URLs may be plain http://. Every other
    # tenant's are https:// only (fylr's and Spaaza's base_url, RELAY_ESET_HOST_TEMPLATE).
    sandbox: bool = False
    eset: EsetAccount | None = None
    fylr: FylrAccount | None = None
    spaaza: SpaazaAccount | None = None
    # The AMQP users that may publish commands for it (the broker-validated user_id of a
    # message, on RabbitMQ); none named: any publisher, unless require_publishers.
    publishers: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @field_validator("fylr", "spaaza")
    @classmethod
    def _https_only(
        cls, account: FylrAccount | SpaazaAccount | None, info: ValidationInfo
    ) -> FylrAccount | SpaazaAccount | None:
        if account is not None and not info.data.get("sandbox") and not is_https(
            account.base_url
        ):
            raise ValueError(
                "its base_url is not an https:// URL: vendor calls go over TLS only; use "
                "https://, or mark the tenant as a sandbox or test endpoint (SANDBOX=true)"
            )
        return account

    @property
    def vendors(self) -> list[str]:
        """The vendors it has an account of."""
        return [name for name in ("eset", "fylr", "spaaza") if getattr(self, name) is not None]


class TenantMap(dict[str, Tenant]):
    """Tenants by name, kept in lower case and found whatever the case of the name asked
    for: a command naming ``ACME`` gets the tenant configured as ``RELAY_TENANTS__ACME__…``
    (environment names are case-insensitive) or as ``"Acme"`` in ``RELAY_TENANTS``."""

    def __missing__(self, name: str) -> Tenant:
        lowered = name.lower()
        if lowered == name:
            raise KeyError(name)
        return self[lowered]

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    @overload
    def get(self, name: str, default: None = None, /) -> Tenant | None: ...
    @overload
    def get(self, name: str, default: Tenant, /) -> Tenant: ...
    @overload
    def get(self, name: str, default: T, /) -> Tenant | T: ...
    def get(self, name: str, default: object = None, /) -> object:
        return super().get(name.lower(), default)


def _tenant_map(tenants: dict[str, Tenant]) -> TenantMap:
    mapped = TenantMap()
    for name, tenant in tenants.items():
        lowered = name.lower()
        if dict.__contains__(mapped, lowered):
            raise ValueError(
                f"two tenants differ only in case ({lowered!r}); tenant names are "
                "case-insensitive: merge them or rename one"
            )
        mapped[lowered] = tenant
    return mapped


class Settings(BaseSettings):
    """Every setting of the worker; the README's configuration table lists them."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    # Broker: sqla+sqlite:// is the embedded default (in the user's data directory);
    # amqp:// selects RabbitMQ.
    broker_url: str = Field(default_factory=_default_broker_url, repr=False)  # credentials
    command_exchange: str = "relay.commands"
    command_queue: str = "relay.commands"
    event_exchange: str = "relay.events"
    dead_letter_queue: str = "relay.commands.dead"
    # Handlers running at once for commands of the command queue; each lane adds at most
    # its prefetch.
    concurrency: int = Field(default=32, ge=1, le=1000)
    # Messages RabbitMQ may hand a replica ahead of its handlers (default: twice the
    # concurrency). A settled delivery holds its slot until its event's confirm arrives, so
    # a prefetch equal to the concurrency would leave handlers idle meanwhile.
    prefetch: int | None = Field(default=None, ge=1, le=65535)
    # Deliveries (crashes, kills) before a command is failed as poison; generous, so that
    # replicas killed mid-command do not use it up.
    delivery_limit: int = Field(default=10, ge=2)
    broker_poll_interval_s: float = Field(default=0.02, gt=0)
    # A command larger than this is rejected before it is parsed (1000 object uuids, the
    # largest batch, take about 42 KiB). With the prefetch it bounds the bytes held.
    max_message_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Lanes (worker/broker/lanes.py): each configured account of a rate-limited vendor gets a
    # queue of its own, <prefix><vendor>.<tenant>, so its backlog waits there and not in
    # the command queue. The worker declares and consumes them; publishers never use them.
    lane_queue_prefix: str = Field(default="relay.lane.", min_length=1, max_length=120)
    # Deliveries a replica takes from one lane at once (default: 3 s of its budget, 30
    # for ESET's 10/s). Lane deliveries do not take the command queue's handler slots.
    lane_prefetch: int | None = Field(default=None, ge=1, le=65535)
    lane_poll_interval_s: float = Field(default=2, gt=0)  # lane backlog metrics, this often
    # reply_to is honoured only for queues a publisher owns: these name prefixes (the
    # server-named amq.gen-*, RabbitMQ's direct reply-to, and the client's own replies).
    reply_to_prefixes: tuple[str, ...] = ("relay.replies.", "amq.gen-", "amq.rabbitmq.reply-to")

    # Idempotency store: sqlite:///path (default: in the user's data directory) or redis://…
    idempotency_url: str = Field(default_factory=_default_idempotency_url, repr=False)
    idempotency_retention_s: float = Field(default=24 * 3600, gt=0)
    # A holder renews its claim every third of this; a claim not renewed for this long
    # (its holder died) is taken over.
    claim_lease_s: float = Field(default=30, gt=0)

    # Vendor calls
    http_timeout_s: float = Field(default=45, gt=0)  # ESET holds a call ~30 s before a 202
    # A vendor answer's body is kept up to this size (an event carries it); past it the
    # body is dropped and the event says so.
    max_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    retry_max_attempts: int = Field(default=5, ge=1)
    retry_initial_wait_s: float = Field(default=0.5, ge=0)
    retry_max_wait_s: float = Field(default=30, ge=0)
    # RabbitMQ only: back-off within one delivery up to this long, then through delay
    # queues (TTL, dead-lettered back) so no delivery is held for long.
    retry_in_process_s: float = Field(default=20, gt=0)
    retry_delays_s: tuple[float, ...] = (5.0, 30.0, 120.0)
    defer_delay_s: float = Field(default=2, gt=0)
    # The longest one delivery works on a command (a 202 collect may take minutes);
    # far below RabbitMQ's consumer_timeout (30 min).
    command_timeout_s: float = Field(default=600, gt=0, le=1200)
    collect_interval_s: float = Field(default=2, ge=0)
    eset_host_template: str = "https://{region}.{service}.eset.systems"
    token_refresh_margin_s: float = Field(default=300, ge=0)
    rate_limits: dict[str, str] = {"eset": "10/second"}
    rate_limit_url: str = Field(default="memory://", repr=False)
    rate_limit_margin: float = Field(default=0.03, ge=0, le=1)  # calls paced this much slower
    # ESET batch deletes of one tenant arriving within this window (and while their call
    # waits for the rate slot) go out as one call of at most batch_delete_max_objects
    # objects; 0 sends each command alone.
    batch_delete_window_ms: float = Field(default=0, ge=0, le=10_000)
    batch_delete_max_objects: int = Field(
        default=MAX_OBJECTS_PER_BATCH, ge=1, le=MAX_OBJECTS_PER_BATCH
    )

    # TLS (README "TLS"). amqps:// and rediss:// always verify the server's certificate
    # and name. A CA file (PEM) is trusted for the broker instead of the system's CAs, for
    # Redis besides them; a client certificate (its key in the key file, or in the same
    # file) is presented to a server that asks for one.
    broker_tls_ca_file: FilePath | None = None
    broker_tls_cert_file: FilePath | None = None
    broker_tls_key_file: FilePath | None = None
    redis_tls_ca_file: FilePath | None = None
    redis_tls_cert_file: FilePath | None = None
    redis_tls_key_file: FilePath | None = None
    # Vendor calls are https:// only (but a sandbox tenant's). Their certificates are
    # checked with these CAs (PEM) instead of certifi's bundle; they go through this
    # proxy (http://[USER:PASSWORD@]HOST:PORT); no proxy is taken from the environment.
    vendor_tls_ca_file: FilePath | None = None
    vendor_proxy_url: SecretStr | None = None

    @field_validator("broker_url", "idempotency_url", "rate_limit_url")
    @classmethod
    def _no_tls_options_in_url(cls, url: T, info: ValidationInfo) -> T:
        query = urlsplit(_plain(url)).query
        if any(name.lower().startswith("ssl") for name, _ in parse_qsl(query)):
            server = "BROKER" if info.field_name == "broker_url" else "REDIS"
            raise ValueError(
                "TLS options in the URL (?ssl…) are not read: remove them, and set "
                f"RELAY_{server}_TLS_CA_FILE, _CERT_FILE or _KEY_FILE instead"
            )
        return url

    @field_validator(
        "broker_tls_ca_file", "broker_tls_cert_file", "broker_tls_key_file",
        "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
    )
    @classmethod
    def _tls_files_with_tls(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        """TLS files with no TLS URL to use them are a mistake: the connection they were
        meant for would be plain."""
        server, _, kind = str(info.field_name).partition("_tls_")
        scheme = "amqps://" if server == "broker" else "rediss://"
        names = ["broker_url"] if server == "broker" else ["idempotency_url", "rate_limit_url"]
        urls = [info.data.get(name) for name in names]
        if path is None or any(url is None for url in urls):
            return path
        if not any(_plain(url).startswith(scheme) for url in urls):
            where = " or ".join(f"RELAY_{name.upper()}" for name in names)
            raise ValueError(f"is set, but {where} does not use {scheme}: use {scheme}")
        cert = f"{server}_tls_cert_file"
        if kind == "key_file" and cert in info.data and info.data[cert] is None:
            raise ValueError(f"a key without its certificate: set RELAY_{cert.upper()} too")
        return path

    @field_validator("vendor_proxy_url")
    @classmethod
    def _proxy_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url.get_secret_value())
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (
                parts.port is None or parts.port > 0
            )
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("should be a proxy URL: http://[USER:PASSWORD@]HOST:PORT")
        return url

    @field_validator("tenants")
    @classmethod
    def _eset_over_https(
        cls, tenants: dict[str, Tenant], info: ValidationInfo
    ) -> dict[str, Tenant]:
        template = info.data.get("eset_host_template")
        if template is None or is_https(template):
            return tenants
        plain = sorted(name for name, tenant in tenants.items()
                       if tenant.eset is not None and not tenant.sandbox)
        if plain:
            raise ValueError(
                f"RELAY_ESET_HOST_TEMPLATE is not an https:// URL, and {', '.join(plain)} "
                "has an ESET account: vendor calls go over TLS only; use https://, or mark "
                "the tenant as a sandbox or test endpoint (SANDBOX=true)"
            )
        return tenants

    # Operations
    shutdown_grace_s: float = Field(default=30, ge=0)  # SIGTERM: time to finish in-flight work
    health_port: int | None = Field(default=None, ge=0, le=65535)  # /healthz /readyz /metrics
    health_host: str = "0.0.0.0"
    # /healthz fails once the handler loop has not run for this long. It turns at least
    # every 0.25 s, and nothing on it may block; a loop silent for 30 s is stuck, not
    # slow: its claims' leases (30 s by default) lapse, and RabbitMQ drops its connection
    # after 60 s without heartbeats. With the manifests' probe (3 failures, 10 s apart) a
    # stuck replica is restarted about a minute after it stopped.
    liveness_stall_s: float = Field(default=30, gt=0)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    # A log line of counts (commands done by outcome, in flight, dead-lettered) this
    # often; 0: none.
    stats_interval_s: float = Field(default=60, ge=0)

    # Security: a directory of files named like settings (read before the settings, see
    # worker/secret_files.py), and whether a tenant naming no publishers is refused.
    secrets_dir: Path | None = None
    require_publishers: bool = False

    tenants: Annotated[dict[str, Tenant], AfterValidator(_tenant_map)] = Field(
        default_factory=TenantMap
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"should be one of {', '.join(LOG_LEVELS)}")
        return level.upper()

    @property
    def result_wait_s(self) -> float:
        """How long a command's result may take when every call of it fails transiently:
        each delivery's retries (with the last call's timeout) and, on RabbitMQ, the
        waits of the delay queues between deliveries. ``send --wait`` waits this long."""
        backoff_s = sum(
            min(self.retry_max_wait_s, self.retry_initial_wait_s * (1 << attempt))
            for attempt in range(self.retry_max_attempts - 1)
        )
        delivery_s = min(
            self.command_timeout_s, backoff_s + self.retry_max_attempts * self.http_timeout_s
        )
        delays = self.handler_timings.retry_delays_s
        if delays:  # a delivery backs off in process this long, then a delay queue waits
            delivery_s = min(delivery_s, self.retry_in_process_s + self.http_timeout_s)
        return (len(delays) + 1) * delivery_s + sum(delays)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment, then ``RELAY_X_FILE`` files, then the secrets directory."""
        directory = secrets_directory_source(settings_cls, file_secret_settings)
        files = FileVariablesSource(settings_cls)
        environment = without_file_variables(env_settings, settings_cls)
        return (init_settings, environment, dotenv_settings, files,
                *([directory] if directory is not None else []))

    @property
    def publisher_binding(self) -> PublisherBinding | None:
        """Who may publish for which tenant; None when nothing is checked: the embedded
        broker does not authenticate publishers, and with no tenant naming any (and
        require_publishers off) every publisher may act for every tenant."""
        named = {name: frozenset(tenant.publishers) for name, tenant in self.tenants.items()}
        if not self.uses_rabbitmq or not (self.require_publishers or any(named.values())):
            return None
        return PublisherBinding(named, self.require_publishers)

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds, as text: the accounts' passwords and
        client secrets (Spaaza's token as it is sent, ``id:secret``), and the passwords of
        the broker, store and proxy URLs (the proxy's also as its Basic credentials)."""
        found: list[str] = []
        for tenant in self.tenants.values():
            for account in (tenant.eset, tenant.fylr, tenant.spaaza):
                if account is None:
                    continue
                found += [
                    value.get_secret_value() for value in dict(account).values()
                    if isinstance(value, SecretStr)
                ]
            if tenant.spaaza is not None:  # sent as one: "Bearer id:secret"
                spaaza = tenant.spaaza
                found.append(f"{spaaza.token_id}:{spaaza.token_secret.get_secret_value()}")
        urls = [self.broker_url, self.idempotency_url, self.rate_limit_url]
        if self.vendor_proxy_url is not None:
            urls.append(self.vendor_proxy_url.get_secret_value())
        for url in urls:
            found += _url_secrets(url)
        return found

    @property
    def uses_rabbitmq(self) -> bool:
        return self.broker_url.startswith(AMQP_SCHEMES)

    @property
    def consumer(self) -> ConsumerSettings:
        return ConsumerSettings(
            broker_url=self.broker_url,
            concurrency=self.concurrency,
            prefetch=self.prefetch or 2 * self.concurrency,
            poll_interval_s=self.broker_poll_interval_s,
            delivery_limit=self.delivery_limit,
            shutdown_grace_s=self.shutdown_grace_s,
            heartbeat_s=HEARTBEAT_S,
            lane_poll_interval_s=self.lane_poll_interval_s,
            max_message_bytes=self.max_message_bytes,
            reply_to_prefixes=self.reply_to_prefixes,
            broker_tls=self.tls.broker,
            bind_publishers=self.publisher_binding is not None,
        )

    @property
    def handler_timings(self) -> HandlerTimings:
        return HandlerTimings(
            command_timeout_s=self.command_timeout_s,
            retry_in_process_s=self.retry_in_process_s,
            # Delay queues exist on RabbitMQ only; elsewhere retries stay in process.
            retry_delays_s=self.retry_delays_s if self.uses_rabbitmq else (),
            defer_s=self.defer_delay_s,
            claim_lease_s=self.claim_lease_s,
            defer_poll_s=DEFER_POLL_S,
            http_timeout_s=self.http_timeout_s,
        )

    @property
    def rate_limit(self) -> RateLimitSettings:
        return RateLimitSettings(
            limits=self.rate_limits,
            storage_url=self.rate_limit_url,
            margin=self.rate_limit_margin,
            # A call waits for the pace store as long as a delivery may work.
            outage_hold_s=self.command_timeout_s,
            storage_tls=self.tls.redis,
        )

    @property
    def retry(self) -> RetrySettings:
        return RetrySettings(
            max_attempts=self.retry_max_attempts,
            initial_wait_s=self.retry_initial_wait_s,
            max_wait_s=self.retry_max_wait_s,
        )

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(
            broker=TlsFiles(
                self.broker_tls_ca_file, self.broker_tls_cert_file, self.broker_tls_key_file
            ),
            redis=TlsFiles(
                self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file
            ),
            vendor_ca_file=self.vendor_tls_ca_file,
            vendor_proxy_url=self.vendor_proxy_url,
        )


def _url_secrets(url: str) -> list[str]:
    """The password of a URL, and its ``user:password`` as Basic credentials."""
    try:
        parts = urlsplit(url)
        user, password = parts.username or "", parts.password
    except ValueError:
        return []
    if not password:
        return []
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


def calls_per_s(text: str) -> float:
    """The sustained rate a limit allows (``"10/second"``: 10.0)."""
    window_s, amount = window_s_and_amount(text)
    return amount / window_s


def window_s_and_amount(text: str) -> tuple[float, int]:
    """A limit in the limits notation as its window and the calls it allows in it."""
    import limits  # ~0.1 s to import: only where a limit is read, not in every command

    item = limits.parse(text)
    return float(item.get_expiry()), int(item.amount)
