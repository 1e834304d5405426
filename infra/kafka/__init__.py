"""A local Apache Kafka 4.x broker (KRaft, loopback) that the project provisions and starts itself."""

from infra.kafka.broker import (
    KAFKA_VERSION,
    BrokerConfig,
    BrokerError,
    BrokerStatus,
    bootstrap_servers,
    down,
    provision,
    provisioned,
    status,
    up,
)

__all__ = [
    "KAFKA_VERSION",
    "BrokerConfig",
    "BrokerError",
    "BrokerStatus",
    "bootstrap_servers",
    "down",
    "provision",
    "provisioned",
    "status",
    "up",
]
