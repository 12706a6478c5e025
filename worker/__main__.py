"""``python -m worker``: the ``command-relay`` command line."""

from worker.cli import main

main()
