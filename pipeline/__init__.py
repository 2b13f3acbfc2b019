"""The pipeline: Kafka usage batches -> ClickHouse, each window counted once."""
