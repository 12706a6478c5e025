"""The vendor sandbox as a process of its own: prints its base URL, serves until SIGTERM.

    python -m bench.sandbox_proc [--no-rate-limit] [--latency-ms 100]
"""

from __future__ import annotations

import argparse
import signal
import threading

from worker.sandbox import Faults, SandboxConfig, SandboxServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-rate-limit", action="store_true", help="no per-account limit")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    config = SandboxConfig(rate_limit_per_s={}) if args.no_rate_limit else SandboxConfig()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with SandboxServer(config) as server:
        server.state.faults = Faults(latency_ms=args.latency_ms)
        print(server.base_url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
