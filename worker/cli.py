"""The ``command-relay`` command line: run the worker, try the demo, send a command, look a
result up, check the configuration, and see to the dead-letter queue.

A mistake an operator can fix (a bad flag value, a missing file, a refused password, a
configuration error) ends the command with a line or two saying what is wrong and what to
do, and exit code 2; ``--debug`` (before the command) shows the traceback instead.

Exit codes: 0 done (``send --wait``, ``result``: the command succeeded); 1 the command
failed or was rejected, ``check`` found errors, ``dlq replay`` refused some; 2 a mistake
to fix; 3 no result yet (still running, or ``send --wait`` timed out); 4 ``result``:
unknown or expired.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from worker.admin import UserError

if TYPE_CHECKING:
    from schemas.events import ResultEvent
    from worker.admin.deadletters import DeadLetter, Report, Selection
    from worker.client import Reply
    from worker.settings import Settings

log = logging.getLogger("worker.cli")

app = typer.Typer(
    help="Executes SIEM/SOAR playbook commands against vendor APIs and publishes result events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # plain tracebacks, and never with local variables
)
dlq_app = typer.Typer(
    help="See to the dead-letter queue: list, show, replay or purge what it keeps.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

EXIT_FAILED = 1
EXIT_MISTAKE = 2
EXIT_NO_RESULT_YET = 3
EXIT_UNKNOWN = 4
PROGRESS_FROM = 10  # messages: a pass through the dead-letter queue shows a progress bar
REASON_WIDTH = 60
_options = {"debug": False}


def main() -> None:
    """The console script: the command line, a user's mistakes said in a line or two."""
    try:
        app()
    except UserError as error:
        if _options["debug"]:
            raise
        for line in error.lines():
            typer.echo(line, err=True)
        sys.exit(EXIT_MISTAKE)


def _show_version(value: bool) -> None:
    if value:
        from worker.admin.config import package_version

        typer.echo(f"command-relay {package_version()}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error (before the command).")
    ] = False,
) -> None:
    _options["debug"] = debug


@app.command()
def run() -> None:
    """Run the worker (what the Procfile starts). Configured by RELAY_* variables.

    Logs a summary of its configuration first, and refuses one `check` finds errors in.
    SIGTERM or Ctrl-C stops taking new commands and lets in-flight ones finish.
    """
    from worker.admin import config
    from worker.broker.connection import BrokerCertificateRefused
    from worker.ops import logs
    from worker.ops.stats import log_every
    from worker.ops.telemetry import from_environment
    from worker.redaction import Redactor
    from worker.service import RelayService

    settings = config.load_settings()
    redactor = Redactor(settings.secret_values())  # the logs' and the vendors' one
    logs.configure(settings.log_level, settings.log_format, redactor)
    problems = config.check(settings)
    refused = config.errors(problems)
    if refused:
        raise config.ConfigError(refused)
    for problem in problems:
        log.warning("configuration: %s", problem)
    log.info("%s", config.summary(settings))
    if settings.health_port:
        _require_free_port(settings.health_host, settings.health_port, "RELAY_HEALTH_PORT")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    telemetry = from_environment(prometheus=settings.health_port is not None)
    service = RelayService(settings, telemetry=telemetry, redactor=redactor)
    if settings.stats_interval_s > 0:
        threading.Thread(
            target=log_every,
            args=(telemetry.instruments.tally, settings.stats_interval_s, stop),
            name="stats",
            daemon=True,
        ).start()
    try:
        service.run(stop)
    except BrokerCertificateRefused as certificate:  # a setting to fix, not an outage
        raise UserError(certificate.problem, certificate.fix) from certificate


@app.command()
def demo(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an event.")] = 30.0,
) -> None:
    """Run sandbox vendors, an embedded broker and a worker; send one of each command.

    Prints each result event as it arrives; exits 0 when all of them succeeded.
    """
    from worker.demo import run_demo
    from worker.ops import logs

    logs.configure("WARNING")
    ok = run_demo(timeout, _print_summary_and_event)
    typer.echo("all commands succeeded" if ok else "some commands did not succeed", err=True)
    raise typer.Exit(0 if ok else EXIT_FAILED)


