"""Benchmark harness for command-relay (``python -m bench``; see bench/README.md).

Not part of the test run: it needs a real RabbitMQ and Redis, starts the vendor sandbox
and the workers as processes of their own, and takes a minute or more.
"""
