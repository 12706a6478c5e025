"""The command-relay message contract, version 1, as pydantic models.

Python publishers can import these to build commands and read result events; the
JSON Schemas beside this file are exported from them (``python -m schemas.export``).
"""

from schemas.commands import (
    COMMAND_TYPES,
    BatchDeleteCommand,
    BatchDeleteParams,
    CancelTaskCommand,
    CancelTaskParams,
    Command,
    EsetUpdateTriggersParams,
    FetchPatchingCommand,
    FetchPatchingParams,
    SpaazaUpdateTriggersParams,
    UpdateTriggersCommand,
    parse_command,
)
from schemas.events import (
    EVENT_CONTENT_TYPE,
    ErrorCode,
    ErrorInfo,
    Outcome,
    ResultData,
    ResultEvent,
    VendorAnswer,
)

__all__ = [
    "COMMAND_TYPES",
    "EVENT_CONTENT_TYPE",
    "BatchDeleteCommand",
    "BatchDeleteParams",
    "CancelTaskCommand",
    "CancelTaskParams",
    "Command",
    "ErrorCode",
    "ErrorInfo",
    "EsetUpdateTriggersParams",
    "FetchPatchingCommand",
    "FetchPatchingParams",
    "Outcome",
    "ResultData",
    "ResultEvent",
    "SpaazaUpdateTriggersParams",
    "UpdateTriggersCommand",
    "VendorAnswer",
    "parse_command",
]
