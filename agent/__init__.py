"""The gpumeter agent: samples GPUs, closes usage windows, sends them to Kafka."""

# in every batch (agent_version): 0.2.0 credits busy seconds to the interval they measure (gpumeter/CONTRACT.md)
AGENT_VERSION = "0.2.0"
