"""The loader's self-metrics (Prometheus text, ``gpumeter.metrics``): what an operator watches."""

from __future__ import annotations

from gpumeter.metrics import Metric, one
from pipeline.keys import RegistryFile
from pipeline.loader import Loader

P = "gpumeter_loader_"


def collect(loader: Loader) -> list[Metric]:
    """Plain reads of the loader's counters; safe from the metrics thread (no Kafka or ClickHouse call)."""
    s = loader.stats
    lag = tuple(({"topic": loader.topic, "partition": str(p)}, float(n)) for p, n in sorted(loader.lag.items()))
    reasons = tuple(({"reason": r}, float(n)) for r, n in sorted(s.quarantined_by_reason.items()))
    return [
        one(P + "messages_total", "counter", "Messages made durable and committed.", s.messages),
        one(P + "windows_loaded_total", "counter", "Windows loaded into usage_raw.", s.windows),
        one(P + "quarantined_total", "counter", "Messages and windows rejected (quarantined, dead-lettered).",
            s.quarantined),
        Metric(P + "quarantined_by_reason_total", "counter", "Rejections by reason.", reasons),
        one(P + "blocks_deduplicated_total", "counter", "Blocks replayed after they had loaded: not inserted again.",
            s.deduplicated_blocks),
        one(P + "inserts_total", "counter", "Inserts into ClickHouse.", s.inserts),
        one(P + "commits_total", "counter", "Offset commits.", s.commits),
        one(P + "flush_failures_total", "counter", "Blocks ClickHouse or Kafka could not take; retried.",
            s.flush_failures),
        one(P + "commit_failures_total", "counter", "Offset commits that failed (the next owner replays).",
            s.commit_failures),
        one(P + "dropped_on_revoke_total", "counter", "Buffered messages of partitions taken away in a rebalance.",
            s.dropped_on_revoke),
        one(P + "last_commit_timestamp_seconds", "gauge", "Unix time of the last offset commit (0: none yet).",
            s.last_commit_unix),
        Metric(P + "lag_messages", "gauge", "Messages at the broker not yet committed by this loader (partitions "
               "it fetched from or committed).", lag),
        one(P + "assigned_partitions", "gauge", "Partitions the consumer group gave this loader.", loader.assigned),
        one(P + "stopped", "gauge", "1 when a permanent failure stopped the loader (exit 3).", s.stopped),
        one(P + "keys_file_stale", "gauge", "1 when the keys file changed and did not load (the keys loaded "
            "before are in force: a revocation may not be).", int(isinstance(loader.keys, RegistryFile)
                                                                  and loader.keys.stale)),
        one(P + "keys_reloads_total", "counter", "Times the keys file was read again after a change.",
            loader.keys.reloads if isinstance(loader.keys, RegistryFile) else 0),
    ]  # fmt: skip
