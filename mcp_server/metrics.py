"""Prometheus metrics (`GET /metrics`), named and meant as vLLM's where they correspond, under our own prefix
(`vllm:num_requests_running` is `deepseek_mcp:num_requests_running`, and so on).

One `CollectorRegistry` per server (held by the pipeline, so every front end records into it; nothing global).
Per-request counters and histograms are recorded by the pipeline when an engine request ends; the engine's own
state (running, waiting, cache usage, prefix-cache queries and hits, preemptions) is read from the AsyncEngine
at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "deepseek_mcp:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """The engine's state at scrape time (nothing while the model loads or after it failed)."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        aengine = self.host.aengine
        if aengine is None:
            return
        s = aengine.stats()
        name = self.host.name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("num_requests_running", "Number of requests in model execution batches.", s.running)
        yield gauge("num_requests_waiting", "Number of requests waiting to be processed.", s.waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.cache_usage)
        yield counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      s.prefix_query_tokens)
        yield counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      s.prefix_hit_tokens)
        yield counter("num_preemptions", "Cumulative number of preemptions from the engine.", s.num_preemptions)
        if getattr(s, "speculative_tokens", 0):  # as vLLM's spec_decode counters (a verifying step: one draft)
            yield counter("spec_decode_num_drafts", "Number of spec decoding drafts.", s.verify_steps)
            yield counter("spec_decode_num_draft_tokens", "Number of draft tokens.", s.draft_tokens)
            yield counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.", s.accepted_tokens)


class Metrics:
    """The server's metrics; `render()` is the exposition text `/metrics` serves."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.", model,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         model, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Count of successfully processed requests (finished_reason: stop, length, "
            "time: the wall-time limit, cancelled: aborted by the engine).", [*model, "finished_reason"], registry=r)
        self.request_aborted = Counter(
            PREFIX + "request_aborted", "Requests that ended without a result (reason: cancelled: the client went "
            "away or the server shut down; failed: a generation error; timeout: no token within the wall time).",
            [*model, "reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              model, buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request (after the first token).",
                              model, buckets=_TPOT_BUCKETS, registry=r)
        # vLLM's inter_token_latency_seconds: one observation per generated token after the first of its
        # request; tokens one step delivers together count the gap for the first of them and 0 for the others
        # (RunResult.inter_token_s), so the count is generation tokens minus requests and the sum the decode time.
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             model, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             model, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds",
                               "Histogram of time spent in the waiting queue in seconds.", model,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.tool_calls = Counter(PREFIX + "mcp_tool_calls", "MCP tool calls by tool and outcome (ok, error).",
                                  ["tool", "outcome"], registry=r)
        self.registry.register(_EngineCollector(host))

    def observe_run(self, run: Any) -> None:
        """An engine request that ended with a result (a `RunResult`)."""
        model = self.host.name
        self.prompt_tokens.labels(model).inc(run.prompt_tokens)
        self.generation_tokens.labels(model).inc(len(run.token_ids))
        self.request_success.labels(model, run.finish_reason).inc()
        if run.ttft_s is not None:
            self.ttft.labels(model).observe(run.ttft_s)
        if run.decode_tok_s > 0:
            self.tpot.labels(model).observe(1.0 / run.decode_tok_s)
        itl = self.itl.labels(model)
        for gap in run.inter_token_s:
            itl.observe(gap)
        self.e2e.labels(model).observe(run.elapsed_s)
        self.queue.labels(model).observe(run.queued_s)

    def observe_abort(self, reason: str) -> None:
        self.request_aborted.labels(self.host.name, reason).inc()

    def observe_tool_call(self, tool: str, ok: bool) -> None:
        self.tool_calls.labels(tool, "ok" if ok else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
