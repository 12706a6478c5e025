"""Commands, contract version 1: what a playbook publishes.

Parse a command body with :func:`parse_command`; it raises
``pydantic.ValidationError`` with a message per wrong field.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
)

from schemas._base import ContractModel

CommandType = Literal["update-triggers", "batch-delete", "cancel-task", "fetch-patching"]
COMMAND_TYPES: tuple[str, ...] = get_args(CommandType)

# ESET accepts at most this many objects in one quarantine batch (inference from its
# list page size maximum; a larger batch is a validation error there too).
MAX_OBJECTS_PER_BATCH = 1000
MAX_ID_LENGTH = 200  # `id` and `idempotency_key`
MAX_TEXT_LENGTH = 4096  # Spaaza's free-text `desc` and `debug`
MAX_TARGET_FIELDS = 64  # Spaaza's `target` object
MAX_TASK_ID = 2**63 - 1  # the vendors' task ids are 64-bit integers
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


RFC_3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


def _rfc_3339(value: Any) -> Any:
    # pydantic would also read a number, or a string of digits, as Unix seconds.
    if isinstance(value, str) and RFC_3339.fullmatch(value):
        return value
    if isinstance(value, datetime):  # a Python publisher's own model
        return value
    raise ValueError("a time is an RFC 3339 string such as 2026-12-01T00:00:00Z")


# An RFC 3339 time with its offset: a string, never a number.
Time = Annotated[AwareDatetime, BeforeValidator(_rfc_3339)]

# A JSON integer and nothing else: no bool, no numeric string, no float, however whole.
TaskId = Annotated[int, Strict(), Field(ge=1, le=MAX_TASK_ID)]


class ManualTrigger(ContractModel):
    """ESET's only trigger type: run as soon as possible, not after ``expire_time``."""

    expire_time: Time | None = None


class EsetTrigger(ContractModel):
    manual: ManualTrigger


class EsetUpdateTriggersParams(ContractModel):
    """Replace the triggers of an ESET Connect device task."""

    provider: Literal["eset"] = "eset"
    task_uuid: uuid.UUID
    triggers: list[EsetTrigger] = Field(min_length=1)


class SpaazaTrigger(ContractModel):
    once: Time
    repeat: Literal["daily", "weekly", "monthly"] | None = None


class SpaazaUpdateTriggersParams(ContractModel):
    """Overwrite the trigger (and optionally desc, target, debug) of a Spaaza task."""

    provider: Literal["spaaza"]
    task_id: TaskId
    trigger: SpaazaTrigger
    desc: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)
    target: dict[str, Any] | None = Field(default=None, max_length=MAX_TARGET_FIELDS)
    debug: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)


def _provider_of(value: Any) -> str:
    # "provider" may be left out and then means ESET, so a plain discriminator
    # (which needs the key present) does not fit.
    if isinstance(value, dict):
        return str(value.get("provider", "eset"))
    return str(getattr(value, "provider", "eset"))


UpdateTriggersParams = Annotated[
    Annotated[EsetUpdateTriggersParams, Tag("eset")]
    | Annotated[SpaazaUpdateTriggersParams, Tag("spaaza")],
    Discriminator(_provider_of),
]


class BatchDeleteParams(ContractModel):
    """Delete ESET quarantined objects for good."""

    object_uuids: list[uuid.UUID] = Field(min_length=1, max_length=MAX_OBJECTS_PER_BATCH)


class CancelTaskParams(ContractModel):
    """Ask fylr to cancel a running task."""

    task_id: TaskId


class FetchPatchingParams(ContractModel):
    """No parameters: ESET lists the recent application patching attempts."""


class _CommandFields(ContractModel):
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    tenant: str = Field(default="default", pattern=f"^{TENANT_PATTERN.pattern}$")
    deadline: Time | None = None

    @property
    def command_id(self) -> str:
        """The id, once :meth:`with_defaults` has filled it in."""
        if self.id is None:
            raise ValueError("command id not resolved; call with_defaults() first")
        return self.id

    @property
    def key(self) -> str:
        """The idempotency key, defaulting to the id."""
        return self.idempotency_key or self.command_id

    def with_defaults(self, message_id: str | None) -> Any:
        """A copy with ``id`` filled in: the AMQP ``message_id``, else a new UUID."""
        if self.id is not None:
            return self
        return self.model_copy(update={"id": message_id or str(uuid.uuid4())})


class UpdateTriggersCommand(_CommandFields):
    type: Literal["update-triggers"]
    params: UpdateTriggersParams


class BatchDeleteCommand(_CommandFields):
    type: Literal["batch-delete"]
    params: BatchDeleteParams


class CancelTaskCommand(_CommandFields):
    type: Literal["cancel-task"]
    params: CancelTaskParams


class FetchPatchingCommand(_CommandFields):
    type: Literal["fetch-patching"]
    params: FetchPatchingParams = Field(default_factory=FetchPatchingParams)


Command = Annotated[
    UpdateTriggersCommand | BatchDeleteCommand | CancelTaskCommand | FetchPatchingCommand,
    Field(discriminator="type"),
]

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def parse_command(data: Any) -> Command:
    """Validate a decoded JSON object as a command of contract v1."""
    return COMMAND_ADAPTER.validate_python(data)
