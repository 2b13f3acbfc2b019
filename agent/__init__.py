"""The gpumeter agent: samples GPUs, closes usage windows, sends them to Kafka."""

# in every batch (agent_version): 0.2.0 credits busy seconds to the interval they measure (gpumeter/CONTRACT.md)
# 0.3.0 also closes a GPU window per GPU and window, accounting every second of it (schema v4)
# 0.3.1 credits the holder of a GPU several firms share its own processes' use (per-process figures)
AGENT_VERSION = "0.3.1"