@app.command()
def send(
    command_type: Annotated[
        str | None, typer.Argument(metavar="TYPE", help="update-triggers, batch-delete, …")
    ] = None,
    params: Annotated[str, typer.Option(help="The params object, as JSON.")] = "{}",
    tenant: Annotated[str, typer.Option()] = "default",
    key: Annotated[str | None, typer.Option(help="Idempotency key (default: the id).")] = None,
    deadline: Annotated[str | None, typer.Option(help="RFC 3339 time.")] = None,
    file: Annotated[
        Path | None, typer.Option("--json", help="A whole command as JSON; '-' reads stdin.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result event and print it.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait with --wait (default: as long as the retries of "
                          "the configured schedule may take)."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress",
                     help="With --wait, say on standard error each stage the command reaches "
                          "(claimed, sent, waiting for a retry), read from the idempotency "
                          "store (default: when standard error is a terminal)."),
    ] = None,
) -> None:
    """Publish a command, from flags or from JSON, to the configured broker."""
    from worker.admin.mistakes import broker_errors, lost_while_waiting
    from worker.broker.topology import Topology
    from worker.client import CommandClient, ConnectionLost

    command = _command_from(command_type, params, tenant, key, deadline, file)
    settings = _settings("RELAY_BROKER_URL")
    wait_s = settings.result_wait_s if timeout is None else timeout
    with (
        broker_errors(settings.broker_url),
        CommandClient(
            settings.broker_url, Topology.from_settings(settings), settings.tls.broker
        ) as client,
    ):
        reply_to = client.reply_queue() if wait else None
        message_id = client.publish(command, reply_to=reply_to)
        typer.echo(f"sent {command.get('type')} {message_id}", err=True)
        if not wait:
            return
        typer.echo(
            f"waiting up to {wait_s:g}s for its result (Ctrl-C stops the waiting, not the "
            "command)…",
            err=True,
        )
        shown = sys.stderr.isatty() if progress is None else progress
        try:
            with _progress_of(settings, message_id, str(command.get("tenant")), shown):
                event = _result_of(client.events(wait_s), message_id)
        except ConnectionLost as lost:
            for line in lost_while_waiting(
                lost.__cause__ or lost, settings.broker_url, message_id
            ).lines():
                typer.echo(line, err=True)
            raise typer.Exit(EXIT_NO_RESULT_YET) from None
        if event is not None:
            _print_event(event)
            raise typer.Exit(0 if event.data.outcome == "succeeded" else EXIT_FAILED)
    typer.echo(
        f"no result within {wait_s:g}s; the command may still be running. Look it up "
        f"with: command-relay result {message_id}",
        err=True,
    )
    raise typer.Exit(EXIT_NO_RESULT_YET)


def _result_of(replies: Iterator[Reply], message_id: str) -> ResultEvent | None:
    """The event of ``message_id`` among ``replies``; None when they end without it."""
    for reply in replies:
        if reply.correlation_id == message_id:
            return reply.event
    return None


@contextmanager
def _progress_of(
    settings: Settings, command_id: str, tenant: str, shown: bool
) -> Iterator[None]:
    """While inside, ``send --wait``'s progress lines on standard error, if ``shown``."""
    if not shown:
        yield
        return
    from worker.admin.progress import ProgressWatch
    from worker.idempotency import open_store

    def store() -> Any:
        return open_store(
            settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s,
            settings.tls.redis,
        )

    say = partial(typer.echo, err=True)
    with ProgressWatch(store, command_id, say, tenant=tenant):
        yield


@app.command()
def result(
    command_id: Annotated[
        str | None, typer.Argument(metavar="ID", help="The command's id.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Look up by idempotency key instead.")
    ] = None,
    tenant: Annotated[
        str, typer.Option(help="The command's tenant (ids and keys are each tenant's own).")
    ] = "default",
) -> None:
    """Print a command's result event, read from the idempotency store.

    Says "still running" (exit 3) while it is being worked on, and "unknown or expired"
    (exit 4) when the store has nothing (results are kept RELAY_IDEMPOTENCY_RETENTION_S).
    """
    from worker.admin.mistakes import store_errors
    from worker.admin.results import look_up
    from worker.idempotency import open_store

    if (command_id is None) == (key is None):
        raise UserError("say which result", "give a command ID, or --key KEY (one of them)")
    settings = _settings("RELAY_IDEMPOTENCY_URL")

    async def lookup() -> Any:
        store = open_store(
            settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s,
            settings.tls.redis,
        )
        try:
            return await look_up(store, command_id, key, tenant)
        finally:
            await store.close()

    with store_errors(settings.idempotency_url):
        found = asyncio.run(lookup())
    if found.event is None:
        typer.echo(found.describe())
        raise typer.Exit(EXIT_UNKNOWN if found.state == "unknown" else EXIT_NO_RESULT_YET)
    typer.echo(found.describe(), err=True)
    _print_event(found.event)
    raise typer.Exit(0 if found.event.data.outcome == "succeeded" else EXIT_FAILED)


