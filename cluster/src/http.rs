//! The HTTP endpoint of a server: `/metrics` (Prometheus text), `/healthz` (the process and
//! its Raft core are running) and `/readyz` (a leader is known and this server has applied
//! the log up to the commit point it knows of).
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::node::Node;

pub(crate) fn router(node: Node) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node)
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    let body = node.metrics.render(&node.raft_metrics(), node.reader.revision());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

async fn healthz(State(node): State<Node>) -> impl IntoResponse {
    match &node.raft_metrics().running_state {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}\n")),
    }
}

async fn readyz(State(node): State<Node>) -> impl IntoResponse {
    let m = node.raft_metrics();
    if let Err(e) = &m.running_state {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}\n"));
    }
    let Some(leader) = m.current_leader else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n".to_owned());
    };
    if !m.membership_config.nodes().any(|(id, _)| *id == m.id) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not a member of the cluster yet\n".to_owned());
    }
    (StatusCode::OK, format!("ready (leader {leader}, term {})\n", m.current_term))
}
