"""A user's mistake anywhere on the command line: a line or two naming the problem and the
fix, exit code 2, no traceback (unless ``--debug``), and never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from .command_line import assert_said_in_a_line_or_two, cli_env, run_cli

SECRET = "s3cret-Pa55word-never-shown"
SEND = ("send", "cancel-task", "--params", '{"task_id": 31}')


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("send", "cancel-task", "--params", "{task_id: 31"), ["--params", "not valid JSON"]),
        (("send", "cancel-task", "--params", "[31]"), ["--params", "a list"]),
        (("send", "--json", "no-such-command.json"), ["no such file"]),
        (("send",), ["TYPE"]),
        (("result",), ["--key"]),
        (("dlq", "list", "--older-than", "a while"), ["not a duration"]),
        (("dlq", "replay"), ["--all"]),
    ],
    ids=["params-not-json", "params-a-list", "json-file-missing", "no-type", "result-of-nothing",
         "bad-duration", "replay-of-nothing"],
)
def test_a_mistake_on_the_command_line(tmp_path: Path, args: tuple[str, ...], words: list[str]):
    done = run_cli(*args, env=cli_env(tmp_path))
    assert_said_in_a_line_or_two(done, *words)
    assert "fix:" in done.stderr


def test_a_json_file_holding_a_list_is_refused(tmp_path: Path):
    (tmp_path / "commands.json").write_text('[{"type": "cancel-task"}]')
    done = run_cli("send", "--json", str(tmp_path / "commands.json"), env=cli_env(tmp_path))
    assert_said_in_a_line_or_two(done, "a list", "one command")


def test_an_unsupported_broker_url(tmp_path: Path):
    done = run_cli(*SEND, env=cli_env(tmp_path, RELAY_BROKER_URL="foo://bar"))
    assert_said_in_a_line_or_two(done, "RELAY_BROKER_URL", "'foo'", "amqp://")


def test_a_refused_broker_password(tmp_path: Path, amqp_url: str):
    wrong = amqp_url.replace("guest:guest@", f"guest:{SECRET}@")
    assert wrong != amqp_url
    done = run_cli(*SEND, env=cli_env(tmp_path, RELAY_BROKER_URL=wrong))
    assert_said_in_a_line_or_two(done, "refused the login", "password in RELAY_BROKER_URL")
    assert SECRET not in done.stderr


def test_a_broker_that_is_not_there(tmp_path: Path):
    done = run_cli(*SEND, env=cli_env(tmp_path, RELAY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"))
    assert_said_in_a_line_or_two(done, "can not reach the broker", "127.0.0.1:1")


def test_a_configuration_error_shows_no_secret_even_with_debug(tmp_path: Path):
    """The account lacks its username; pydantic's own message would quote the input,
    the password with it."""
    env = cli_env(tmp_path, RELAY_TENANTS__DEFAULT__ESET__PASSWORD=SECRET)
    for args in (SEND, ("run",), ("result", "some-id")):
        done = run_cli(*args, env=env)
        assert_said_in_a_line_or_two(done, "RELAY_TENANTS__DEFAULT__ESET__USERNAME", "missing")
        assert SECRET not in done.stdout + done.stderr
    debug = run_cli("--debug", *SEND, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert SECRET not in debug.stdout + debug.stderr


def test_debug_shows_the_traceback(tmp_path: Path):
    done = run_cli("--debug", "send", "--json", "missing.json", env=cli_env(tmp_path))
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "UserError" in done.stderr


def test_version(tmp_path: Path):
    done = run_cli("--version", env=cli_env(tmp_path))
    assert done.returncode == 0
    name, version = done.stdout.split()
    assert name == "command-relay" and version[0].isdigit()


def test_the_embedded_defaults_work_from_an_empty_directory(tmp_path: Path):
    """No RELAY_* variable: the broker and the store are files in the user's data
    directory, made when first needed, whatever the working directory."""
    data, work = tmp_path / "data", tmp_path / "empty"
    work.mkdir()
    sent = run_cli(*SEND, env=cli_env(data), cwd=work)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.startswith("sent cancel-task ")
    looked_up = run_cli("result", "no-such-command", env=cli_env(data), cwd=work)
    assert looked_up.returncode == 4 and "unknown or expired" in looked_up.stdout
    assert {p.name for p in (data / "command-relay").iterdir()} >= {
        "broker.sqlite3", "idempotency.sqlite3"
    }
    assert not list(work.iterdir()), "nothing is written to the working directory"
