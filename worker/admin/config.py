"""Loading and checking the configuration: what ``command-relay check`` prints, what
``run`` refuses to start with, and the one-line summary ``run`` starts by logging.

A problem is one line: the setting (its environment variable), what is wrong, and the
fix. Nothing here prints a value a setting holds, except host names and paths: a
validation error is reported without its input, and URLs lose their credentials.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import limits
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from schemas.commands import TENANT_PATTERN
from worker.admin import UserError
from worker.broker.lanes import lanes_from
from worker.idempotency import REDIS_SCHEMES, SQLITE_SCHEME
from worker.secret_files import SettingsFileError, file_variable_target
from worker.settings import AMQP_SCHEMES, APP_NAME, Settings

PREFIX = "RELAY_"
EMBEDDED_BROKER_SCHEME = "sqla+sqlite:///"
VENDORS = ("eset", "fylr", "spaaza")
TEMPLATE_FIELDS = ("region", "service")
NESTED_FIELDS = frozenset({"tenants", "rate_limits"})  # the settings that take NAME__KEY
# The test suite's own variables (tests/conftest.py), not settings of the worker.
FOREIGN_PREFIXES = ("RELAY_TEST_",)
README_TABLE = "see the configuration table in README.md"

Level = Literal["error", "warning", "ok"]


@dataclass(frozen=True)
class Problem:
    level: Level
    name: str  # the environment variable it is about
    problem: str
    fix: str

    def __str__(self) -> str:
        line = f"{self.level}: {self.name}: {self.problem}"
        return f"{line}; {self.fix}" if self.fix else line


class ConfigError(UserError):
    """The configuration has errors; one line each."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return [str(problem) for problem in self.problems]


def package_version() -> str:
    try:
        return version(APP_NAME)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def load_settings() -> Settings:
    """The settings from the environment; ConfigError (no input value in it) when they
    do not validate."""
    try:
        return Settings()
    except ValidationError as error:
        problems = validation_problems(error)
    except SettingsError as error:  # a JSON value that does not parse
        problems = [_unparsable(error)]
    raise ConfigError(problems) from None  # the original carries the input: not shown


def validation_problems(error: ValidationError) -> list[Problem]:
    """One problem per validation error, without the input (which may be a secret)."""
    problems = []
    for detail in error.errors(include_input=False, include_context=False, include_url=False):
        location = tuple(detail["loc"])
        name = env_name(location)
        message = str(detail["msg"]).replace("Input should", "should").removeprefix(
            "Value error, "
        )
        kind = detail["type"]
        if kind == "missing":
            problems.append(Problem("error", name, "is missing", f"set {name}"))
        elif kind == "extra_forbidden":
            problems.append(_unknown_nested(location, name))
        else:
            problems.append(Problem("error", name, message, _fix_for(kind)))
    return problems


def _fix_for(kind: str) -> str:
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"write a value of that type; {README_TABLE}"
    if kind in ("literal_error", "enum"):
        return "use one of the values listed"
    if kind.startswith(("greater_than", "less_than")):
        return "set a value within those limits"
    if kind.startswith("json"):
        return "write valid JSON"
    return README_TABLE


def _unparsable(error: SettingsError) -> Problem:
    if isinstance(error, SettingsFileError):  # a setting's file, or the secrets directory
        return Problem("error", error.name, error.problem, error.fix)
    match = re.search(r'field "(\w+)"', str(error))
    name = env_name((match.group(1),)) if match else "RELAY_*"
    return Problem("error", name, "is not valid JSON", "write the value as a JSON document")


def _unknown_nested(location: tuple[Any, ...], name: str) -> Problem:
    known = _fields_at(location[:-1])
    suggestion = difflib.get_close_matches(str(location[-1]).lower(), known, n=1)
    where = env_name(location[:-1])
    if suggestion:
        fix = f"did you mean {where}__{suggestion[0].upper()}?"
    else:
        fix = f"remove it ({where} takes {', '.join(f.upper() for f in known) or 'nothing'})"
    return Problem("error", name, "is not a setting", fix)


