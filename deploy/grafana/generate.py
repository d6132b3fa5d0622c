#!/usr/bin/env python3
"""Writes the Grafana dashboards in this directory (one JSON file each) from the panel lists
below: edit here, run `python3 deploy/grafana/generate.py`, commit both. Every metric a
panel's query names is checked against real scrapes of every role by
cli/tests/observability_assets.rs.

Dashboards use one Prometheus data source variable (`datasource`), so they import into any
Grafana (provisioning: provisioning.yaml here)."""
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def ts(title, *exprs, unit="short", legend=None):
    """A time series panel: (expr, legend) pairs or bare exprs."""
    targets = []
    for i, e in enumerate(exprs):
        expr, leg = e if isinstance(e, tuple) else (e, legend or "")
        targets.append({"refId": chr(65 + i), "expr": expr, "legendFormat": leg,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"}})
    return {"type": "timeseries", "title": title, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "datasource": {"type": "prometheus", "uid": "${datasource}"}}


def stat(title, expr, unit="short"):
    p = ts(title, expr, unit=unit)
    p["type"] = "stat"
    return p


def q(quantile, metric, by="le", window="5m"):
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({metric}_bucket[{window}])))"


DASHBOARDS = {
    "flotilla-cluster": ("flotilla: cluster health and Raft", [
        stat("Leaders (want 1)", "sum(flotilla_raft_is_leader)"),
        stat("Raft term", "max(flotilla_raft_term)"),
        stat("Members", "max(flotilla_raft_members)"),
        stat("Store revision", "max(flotilla_store_revision)"),
        ts("Elections (term changes, 15m)", "max(delta(flotilla_raft_term[15m]))"),
        ts("Log, commit and applied index", ("flotilla_raft_last_log_index", "last {{instance}}"),
           ("flotilla_raft_commit_index", "commit {{instance}}"), ("flotilla_raft_applied_index", "applied {{instance}}")),
        ts("Snapshot index", ("flotilla_raft_snapshot_index", "{{instance}}")),
        ts("Write latency (propose to result)", (q(0.5, "flotilla_apply_duration_seconds"), "p50"),
           (q(0.99, "flotilla_apply_duration_seconds"), "p99"), unit="s"),
        ts("gRPC requests by method and code", ("sum by (method, code) (rate(flotilla_grpc_requests_total[5m]))", "{{method}} {{code}}"), unit="reqps"),
        ts("gRPC latency p99 by method", (q(0.99, "flotilla_grpc_request_duration_seconds", "le, method"), "{{method}}"), unit="s"),
        ts("Forwards abandoned, campaigns", ("sum(rate(flotilla_forwards_abandoned_total[5m]))", "forwards abandoned"),
           ("sum(rate(flotilla_raft_campaigns_started_total[5m]))", "campaigns")),
        ts("Controllers running (leader)", ("flotilla_controller_leading", "{{instance}}")),
    ]),
    "flotilla-fleet": ("flotilla: fleet and placement", [
        ts("Nodes by state", ("sum by (state) (flotilla_controller_nodes)", "{{state}}")),
        ts("Cordoned and draining nodes", ("sum by (why) (flotilla_controller_nodes_unschedulable)", "{{why}}")),
        ts("Replicas by phase", ("sum by (phase) (flotilla_controller_replicas)", "{{phase}}")),
        ts("GPUs", ("sum by (state) (flotilla_controller_gpus)", "{{state}}")),
        ts("Pending replicas by reason", ("sum by (reason) (flotilla_controller_pending_replicas)", "{{reason}}")),
        ts("Placement latency", (q(0.5, "flotilla_controller_placement_duration_seconds"), "p50"),
           (q(0.95, "flotilla_controller_placement_duration_seconds"), "p95"), unit="s"),
        ts("Bindings and scheduling rounds", ("sum(rate(flotilla_controller_bindings_total[5m]))", "bindings"),
           ("sum(rate(flotilla_controller_schedule_rounds_total[5m]))", "rounds"), unit="ops"),
        ts("Replicas created and rescheduled", ("sum(rate(flotilla_controller_replicas_created_total[5m]))", "created"),
           ("sum(rate(flotilla_controller_replicas_rescheduled_total[5m]))", "rescheduled from lost nodes"), unit="ops"),
        ts("Reconcile passes by controller", ("sum by (controller) (rate(flotilla_controller_reconciles_total[5m]))", "{{controller}}"), unit="ops"),
        ts("Reconcile errors by controller", ("sum by (controller) (increase(flotilla_controller_reconcile_errors_total[15m]))", "{{controller}}")),
        ts("Proposals by result", ("sum by (result) (rate(flotilla_controller_proposals_total[5m]))", "{{result}}"), unit="ops"),
        ts("Heartbeats, actor restarts, GPU health changes", ("sum(rate(flotilla_controller_heartbeats_total[5m]))", "heartbeats/s"),
           ("sum(increase(flotilla_controller_actor_restarts_total[15m]))", "actor restarts (15m)"),
           ("sum(increase(flotilla_controller_gpu_health_changes_total[15m]))", "GPU health changes (15m)")),
    ]),
    "flotilla-gateway": ("flotilla: gateway traffic, latency, QoS and tenants", [
        ts("Requests by model and code", ("sum by (model, code) (rate(flotilla_gateway_requests_total[5m]))", "{{model}} {{code}}"), unit="reqps"),
        ts("Server-side error ratio (SLO 99.5%)", ("flotilla:gateway_server_errors:ratio_rate5m", "5m"),
           ("flotilla:gateway_server_errors:ratio_rate1h", "1h"), unit="percentunit"),
        ts("Errors by code", ("sum by (code) (rate(flotilla_gateway_errors_total[5m]))", "{{code}}"), unit="reqps"),
        ts("Time to first token", (q(0.5, "flotilla_gateway_time_to_first_token_seconds", "le, model"), "p50 {{model}}"),
           (q(0.95, "flotilla_gateway_time_to_first_token_seconds", "le, model"), "p95 {{model}}"), unit="s"),
        ts("Time per output token p50", (q(0.5, "flotilla_gateway_time_per_output_token_seconds", "le, model"), "{{model}}"), unit="s"),
        ts("End-to-end latency p95", (q(0.95, "flotilla_gateway_e2e_request_latency_seconds", "le, model"), "{{model}}"), unit="s"),
        ts("Queue wait p95 by priority", (q(0.95, "flotilla_gateway_queue_wait_seconds", "le, priority"), "{{priority}}"), unit="s"),
        ts("In flight by endpoint", ("sum by (endpoint) (flotilla_gateway_in_flight_requests)", "{{endpoint}}")),
        ts("Tokens", ("sum by (direction) (rate(flotilla_gateway_tokens_total[5m]))", "{{direction}}"), unit="short"),
        ts("Requests by tenant", ("sum by (tenant) (rate(flotilla_gateway_tenant_requests_total[5m]))", "{{tenant}}"), unit="reqps"),
        ts("Tokens by tenant", ("sum by (tenant, direction) (rate(flotilla_gateway_tenant_tokens_total[5m]))", "{{tenant}} {{direction}}")),
        ts("Rejections by tenant and reason", ("sum by (tenant, reason) (rate(flotilla_gateway_tenant_rejections_total[5m]))", "{{tenant}} {{reason}}"), unit="reqps"),
        ts("In flight by tenant", ("sum by (tenant) (flotilla_gateway_tenant_in_flight_requests)", "{{tenant}}")),
        ts("Retries and ejections", ("sum(rate(flotilla_gateway_retries_total[5m]))", "retries"),
           ("sum(rate(flotilla_gateway_ejections_total[5m]))", "ejections"), unit="ops"),
        ts("Streams cut at --max-stream-duration, TLS handshake failures",
           ("sum(rate(flotilla_gateway_stream_duration_exceeded_total[5m]))", "streams cut"),
           ("sum(rate(flotilla_gateway_tls_handshake_failures_total[5m]))", "TLS handshake failures"), unit="ops"),
        ts("Tokenizer requests", ("sum by (path, code) (rate(flotilla_gateway_tokenizer_requests_total[5m]))", "{{path}} {{code}}"), unit="reqps"),
    ]),
    "flotilla-engines": ("flotilla: engines and nodes", [
        ts("Engines by state", ("sum by (state) (flotilla_agent_engines)", "{{state}}")),
        ts("Starts, crashes, give-ups", ("sum(rate(flotilla_agent_engine_starts_total[5m]))", "starts"),
           ("sum(rate(flotilla_agent_engine_crashes_total[5m]))", "crashes"),
           ("sum(rate(flotilla_agent_engine_failures_total[5m]))", "gave up"), unit="ops"),
        ts("Start to Ready", (q(0.5, "flotilla_agent_engine_start_seconds"), "p50"),
           (q(0.95, "flotilla_agent_engine_start_seconds"), "p95"), unit="s"),
        ts("Restarts of running engines", ("sum by (instance) (flotilla_agent_engine_restarts)", "{{instance}}")),
        ts("Drain duration p95", (q(0.95, "flotilla_agent_engine_drain_seconds"), "p95"), unit="s"),
        ts("Downloads", ("sum(flotilla_agent_downloads_in_progress)", "in progress"),
           ("sum by (result) (rate(flotilla_agent_downloads_total[5m]))", "{{result}}/s")),
        ts("Download duration p95", (q(0.95, "flotilla_agent_download_seconds"), "p95"), unit="s"),
        ts("Download rate by node", ("sum by (instance) (rate(flotilla_agent_download_bytes_total[5m]))", "{{instance}}"), unit="Bps"),
        ts("Model cache by node", ("flotilla_agent_model_cache_bytes", "{{instance}}"), unit="bytes"),
        ts("Downloads refused by the source policy", ("sum by (rule) (increase(flotilla_agent_download_refusals_total[15m]))", "{{rule}}")),
        ts("GPUs by health", ("sum by (health) (flotilla_agent_gpus)", "{{health}}")),
        ts("Engine requests running and waiting", ("sum(vllm:num_requests_running)", "running"),
           ("sum(vllm:num_requests_waiting)", "waiting")),
        ts("KV cache usage by engine", ("vllm:kv_cache_usage_perc", "{{instance}}"), unit="percentunit"),
        ts("Prefix cache hit ratio", ("sum(rate(vllm:prefix_cache_hits_total[5m])) / sum(rate(vllm:prefix_cache_queries_total[5m]))", "hits"), unit="percentunit"),
        ts("Engine tokens", ("sum(rate(vllm:prompt_tokens_total[5m]))", "prompt"),
           ("sum(rate(vllm:generation_tokens_total[5m]))", "generation")),
        ts("Engine time to first token p95", (q(0.95, "vllm:time_to_first_token_seconds"), "p95"), unit="s"),
        ts("Preemptions", ("sum(rate(vllm:num_preemptions_total[5m]))", "preemptions"), unit="ops"),
    ]),
    "flotilla-lora": ("flotilla: LoRA adapters", [
        ts("Cold loads seen by the gateway", ("sum by (adapter) (rate(flotilla_gateway_adapter_cold_loads_total[5m]))", "{{adapter}}"), unit="ops"),
        ts("Wait for an on-demand load p95", (q(0.95, "flotilla_gateway_adapter_cold_load_seconds"), "p95"), unit="s"),
        ts("Load errors by reason", ("sum by (reason) (rate(flotilla_gateway_adapter_load_errors_total[5m]))", "{{reason}}"), unit="ops"),
        ts("Engine loads and unloads", ("sum by (result) (rate(flotilla_agent_adapter_loads_total[5m]))", "load {{result}}"),
           ("sum by (result) (rate(flotilla_agent_adapter_unloads_total[5m]))", "unload {{result}}"), unit="ops"),
        ts("Engine load latency p95", (q(0.95, "flotilla_agent_adapter_load_seconds"), "p95"), unit="s"),
        ts("Bindings, evictions, cold loads (controllers)", ("sum(rate(flotilla_controller_adapter_bindings_total[5m]))", "bindings"),
           ("sum(rate(flotilla_controller_adapter_evictions_total[5m]))", "evictions"),
           ("sum(rate(flotilla_controller_adapter_cold_loads_total[5m]))", "cold loads"), unit="ops"),
        ts("Adapters running in engines", ("sum(vllm:lora_requests_info)", "engines reporting")),
    ]),
    "flotilla-autoscaler": ("flotilla: autoscaler and scale from zero", [
        ts("Scaling decisions", ("sum by (direction) (increase(flotilla_controller_autoscaler_scalings_total[15m]))", "{{direction}}")),
        ts("Replicas by phase", ("sum by (phase) (flotilla_controller_replicas)", "{{phase}}")),
        ts("Requests held for a cold start", ("sum by (model) (flotilla_gateway_held_requests)", "{{model}}")),
        ts("Cold start wait p95", (q(0.95, "flotilla_gateway_cold_start_seconds"), "p95"), unit="s"),
        ts("Hold timeouts", ("sum by (model) (rate(flotilla_gateway_held_timeouts_total[5m]))", "{{model}}"), unit="ops"),
        ts("Demand reports to the leader", ("sum by (result) (rate(flotilla_gateway_demand_reports_total[5m]))", "{{result}}"), unit="ops"),
        ts("Engine queue (waiting requests)", ("sum(vllm:num_requests_waiting)", "waiting")),
        ts("Gateway queue wait p95", (q(0.95, "flotilla_gateway_queue_wait_seconds", "le, model"), "{{model}}"), unit="s"),
    ]),
}


def dashboard(uid, title, panels):
    laid = [dict(p, id=i + 1) for i, p in enumerate(panels)]
    # left to right, wrapping at Grafana's 24 columns
    x = y = row_h = 0
    for p in laid:
        w = 6 if p["type"] == "stat" else 12
        h = 4 if p["type"] == "stat" else 8
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "tags": ["flotilla"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": laid,
    }


for uid, (title, panels) in DASHBOARDS.items():
    out = HERE / f"{uid}.json"
    out.write_text(json.dumps(dashboard(uid, title, panels), indent=1) + "\n")
    print(f"wrote {out.relative_to(HERE.parent.parent)} ({len(panels)} panels)")