@app.command()
def check(
    probe: Annotated[
        bool,
        typer.Option("--probe", help="Also reach the broker and the stores, and fetch a "
                                     "token for each vendor account."),
    ] = False,
) -> None:
    """Check the configuration (RELAY_* variables): one line per problem, with its fix.

    Exits 1 when it finds an error (what `run` refuses to start with), else 0. No secret
    is printed.
    """
    from worker.admin import config
    from worker.admin.probe import probe as probe_all

    settings, problems = config.inspect()
    if settings is not None:
        typer.echo(config.summary(settings))
    for problem in problems:
        typer.echo(str(problem))
    if probe:
        if settings is None:
            typer.echo("not probed: fix the errors above first")
        else:
            probed = probe_all(settings)
            for problem in probed:
                typer.echo(str(problem))
            problems += probed
    found = config.errors(problems)
    warnings = [problem for problem in problems if problem.level == "warning"]
    typer.echo(f"{len(found)} error(s), {len(warnings)} warning(s)")
    raise typer.Exit(EXIT_FAILED if found else 0)


@app.command()
def sandbox(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8900,
    hostile: Annotated[
        list[str] | None,
        typer.Option(
            "--hostile", metavar="PROFILE|JSON|FILE",
            help="Serve hostile faults: a profile (see --list-hostile; it answers every "
                 "call it matches), or a fault as JSON, e.g. '{\"kind\": \"drip\", "
                 "\"part\": \"head\", \"interval_s\": 1, \"times\": null}' (a list of "
                 "them, or a file of either). Repeatable; the first that matches a call "
                 "answers it.",
        ),
    ] = None,
    list_hostile: Annotated[
        bool,
        typer.Option("--list-hostile", help="Print the hostile profiles and their JSON, "
                                            "and exit."),
    ] = False,
) -> None:
    """Serve the vendor sandbox (ESET, fylr and Spaaza emulators) in the foreground.

    With --hostile, calls get answers no well-behaved vendor sends (redirects, bad
    response-ids, drips, resets, odd bodies, echoed credentials, bad tokens, bad
    Retry-After, huge headers); PUT /_sandbox/faults replaces them while it runs.
    """
    from worker.sandbox import Faults, SandboxConfig, serve
    from worker.sandbox.profiles import PROFILES, describe, hostile_script

    if list_hostile:
        for name, profile in PROFILES.items():
            typer.echo(f"{name}: {profile.description}")
            for fault in profile.faults:
                typer.echo(f"  {describe(fault)}")
        return
    try:
        script = hostile_script(hostile or [])
    except ValueError as error:
        raise UserError(
            f"--hostile: {error}",
            "name a profile (command-relay sandbox --list-hostile), or give a fault as JSON",
        ) from error
    _require_free_port(host, port, "--port")
    for entry in script:
        typer.echo(f"hostile: {describe(entry)}", err=True)
    serve(host, port, SandboxConfig(), Faults(script=script))


# The dead-letter queue's commands share their filters.
Ids = Annotated[
    list[str] | None, typer.Argument(metavar="[ID]...", help="Command ids (or message ids).")
]
Codes = Annotated[
    list[str] | None, typer.Option("--code", help="Only this error code (repeatable).")
]
Tenants = Annotated[
    list[str] | None, typer.Option("--tenant", help="Only this tenant (repeatable).")
]
Types = Annotated[
    list[str] | None, typer.Option("--type", help="Only this command type (repeatable).")
]
OlderThan = Annotated[
    str | None, typer.Option(help="Only those dead-lettered at least this long ago (90s, 2h, 1d).")
]
NewerThan = Annotated[
    str | None, typer.Option(help="Only those dead-lettered less than this long ago.")
]
LockTimeout = Annotated[
    str,
    typer.Option(help="How long to wait for another dlq command going through the queue "
                      "(90s, 5m)."),
]
LOCK_TIMEOUT = "2m"


