"""Write the JSON Schemas of the contract beside this module.

    python -m schemas.export          # rewrite the files
    python -m schemas.export --check  # exit 1 when they differ from the models
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.commands import Command
from schemas.events import ResultEvent

SCHEMA_DIR = Path(__file__).parent
BASE_ID = "https://command-relay.dev/schemas/v1/"


def rendered_schemas() -> dict[str, str]:
    """File name → JSON text, exactly as checked in."""
    schemas: dict[str, dict[str, Any]] = {
        "command.schema.json": TypeAdapter(Command).json_schema(),
        "result-event.schema.json": ResultEvent.model_json_schema(),
    }
    rendered = {}
    for name, schema in schemas.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": BASE_ID + name, **schema}
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def main(argv: list[str]) -> int:
    stale = []
    for name, text in rendered_schemas().items():
        path = SCHEMA_DIR / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m schemas.export", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
