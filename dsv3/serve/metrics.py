"""Prometheus metrics of the server, named as vLLM names them with the prefix `dsv3:`.

One `CollectorRegistry` per server (no process-global state): counters and histograms are updated by
the HTTP handlers as requests progress; gauges and the engine's own counters are read from the
engine loop's stats snapshot when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv3.serve.engine_loop import EngineLoop

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Reads the loop's snapshot at scrape time."""

    def __init__(self, loop: EngineLoop, model_name: str) -> None:
        self.loop, self.labels = loop, {"model_name": model_name}

    def _g(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"dsv3:{name}", doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _c(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(f"dsv3:{name}", doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):
        st = self.loop.stats()
        used = st.num_blocks - st.free_blocks
        yield self._g("num_requests_running", "Requests in the running batch.", st.running)
        yield self._g("num_requests_waiting", "Requests waiting for a seat or blocks.", st.waiting)
        yield self._g(
            "num_requests_queued", "Accepted requests without a first token yet.", st.queued_requests
        )
        yield self._g(
            "kv_cache_usage_perc", "Fraction of cache blocks in use (0..1).", used / max(1, st.num_blocks)
        )
        yield self._g("kv_cache_blocks_used", "Cache blocks in use.", used)
        yield self._g("kv_cache_blocks_total", "Cache blocks in the paged latent cache.", st.num_blocks)
        yield self._g("engine_alive", "1 while the engine thread runs.", 1.0 if self.loop.alive else 0.0)
        yield self._c("prompt_tokens", "Prompt tokens of admitted requests.", st.prompt_tokens)
        yield self._c("generation_tokens", "Generated tokens.", st.generation_tokens)
        yield self._c("prefill_tokens", "Prompt tokens actually prefilled (cache misses).", st.prefill_tokens)
        yield self._c("num_preemptions", "Sequences preempted for lack of blocks.", st.preemptions)
        yield self._c(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", st.prefix_queries
        )
        yield self._c("prefix_cache_hits", "Prompt tokens found in the prefix cache.", st.prefix_hits)
        yield self._c(
            "spec_decode_num_drafts", "Speculative verifications (one per row and step).", st.spec_drafts
        )
        yield self._c("spec_decode_num_draft_tokens", "Draft tokens proposed.", st.spec_proposed)
        yield self._c("spec_decode_num_accepted_tokens", "Draft tokens accepted.", st.spec_accepted)
        fin = CounterMetricFamily(
            "dsv3:request_success",
            "Finished requests by finish reason.",
            labels=[*self.labels, "finished_reason"],
        )
        for reason, n in sorted(st.finished.items()):
            fin.add_metric([*self.labels.values(), reason], n)
        yield fin
        if hasattr(self.loop, "rank_stats"):  # a disaggregated deployment (dsv3.deploy.router)
            yield from self._ranks(self.loop.rank_stats())

    def _ranks(self, ranks: list[dict]):
        """Per rank of a deployment: health, requests, KV traffic (labels rank, role)."""
        labels = [*self.labels, "rank", "role"]
        specs = [
            ("rank_alive", GaugeMetricFamily, "1 while the rank is healthy (heartbeats, process up).", "alive"),
            ("rank_requests_running", GaugeMetricFamily, "Requests the rank holds now.", "requests"),
            ("rank_requests", CounterMetricFamily, "Requests routed to the rank.", "served"),
            ("kv_transfer_bytes_sent", CounterMetricFamily, "KV-cache bytes sent (prefill ranks).", "kv_bytes_sent"),
            ("kv_transfer_bytes_received", CounterMetricFamily, "KV-cache bytes received (decode ranks).",
             "kv_bytes_received"),
            ("kv_transfer_retries", CounterMetricFamily, "KV transfers resent after a bad header/CRC.", "kv_retries"),
            ("kv_transfer_timeouts", CounterMetricFamily, "KV transfers not received in time.", "kv_timeouts"),
            ("kv_transfer_fallbacks", CounterMetricFamily, "Prefills recomputed on the decode rank.", "kv_fallbacks"),
        ]  # fmt: skip
        for name, kind, doc, key in specs:
            m = kind(f"dsv3:{name}", doc, labels=labels)
            for r in ranks:
                m.add_metric([*self.labels.values(), str(r["rank"]), r["role"]], float(r[key]))
            yield m


class Metrics:
    def __init__(self, loop: EngineLoop, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(f"dsv3:{name}", doc, labels, registry=self.registry, buckets=LATENCY_BUCKETS)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between two streamed outputs of a request.")
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue = hist(
            "request_queue_time_seconds", "Time from arrival to admission into the running batch."
        )
        self.rejected = Counter(
            "dsv3:admission_rejections", "Requests refused with 503 (queue full or draining).", labels,
            registry=self.registry,
        )  # fmt: skip
        self.rejected.labels(model_name)  # exported as 0 before the first rejection
        for h in (self.ttft, self.itl, self.e2e, self.queue):
            h.labels(model_name)
        self.registry.register(_EngineCollector(loop, model_name))

    def observe(self, hist: Histogram, seconds: float) -> None:
        hist.labels(self.model_name).observe(seconds)

    def reject(self) -> None:
        self.rejected.labels(self.model_name).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