def _fields_at(location: tuple[Any, ...]) -> list[str]:
    """The field names of the model at ``location`` in Settings (``tenants.acme.eset``)."""
    model: type[BaseModel] | None = Settings
    map_of: type[BaseModel] | None = None  # the next part is a key of a map of these
    for part in location:
        if map_of is not None:
            model, map_of = map_of, None
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return []
        if get_origin(field.annotation) is dict:
            model, map_of = None, _model_in(field.annotation)
        else:
            model = _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def env_name(location: Iterable[Any]) -> str:
    """The environment variable of a setting at ``location`` (``tenants.acme.eset``)."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item).upper())
    return PREFIX + "__".join(parts)


def inspect(environ: Mapping[str, str] | None = None) -> tuple[Settings | None, list[Problem]]:
    """The settings (None when they do not load) and every problem found."""
    environ = os.environ if environ is None else environ
    try:
        settings = load_settings()
    except ConfigError as error:
        return None, _ordered([*error.problems, *unknown_names(environ), *_text_problems(environ)])
    return settings, check(settings, environ)


def _text_problems(environ: Mapping[str, str]) -> list[Problem]:
    """The checks of the URLs and the template, on the variables as they are (for when
    other settings do not validate)."""
    values = {name.upper(): value for name, value in environ.items()}
    fields = Settings.model_fields

    def value(name: str) -> str:
        field = fields[name]
        default = field.get_default(call_default_factory=True)
        return str(values.get(PREFIX + name.upper(), default))

    return [
        *broker_problems(value("broker_url")),
        *store_problems(value("idempotency_url")),
        *rate_limit_url_problems(value("rate_limit_url")),
        *template_problems(value("eset_host_template")),
    ]


def _ordered(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda problem: problem.level != "error")


def check(settings: Settings, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of valid settings: errors first, then warnings."""
    environ = os.environ if environ is None else environ
    problems = [
        *unknown_names(environ),
        *broker_problems(settings.broker_url),
        *store_problems(settings.idempotency_url),
        *rate_limit_problems(settings),
        *template_problems(settings.eset_host_template),
        *tenant_problems(settings),
        *publisher_problems(settings),
        *_queue_problems(settings),
        *lane_problems(settings),
    ]
    return _ordered(problems)


def errors(problems: Iterable[Problem], names: Iterable[str] | None = None) -> list[Problem]:
    """The errors among ``problems`` (about one of ``names``, when given)."""
    wanted = None if names is None else set(names)
    return [
        problem for problem in problems
        if problem.level == "error" and (wanted is None or problem.name in wanted)
    ]


def unknown_names(environ: Mapping[str, str]) -> list[Problem]:
    """``RELAY_*`` variables that set nothing, with the closest known name."""
    fields = Settings.model_fields
    known = [PREFIX + name.upper() for name in fields]
    problems = []
    for raw_name in sorted(environ):
        name = file_variable_target(raw_name, Settings) or raw_name.upper()  # X_FILE sets X
        if not name.startswith(PREFIX) or name.startswith(FOREIGN_PREFIXES):
            continue
        top, nested, rest = name.removeprefix(PREFIX).partition("__")
        field = top.lower()
        if field in fields and (not nested or field in NESTED_FIELDS):
            continue
        if field in fields:
            problems.append(Problem(
                "warning", raw_name, "is ignored",
                f"{PREFIX}{top} takes no nested names: set {PREFIX}{top} itself",
            ))
            continue
        close = difflib.get_close_matches(PREFIX + top, known, n=1, cutoff=0.75)
        if close:
            fix = f"did you mean {close[0]}{nested}{rest}?"
        else:
            fix = f"remove it, or {README_TABLE} for the names"
        problems.append(Problem("warning", raw_name, "is not a setting and is ignored", fix))
    return problems


def broker_problems(url: str) -> list[Problem]:
    name = "RELAY_BROKER_URL"
    if url.startswith(AMQP_SCHEMES):
        return _server_url_problems(name, url, "amqp://USER:PASSWORD@HOST:5672/VHOST")
    if url.startswith(EMBEDDED_BROKER_SCHEME):
        return _file_problems(name, url.removeprefix(EMBEDDED_BROKER_SCHEME))
    return [Problem(
        "error", name, f"the scheme {_scheme(url)} is not supported",
        "use amqp://USER:PASSWORD@HOST:5672/VHOST (RabbitMQ) or sqla+sqlite:///PATH "
        "(the embedded broker)",
    )]


def store_problems(url: str) -> list[Problem]:
    name = "RELAY_IDEMPOTENCY_URL"
    if url.startswith(REDIS_SCHEMES):
        return _redis_problems(name, url)
    if url.startswith(SQLITE_SCHEME):
        return _file_problems(name, url.removeprefix(SQLITE_SCHEME))
    return [Problem(
        "error", name, f"the scheme {_scheme(url)} is not supported",
        "use sqlite:///PATH (one host) or redis://HOST:6379/0 (a fleet)",
    )]


def rate_limit_url_problems(url: str) -> list[Problem]:
    if url.startswith(REDIS_SCHEMES):
        return _redis_problems("RELAY_RATE_LIMIT_URL", url)
    if url != "memory://":
        return [Problem(
            "error", "RELAY_RATE_LIMIT_URL", f"the scheme {_scheme(url)} is not supported",
            "use memory:// (one replica) or redis://HOST:6379/1 (a budget shared by replicas)",
        )]
    return []