@dlq_app.command("list")
def dlq_list(
    code: Codes = None,
    tenant: Tenants = None,
    command_type: Types = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    lock_timeout: LockTimeout = LOCK_TIMEOUT,
) -> None:
    """List the dead letters: id, type, tenant, error code, age and reason.

    The queue keeps its messages, in their order: each is read, then put back behind the
    others, after the broker confirmed its copy. One dlq command at a time goes through
    the queue: the others wait for it.
    """
    from worker.admin.deadletters import as_json as letter_json

    settings = _settings("RELAY_BROKER_URL")
    selection = _selection(None, code, tenant, command_type, older_than, newer_than)
    queue_name, letters, chosen = _read_chosen(settings, selection, lock_timeout)
    if as_json:
        for letter in chosen:
            typer.echo(json.dumps(letter_json(letter)))
    else:
        _print_table(chosen, datetime.now(UTC))
    typer.echo(f"{len(chosen)} of {len(letters)} message(s) in {queue_name}", err=True)


@dlq_app.command("show")
def dlq_show(ids: Ids = None, lock_timeout: LockTimeout = LOCK_TIMEOUT) -> None:
    """Show dead letters in full: headers, body, and the outcome the store keeps."""
    from worker.admin.deadletters import as_json as letter_json

    if not ids:
        raise UserError("say which dead letters to show", "give their ids (see dlq list)")
    settings = _settings("RELAY_BROKER_URL", "RELAY_IDEMPOTENCY_URL")
    selection = _selection(ids, None, None, None, None, None)
    _, _, chosen = _read_chosen(settings, selection, lock_timeout)
    if not chosen:
        raise UserError(f"no dead letter has the id {', '.join(ids)}", "see dlq list")
    stored = _stored_outcomes(settings, chosen)
    for letter in chosen:
        shown = letter_json(letter)
        shown["stored_outcomes"] = stored.get(letter.position, [])
        typer.echo(json.dumps(shown, indent=2, default=str))


@dlq_app.command("replay")
def dlq_replay(
    ids: Ids = None,
    code: Codes = None,
    tenant: Tenants = None,
    command_type: Types = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    every: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    force: Annotated[
        bool,
        typer.Option(help="Replay result_lost commands too (the vendor may already have "
                          "acted on them: check there first)."),
    ] = False,
    lock_timeout: LockTimeout = LOCK_TIMEOUT,
) -> None:
    """Send chosen dead letters back to the command queue as new attempts.

    The failed or rejected outcome the idempotency store keeps for the command is released
    first, so it is tried afresh. Refused: a letter whose command has another outcome by
    now (replayed already), and a result_lost command unless --force. Letters
    dead-lettered after the command began are left alone.
    """
    from worker.admin.deadletters import Replayer, Verdict
    from worker.admin.mistakes import store_errors
    from worker.idempotency import open_store

    began = _invoked_at()
    selection = _selection(ids, code, tenant, command_type, older_than, newer_than)
    if selection.everything and not every:
        raise UserError(
            "say which dead letters to replay", "give their ids, a filter, or --all"
        )
    settings = _settings("RELAY_BROKER_URL", "RELAY_IDEMPOTENCY_URL")
    store = open_store(
        settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s,
        settings.tls.redis,
    )
    with (
        store_errors(settings.idempotency_url),
        Replayer(store, force) as replayer,
        _dead_letters(settings, lock_timeout) as queue,
        _progress("replaying") as step,
    ):
        def decide(letter: DeadLetter) -> Verdict:
            if not selection.matches(letter, began) or not replayer.prepare(letter):
                return Verdict.KEEP
            return Verdict.REPLAY

        report = queue.walk(decide, step, since=began)
    for letter in report.replayed:
        typer.echo(f"replayed {letter.command_id} ({letter.command_type or '?'}, "
                   f"{letter.error_code or '?'})")
    for letter, key in replayer.released:
        typer.echo(f"  released the stored outcome of key {key!r} ({letter.command_id})")
    for letter, why in replayer.refused:
        typer.echo(f"refused {letter.command_id}: {why}")
    typer.echo(f"{len(report.replayed)} replayed, {len(replayer.refused)} refused, "
               f"{report.kept} left in {queue.name}{_left_alone(report)}", err=True)
    raise typer.Exit(EXIT_FAILED if replayer.refused else 0)


@dlq_app.command("purge")
def dlq_purge(
    ids: Ids = None,
    code: Codes = None,
    tenant: Tenants = None,
    command_type: Types = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    lock_timeout: LockTimeout = LOCK_TIMEOUT,
) -> None:
    """Drop dead letters for good: those chosen, or (without ids or filters) all of them.

    Asks for confirmation first, unless --yes. Letters dead-lettered after the command
    began are left alone.
    """
    from worker.admin.deadletters import Verdict

    began = _invoked_at()
    settings = _settings("RELAY_BROKER_URL")
    selection = _selection(ids, code, tenant, command_type, older_than, newer_than)
    chosen = _purge_chosen(settings, selection, yes, lock_timeout)
    if chosen is None:
        return

    def decide(letter: DeadLetter) -> Verdict:
        if selection.everything or _identity(letter) in chosen:
            return Verdict.DROP
        return Verdict.KEEP

    with _dead_letters(settings, lock_timeout) as queue, _progress("purging") as step:
        report = queue.walk(decide, step, since=began)
    typer.echo(f"purged {len(report.dropped)} message(s) from {queue.name}"
               f"{_left_alone(report)}")


