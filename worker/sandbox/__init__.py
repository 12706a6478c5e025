"""Vendor sandbox: a local emulator of the ESET Connect, fylr and Spaaza endpoints.

Tests and demos point the worker at it instead of the real vendors. One app serves all:

    /eset/{region}/{service}/...   ESET Connect, one host per region and service
    /fylr/api/...                  fylr
    /spaaza/tasks/{id}             Spaaza Services API
    /_sandbox/...                  stats, faults, reset, token revocation (no auth)

    with SandboxServer(SandboxConfig(pending_s=0.1)) as sandbox:
        sandbox.state.faults = Faults(script=[ScriptedFault(202)])
        ...  # point clients at sandbox.base_url
        sandbox.state.stats()["effects"]

Faults: `faults.py` (status faults, random rates, latency) and `hostile.py` (answers no
well-behaved vendor sends: redirects, bad response-ids, drips, resets, odd bodies, echoed
requests, bad tokens, bad Retry-After, huge headers), written on the connection as raw
bytes (`wire.py`, `connections.py`); named sets of them in `profiles.py`
(`command-relay sandbox --hostile`).
"""

from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig
from worker.sandbox.faults import Faults, ScriptedFault
from worker.sandbox.server import SandboxServer, serve
from worker.sandbox.state import SandboxState

__all__ = [
    "Faults",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "ScriptedFault",
    "create_app",
    "serve",
]
