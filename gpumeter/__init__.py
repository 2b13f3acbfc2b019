"""gpumeter: metering and billing for pooled GPU compute.

This core package holds what every part shares: the ``gpumeter`` CLI root,
settings (``GPUMETER_HOME`` and friends) and the usage-record contract
(the versioned Avro schemas and the Kafka framing). The parts live beside it:
``agent`` (GPU hosts), ``pipeline`` (Kafka -> ClickHouse), ``billing``.
"""

__version__ = "0.1.0"
