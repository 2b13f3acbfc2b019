"""The gpumeter agent: samples GPUs, closes usage windows, sends them to Kafka."""

AGENT_VERSION = "0.1.0"