def rate_limit_problems(settings: Settings) -> list[Problem]:
    problems = rate_limit_url_problems(settings.rate_limit_url)
    for vendor, limit in settings.rate_limits.items():
        name = env_name(("rate_limits", vendor))
        if vendor not in VENDORS:
            close = difflib.get_close_matches(vendor.lower(), VENDORS, n=1)
            fix = f"did you mean {close[0]}?" if close else f"use one of {', '.join(VENDORS)}"
            problems.append(Problem("warning", name, f"{vendor!r} is not a vendor", fix))
        try:
            limits.parse(limit)
        except ValueError:
            problems.append(Problem(
                "error", name, "is not a rate limit",
                'write it in the limits notation, e.g. "10/second" or "600/minute"',
            ))
    return problems


def template_problems(template: str) -> list[Problem]:
    name = "RELAY_ESET_HOST_TEMPLATE"
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as error:
        return [Problem(
            "error", name, f"is not a valid template ({error})",
            "write the placeholders as {region} and {service}; double a literal brace",
        )]
    problems = []
    for field in dict.fromkeys(fields):
        if field in TEMPLATE_FIELDS:
            continue
        close = difflib.get_close_matches(field, TEMPLATE_FIELDS, n=1)
        fix = f"did you mean {{{close[0]}}}?" if close else "use {region} and {service} only"
        problems.append(Problem("error", name, f"the placeholder {{{field}}} is unknown", fix))
    if problems:
        return problems
    for field in TEMPLATE_FIELDS:
        if field not in fields:
            problems.append(Problem(
                "warning", name, f"has no {{{field}}}",
                f"every ESET {field} would be called on the same host: add {{{field}}}",
            ))
    url = template.format(region="eu", service="automation")
    if not _is_http_url(url):
        problems.append(Problem(
            "error", name, "does not make an http(s) URL with a host",
            "write it like https://{region}.{service}.eset.systems",
        ))
    return problems


def tenant_problems(settings: Settings) -> list[Problem]:
    if not settings.tenants:
        return [Problem(
            "warning", "RELAY_TENANTS", "no tenant is configured, so every command will be "
            "rejected (unknown_tenant)",
            "configure one, e.g. RELAY_TENANTS__DEFAULT__ESET__USERNAME and __PASSWORD",
        )]
    problems = []
    for tenant_name, tenant in sorted(settings.tenants.items()):
        prefix = env_name(("tenants", tenant_name))
        if not TENANT_PATTERN.fullmatch(tenant_name):
            problems.append(Problem(
                "error", prefix, "no command can name this tenant (tenant names are 1-64 "
                "letters, digits, '_', '.' or '-')", "rename it",
            ))
        if not tenant.vendors:
            problems.append(Problem(
                "warning", prefix, "has no vendor account",
                f"add one ({prefix}__ESET__USERNAME, __FYLR__BASE_URL, __SPAAZA__BASE_URL …)",
            ))
        for vendor in ("fylr", "spaaza"):
            account = getattr(tenant, vendor)
            if account is not None and not _is_http_url(account.base_url):
                problems.append(Problem(
                    "error", f"{prefix}__{vendor.upper()}__BASE_URL",
                    "is not an http(s) URL with a host", "write it like https://HOST",
                ))
            elif account is not None and "@" in urlsplit(account.base_url).netloc:
                problems.append(Problem(
                    "error", f"{prefix}__{vendor.upper()}__BASE_URL",
                    "carries a user and password, which vendor calls can not send (the "
                    "account's own credentials are sent)", "remove USER:PASSWORD@ from it",
                ))
        fylr = tenant.fylr
        if fylr is not None and (fylr.username is None) != (fylr.password is None):
            problems.append(Problem(
                "warning", f"{prefix}__FYLR", "has a username or a password, not both, so "
                "the client credentials grant is used",
                "set both USERNAME and PASSWORD for the password grant, or neither",
            ))
    return problems


def publisher_problems(settings: Settings) -> list[Problem]:
    """Tenants bound to their publishers (README: "Publishers bound to tenants")."""
    named = sorted(name for name, tenant in settings.tenants.items() if tenant.publishers)
    if not settings.uses_rabbitmq:
        if not named and not settings.require_publishers:
            return []
        where = env_name(("tenants", named[0], "publishers")) if named else (
            "RELAY_REQUIRE_PUBLISHERS")
        return [Problem(
            "warning", where, "the embedded broker does not authenticate publishers, so "
            "publishers are not checked", "use RabbitMQ (RELAY_BROKER_URL=amqp://…) to bind "
            "tenants to their publishers",
        )]
    problems = []
    for tenant_name, tenant in sorted(settings.tenants.items()):
        name = env_name(("tenants", tenant_name, "publishers"))
        if tenant.publishers:
            continue
        if settings.require_publishers:
            problems.append(Problem(
                "error", name, "is not set, and RELAY_REQUIRE_PUBLISHERS refuses every "
                "command for a tenant naming no publishers (forbidden_tenant)",
                f"""set {name}='["AMQP_USER"]'""",
            ))
        elif named:
            problems.append(Problem(
                "warning", name, "is not set, so every publisher may act for this tenant, "
                f"those of {', '.join(named)} included",
                f"""set {name}='["AMQP_USER"]', or RELAY_REQUIRE_PUBLISHERS=true to refuse """
                "its commands",
            ))
    return problems


