"""The ``command-relay`` command line: run the worker, try the demo, send a command."""

from __future__ import annotations

import json
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from schemas.events import ResultEvent

app = typer.Typer(
    help="Executes SIEM/SOAR playbook commands against vendor APIs and publishes result events.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def run() -> None:
    """Run the worker (what the Procfile starts). Configured by RELAY_* variables.

    SIGTERM or Ctrl-C stops taking new commands and lets in-flight ones finish.
    """
    from worker.ops import logs
    from worker.ops.telemetry import from_environment
    from worker.service import RelayService
    from worker.settings import Settings

    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    telemetry = from_environment(prometheus=settings.health_port is not None)
    RelayService(settings, telemetry=telemetry).run(stop)


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
    raise typer.Exit(0 if ok else 1)


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
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
) -> None:
    """Publish a command, from flags or from JSON, to the configured broker."""
    from worker.broker.topology import Topology
    from worker.client import CommandClient
    from worker.settings import Settings

    command = _command_from(command_type, params, tenant, key, deadline, file)
    settings = Settings()
    with CommandClient(settings.broker_url, Topology.from_settings(settings)) as client:
        reply_to = client.reply_queue() if wait else None
        message_id = client.publish(command, reply_to=reply_to)
        typer.echo(f"sent {command.get('type')} {message_id}", err=True)
        if not wait:
            return
        for reply in client.events(timeout):
            if reply.correlation_id == message_id:
                _print_event(reply.event)
                raise typer.Exit(0 if reply.event.data.outcome == "succeeded" else 1)
    typer.echo(f"no result event within {timeout:g}s", err=True)
    raise typer.Exit(2)


@app.command()
def sandbox(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8900,
) -> None:
    """Serve the vendor sandbox (ESET, fylr and Spaaza emulators) in the foreground."""
    from worker.sandbox import SandboxConfig, serve

    serve(host, port, SandboxConfig())


def _command_from(
    command_type: str | None,
    params: str,
    tenant: str,
    key: str | None,
    deadline: str | None,
    file: Path | None,
) -> dict[str, Any]:
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        loaded: dict[str, Any] = json.loads(text)
        return loaded
    if command_type is None:
        raise typer.BadParameter("give a TYPE or --json")
    command: dict[str, Any] = {
        "type": command_type,
        "id": str(uuid.uuid4()),
        "tenant": tenant,
        "params": json.loads(params),
    }
    if key:
        command["idempotency_key"] = key
    if deadline:
        command["deadline"] = deadline
    return command


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
    app()
