//! The HTTP API (axum): `/v1` routes, `/metrics`, `/healthz`, `/readyz`.
//!
//! Handlers are thin: they validate input, call [`Harvest`], and map its errors to
//! `{"error": {"code", "message"}}` with the right status.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::service::Harvest;

#[derive(Clone)]
struct AppState {
    harvest: Harvest,
    metrics: Option<PrometheusHandle>,
}

/// The application's routes.
pub fn router(harvest: Harvest, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { harvest, metrics })
}

async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    let workers = st.harvest.config().workers.concurrency == 0 || st.harvest.workers_running();
    let store = st
        .harvest
        .store()
        .session_counts(st.harvest.clock().now())
        .await
        .is_ok();
    if workers && store {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(st): State<AppState>) -> impl IntoResponse {
    match &st.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".to_string(),
        ),
    }
}