def _queue_problems(settings: Settings) -> list[Problem]:
    problems = []
    if any(delay <= 0 for delay in settings.retry_delays_s):
        problems.append(Problem(
            "error", "RELAY_RETRY_DELAYS_S", "every delay must be more than 0 seconds",
            "write a JSON list of positive numbers, e.g. [5, 30, 120]",
        ))
    if any(not prefix for prefix in settings.reply_to_prefixes):
        problems.append(Problem(
            "warning", "RELAY_REPLY_TO_PREFIXES", "an empty prefix lets reply_to name any "
            "queue", "remove the empty prefix",
        ))
    return problems


def lane_problems(settings: Settings) -> list[Problem]:
    """The consumer opens a channel for the command queue and one per lane, on one
    connection: the embedded broker has kombu's channel ids, no more."""
    if settings.uses_rabbitmq:
        return []
    from worker.broker.embedded import EmbeddedTransport  # SQLAlchemy: the embedded's only

    try:
        lanes = len(lanes_from(settings, {}))
    except ValueError:  # a rate limit that is not one: rate_limit_problems says so
        return []
    channels = EmbeddedTransport.channel_max
    if lanes + 1 <= channels:
        return []
    return [Problem(
        "error", "RELAY_TENANTS", f"{lanes} lanes (one per tenant account of a rate-limited "
        f"vendor) and the command queue need {lanes + 1} channels on one connection; the "
        f"embedded broker has {channels}",
        f"run at most {channels - 1} such accounts per worker, or use RabbitMQ",
    )]


def _server_url_problems(name: str, url: str, example: str) -> list[Problem]:
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return [Problem("error", name, "is not a valid URL", f"write it like {example}")]
    if not parsed.hostname:
        return [Problem("error", name, "names no host", f"write it like {example}")]
    return []


def _redis_problems(name: str, url: str) -> list[Problem]:
    problems = []
    if not url.startswith("unix://"):
        problems += _server_url_problems(name, url, "redis://:PASSWORD@HOST:6379/0")
    if importlib.util.find_spec("redis") is None:
        problems.append(Problem(
            "error", name, "Redis needs the redis package",
            "pip install 'command-relay[redis]'",
        ))
    return problems


def _file_problems(name: str, path: str) -> list[Problem]:
    if not path:
        return [Problem("error", name, "names no file", "add a path after the scheme's ///")]
    directory = Path(path).parent
    existing = next((d for d in (directory, *directory.parents) if d.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [Problem(
            "error", name, f"{existing} can not be written", "point it at a writable path",
        )]
    return []


def _is_http_url(url: str) -> bool:
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.hostname)


def _scheme(url: str) -> str:
    scheme, separator, _ = url.partition("://")
    return repr(scheme) if separator and len(scheme) <= 20 else "(none)"


def safe_url(url: str) -> str:
    """``url`` without its credentials (user and password)."""
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError:
        return f"{url.partition('://')[0]}://…"
    if not parsed.hostname:
        return url if "@" not in url else f"{parsed.scheme}://…"
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    netloc = host if port is None else f"{host}:{port}"
    return parsed._replace(netloc=netloc).geturl()


def summary(settings: Settings) -> str:
    """One line: what ``run`` runs with (no credentials)."""
    broker = ("RabbitMQ " if settings.uses_rabbitmq else "embedded ") + safe_url(
        settings.broker_url
    )
    tenants = ", ".join(
        f"{name} ({'+'.join(tenant.vendors) or 'no account'})"
        for name, tenant in sorted(settings.tenants.items())
    ) or "none"
    prefetch = settings.consumer.prefetch
    return (
        f"command-relay {package_version()}: broker {broker}; queue {settings.command_queue}, "
        f"dead letters {settings.dead_letter_queue}, events {settings.event_exchange}; "
        f"tenants {tenants}; concurrency {settings.concurrency} (prefetch {prefetch}); "
        f"idempotency {safe_url(settings.idempotency_url)}; "
        f"rate limits {safe_url(settings.rate_limit_url)}"
    )
