"""Chaos scenarios: worker replicas as processes against real RabbitMQ and Redis."""