def _purge_chosen(
    settings: Settings, selection: Selection, yes: bool, lock_timeout: str
) -> set[Identity] | None:
    """What ``dlq purge`` drops, once the operator said yes: the identities of the letters
    ``selection`` picks (an empty set: all of them); None when there is nothing to drop.
    The queue is not held while the operator is asked."""
    if selection.everything:
        with _dead_letters(settings, lock_timeout) as queue:
            total = queue.count()
        if total == 0:
            typer.echo(f"{queue.name} is empty")
            return None
        _confirm(f"Drop all {total} message(s) of {queue.name}?", yes)
        return set()
    queue_name, letters, picked = _read_chosen(settings, selection, lock_timeout)
    if not picked:
        typer.echo(f"no message of {queue_name} matches")
        return None
    _confirm(f"Drop {len(picked)} of the {len(letters)} message(s) of {queue_name}?", yes)
    return {_identity(letter) for letter in picked}


def _invoked_at() -> datetime:
    """When this command was invoked: when its process started (Linux), else now. Not
    when the dlq function starts: on a loaded host the imports before it may take
    seconds, in which another command's replay may have failed again already."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # starttime, field 22, in clock ticks since boot; fields after the name
            start_ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc: not Linux
        age_s = 0.0
    return datetime.now(UTC) - timedelta(seconds=max(age_s, 0.0))


def _left_alone(report: Report) -> str:
    if not report.later:
        return ""
    return f" ({report.later} dead-lettered since this command began, left alone)"


def _require_free_port(host: str, port: int, setting: str) -> None:
    """A UserError when ``host:port`` can not be listened on (taken, not allowed)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise UserError(
            f"can not listen on {host}:{port} ({error.strerror or error})",
            f"choose a free port with {setting}, or stop what uses it",
        ) from None


def _settings(*names: str) -> Settings:
    """The settings, refused with their errors (those about ``names``: what the command
    uses)."""
    from worker.admin import config

    settings = config.load_settings()
    refused = config.errors(config.check(settings), names)
    if refused:
        raise config.ConfigError(refused)
    return settings


@contextmanager
def _dead_letters(settings: Settings, lock_timeout: str) -> Iterator[Any]:
    """The dead-letter queue, connected; a pass through it waits up to ``lock_timeout``
    for another command's, saying so."""
    from worker.admin.deadletters import DeadLetterQueue, parse_duration
    from worker.admin.mistakes import broker_errors

    wait_s = parse_duration(lock_timeout)

    def say_waiting() -> None:
        typer.echo(f"waiting for another dlq command to finish with "
                   f"{settings.dead_letter_queue}… (at most {lock_timeout})", err=True)

    with (
        broker_errors(settings.broker_url),
        DeadLetterQueue(settings, wait_s, say_waiting) as queue,
    ):
        yield queue


def _read_chosen(
    settings: Settings, selection: Selection, lock_timeout: str
) -> tuple[str, list[DeadLetter], list[DeadLetter]]:
    """The queue's name, its dead letters (read in one pass; it keeps them) and those
    ``selection`` picks."""
    with (
        _dead_letters(settings, lock_timeout) as queue,
        _progress("reading the dead-letter queue") as step,
    ):
        letters = queue.read(step)
    now = datetime.now(UTC)
    return queue.name, letters, [letter for letter in letters if selection.matches(letter, now)]


@contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A step callback ``(done, total)`` that shows a progress bar on standard error
    for a pass over many messages."""
    bar: Any = None

    def step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= PROGRESS_FROM:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        if bar is not None:
            bar.update(done - bar.pos)

    try:
        yield step
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _selection(
    ids: list[str] | None,
    codes: list[str] | None,
    tenants: list[str] | None,
    types: list[str] | None,
    older_than: str | None,
    newer_than: str | None,
) -> Selection:
    from worker.admin.deadletters import Selection, parse_duration

    return Selection(
        ids=frozenset(ids or ()),
        codes=frozenset(codes or ()),
        tenants=frozenset(t.lower() for t in tenants or ()),
        types=frozenset(types or ()),
        older_than_s=parse_duration(older_than) if older_than else None,
        newer_than_s=parse_duration(newer_than) if newer_than else None,
    )


Identity = tuple[str, str | None, str, str | None]


def _identity(letter: DeadLetter) -> Identity:
    """What tells one dead letter from another across two passes."""
    import hashlib

    stamp = letter.dead_lettered_at.isoformat() if letter.dead_lettered_at else None
    return (letter.command_id, letter.message_id, hashlib.sha256(letter.body).hexdigest(),
            stamp)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(
            "purging asks for a confirmation, and standard input is not a terminal",
            "add --yes to purge without asking",
        )
    if not typer.confirm(question, default=False):
        typer.echo("nothing purged")
        raise typer.Exit(EXIT_FAILED)


def _stored_outcomes(settings: Settings, letters: list[DeadLetter]) -> dict[int, list[Any]]:
    """The events the idempotency store keeps for each letter's keys, by position."""
    from worker.admin.mistakes import store_errors
    from worker.idempotency import open_store

    async def find_all() -> dict[int, list[Any]]:
        store = open_store(
            settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s,
            settings.tls.redis,
        )
        try:
            found: dict[int, list[Any]] = {}
            for letter in letters:
                for key in letter.store_keys():
                    record = await store.find(key)
                    if record is not None and record.event is not None:
                        found.setdefault(letter.position, []).append(
                            {"key": key, "event": record.event.model_dump(mode="json")}
                        )
            return found
        finally:
            await store.close()

    with store_errors(settings.idempotency_url):
        return asyncio.run(find_all())


def _print_table(letters: list[DeadLetter], now: datetime) -> None:
    from worker.admin.deadletters import describe_age

    rows = [("ID", "TYPE", "TENANT", "CODE", "AGE", "REASON")]
    for letter in letters:
        reason = " ".join(letter.reason.split())
        if len(reason) > REASON_WIDTH:
            reason = reason[: REASON_WIDTH - 1] + "…"
        rows.append((
            letter.command_id, letter.command_type or "-", letter.tenant or "-",
            letter.error_code or "-", describe_age(letter.age_s(now)), reason,
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        typer.echo("  ".join([*cells, row[5]]))


def _command_from(
    command_type: str | None,
    params: str,
    tenant: str,
    key: str | None,
    deadline: str | None,
    file: Path | None,
) -> dict[str, Any]:
    if file is not None:
        return _object_from(
            _read_json_file(file), f"--json {file}",
            'give one command, e.g. {"type": "cancel-task", "params": {"task_id": 31}}',
        )
    if command_type is None:
        raise UserError("say what to send", "give a TYPE (e.g. cancel-task) or --json FILE")
    command: dict[str, Any] = {
        "type": command_type,
        "id": str(uuid.uuid4()),
        "tenant": tenant,
        "params": _object_from(
            _parse_json(params, "--params"), "--params", 'give one object, e.g. {"task_id": 31}'
        ),
    }
    if key:
        command["idempotency_key"] = key
    if deadline:
        command["deadline"] = deadline
    return command


def _read_json_file(file: Path) -> Any:
    if str(file) == "-":
        return _parse_json(sys.stdin.read(), "the JSON on standard input")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"--json {file}: no such file", "give the path of a JSON file, or - for stdin"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"--json {file} can not be read ({type(error).__name__})",
            "give a readable UTF-8 JSON file",
        ) from None
    return _parse_json(text, f"--json {file}")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{what} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno})",
            "quote the JSON for the shell, e.g. --params '{\"task_id\": 31}'",
        ) from None


def _object_from(value: Any, what: str, fix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise UserError(f"{what} holds {kind}, not a JSON object", fix)
    return value


def _print_event(event: ResultEvent) -> None:
    typer.echo(event.model_dump_json(indent=2))


def _print_summary_and_event(event: ResultEvent) -> None:
    data, vendor = event.data, event.data.vendor
    line = f"{data.type:<16} {data.outcome:<9} attempts={data.attempts}"
    if vendor is not None:
        line += f" {vendor.name} status={vendor.status}"
        if vendor.response_id:
            line += f" response_id={vendor.response_id}"
    if data.error is not None:
        line += f" error={data.error.code}: {data.error.message}"
    typer.echo(line)
    typer.echo(f"  {event.model_dump_json()}")


if __name__ == "__main__":
    main()
