#!/usr/bin/env python3
"""Writes kiln's Grafana dashboards (deploy/grafana/*.json) from the panel lists below, so
every dashboard has the same variables and layout. Run it after changing a panel; the
dashboards' test (tests/api/test_dashboards.py) evaluates every expression against a live
Prometheus scraping a cluster."""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
M = '{model=~"$model"}'
I = '{instance=~"$instance"}'
MI = '{model=~"$model", instance=~"$instance"}'

DASHBOARDS = {
    "kiln-overview": ("kiln: cluster overview", [
        ("stat", "Requests per second", [f'sum(rate(kiln_router_requests_total{{route=~"/v1/.*"}}[$__rate_interval]))'], "reqps"),
        ("stat", "Generated tokens per second", [f"sum(rate(kiln_router_generated_tokens_total{M}[$__rate_interval]))"], "short"),
        ("stat", "Workers up", ["count(max by (worker) (kiln_router_worker_up) == 1)"], "short"),
        ("stat", "Sequence slots on healthy workers", ["max(kiln_router_worker_capacity)"], "short"),
        ("timeseries", "Requests by status", ['sum by (status) (rate(kiln_router_requests_total{route=~"/v1/.*"}[$__rate_interval]))'], "reqps"),
        ("timeseries", "Time to first token p50 / p99", [
            f"histogram_quantile(0.5, sum by (le) (rate(kiln_router_time_to_first_token_seconds_bucket{M}[$__rate_interval])))",
            f"histogram_quantile(0.99, sum by (le) (rate(kiln_router_time_to_first_token_seconds_bucket{M}[$__rate_interval])))"], "s"),
        ("timeseries", "Running and waiting sequences", [f"sum(kiln_worker_running_sequences{MI})", f"sum(kiln_worker_waiting_sequences{MI})"], "short"),
        ("timeseries", "KV cache blocks in use", [f"sum(kiln_worker_kv_blocks_in_use{MI}) / sum(kiln_worker_kv_blocks_capacity{MI})"], "percentunit"),
    ]),
    "kiln-router": ("kiln: router", [
        ("timeseries", "Request rate by route and status", ["sum by (route, status) (rate(kiln_router_requests_total[$__rate_interval]))"], "reqps"),
        ("timeseries", "Refused for a full queue (429)", ['sum(rate(kiln_router_requests_total{status="429"}[$__rate_interval]))'], "reqps"),
        ("timeseries", "Time to first token p50 / p90 / p99", [
            f"histogram_quantile({q}, sum by (le) (rate(kiln_router_time_to_first_token_seconds_bucket{M}[$__rate_interval])))" for q in (0.5, 0.9, 0.99)], "s"),
        ("timeseries", "Inter-token latency p50 / p99", [
            f"histogram_quantile({q}, sum by (le) (rate(kiln_router_inter_token_latency_seconds_bucket{M}[$__rate_interval])))" for q in (0.5, 0.99)], "s"),
        ("timeseries", "Response head latency p99 by route", ["histogram_quantile(0.99, sum by (le, route) (rate(kiln_router_request_duration_seconds_bucket[$__rate_interval])))"], "s"),
        ("timeseries", "In flight and capacity", [f"sum(kiln_router_in_flight_requests{I})", f"max(kiln_router_worker_capacity{I})"], "short"),
        ("timeseries", "Prompt and generated tokens per second", [
            f"sum(rate(kiln_router_prompt_tokens_total{M}[$__rate_interval]))", f"sum(rate(kiln_router_generated_tokens_total{M}[$__rate_interval]))"], "short"),
        ("timeseries", "Router heap", [f"kiln_router_heap_allocated_bytes{I}", f"kiln_router_heap_resident_bytes{I}"], "bytes"),
    ]),
    "kiln-worker": ("kiln: worker engine", [
        ("timeseries", "Running sequences", [f"sum by (instance) (kiln_worker_running_sequences{MI})"], "short"),
        ("timeseries", "Waiting sequences", [f"sum by (instance) (kiln_worker_waiting_sequences{MI})"], "short"),
        ("timeseries", "Tokens per engine step", [
            f"sum by (instance) (rate(kiln_worker_generated_tokens_total{MI}[$__rate_interval])) / sum by (instance) (rate(kiln_worker_steps_total{MI}[$__rate_interval]))"], "short"),
        ("timeseries", "KV blocks in use / cached / capacity", [
            f"sum by (instance) (kiln_worker_kv_blocks_in_use{MI})", f"sum by (instance) (kiln_worker_kv_blocks_cached{MI})",
            f"sum by (instance) (kiln_worker_kv_blocks_capacity{MI})"], "short"),
        ("timeseries", "Prefix-cache hit rate", [
            f"sum by (instance) (rate(kiln_worker_prefix_cache_hit_tokens_total{MI}[$__rate_interval])) / sum by (instance) (rate(kiln_worker_prefix_cache_query_tokens_total{MI}[$__rate_interval]))"], "percentunit"),
        ("timeseries", "Preemptions per second", [f"sum by (instance) (rate(kiln_worker_preemptions_total{MI}[$__rate_interval]))"], "short"),
        ("timeseries", "Completions and cancellations per second", [
            f"sum by (instance) (rate(kiln_worker_completions_total{MI}[$__rate_interval]))", f"sum by (instance) (rate(kiln_worker_cancelled_total{MI}[$__rate_interval]))"], "short"),
        ("timeseries", "KV cache written (resident)", [f"sum by (instance) (kiln_worker_kv_written_bytes{MI})"], "bytes"),
    ]),
    "kiln-failover": ("kiln: failover", [
        ("timeseries", "Resumed completions per second", [f"sum(rate(kiln_router_resumed_total{M}[$__rate_interval]))"], "short"),
        ("timeseries", "Stalled calls per second by worker", ["sum by (worker) (rate(kiln_router_stalled_total[$__rate_interval]))"], "short"),
        ("timeseries", "Failed worker calls per second by worker", ["sum by (worker) (rate(kiln_router_upstream_errors_total[$__rate_interval]))"], "short"),
        ("timeseries", "Workers up as routers see them", ["min by (worker) (kiln_router_worker_up)"], "short"),
        ("timeseries", "Draining workers", ["max by (worker) (kiln_router_worker_draining)"], "short"),
        ("timeseries", "etcd connected (per router)", [f"kiln_router_etcd_connected{I}"], "short"),
        ("timeseries", "Cluster view reloads from etcd", [f"kiln_router_etcd_syncs{I}"], "short"),
    ]),
}


def variables():
    def query(name, label, metric):
        return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": f"label_values({metric}, {name})", "refId": name}, "definition": f"label_values({metric}, {name})",
                "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1}
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        query("model", "Model", "kiln_worker_running_sequences"),
        query("instance", "Instance", "up"),
    ]}


def dashboard(uid, title, panels):
    out = []
    for i, (kind, name, exprs, unit) in enumerate(panels):
        width = 6 if kind == "stat" else 12
        x = (i % (24 // width)) * width if kind == "stat" else (i % 2) * 12
        out.append({
            "id": i + 1, "type": kind, "title": name,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 4 if kind == "stat" else 8, "w": width, "x": x, "y": i * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [{"refId": chr(65 + j), "expr": e, "datasource": {"type": "prometheus", "uid": "${datasource}"}} for j, e in enumerate(exprs)],
        })
    return {"uid": uid, "title": title, "tags": ["kiln"], "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "timezone": "", "templating": variables(), "panels": out,
            "annotations": {"list": []}}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for uid, (title, panels) in DASHBOARDS.items():
        (OUT / f"{uid}.json").write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")
        print(f"{uid}.json: {len(panels)} panels")
