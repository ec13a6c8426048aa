//! The HTTP API (axum): `/v1` routes, `/metrics`, `/healthz`, `/readyz`, `/v1/openapi.json`.
//!
//! Handlers are thin: they validate input, call [`Harvest`], and map its errors to
//! `{"error": {"code", "message"}}` with the right status ([`error::ApiError`]). axum's own
//! rejections (bad JSON, wrong content type, body over `server.max_body_bytes`, unknown route,
//! wrong method) are answered in the same shape, so no plain-text error leaves the server.
//!
//! Authentication ([`auth`]): with `[[clients]]` configured, every `/v1` data route needs
//! `Authorization: Bearer <token>`, and a client sees only its own sessions and agents. `/healthz`, `/readyz`,
//! `/metrics` and `/v1/openapi.json` stay open: probes and scrapers carry no tokens, and neither
//! the metrics (bounded labels, no session ids) nor the spec reveal a tenant's data.
//!
//! The web console ([`console`]) is served at `/` from files embedded in the binary; it uses only
//! the `/v1` routes below, with the same tokens.
//!
//! Every route is registered through [`Routes`], which also keeps the list of (method, path)
//! pairs; a test checks that list against the OpenAPI document, so the spec cannot silently miss
//! a route.

pub mod agents;
pub mod auth;
pub mod console;
pub mod error;
pub mod events;
pub mod records;
pub mod sessions;
pub mod stats;
pub mod view;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;

use crate::service::Harvest;
use error::{ApiError, ErrorBody};
use view::HealthView;

pub use sessions::config_from_text;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    harvest: Harvest,
    metrics: Option<PrometheusHandle>,
}

/// The OpenAPI document of the API, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "harvest",
        description = "A durable queue of web-scraping sessions. Errors are {\"error\": {\"code\", \"message\"}}. \
With [[clients]] configured, /v1 data routes need Authorization: Bearer <token>."
    ),
    paths(
        sessions::submit,
        sessions::submit_batch,
        sessions::list_sessions,
        sessions::get_session,
        sessions::cancel,
        sessions::close,
        sessions::log,
        sessions::context,
        sessions::context_variable,
        sessions::validate_config,
        stats::stats,
        records::records,
        events::session_events,
        events::all_events,
        agents::put_agent,
        agents::get_agent,
        agents::delete_agent,
        agents::list_agents,
        agents::run_agent,
        healthz,
        readyz,
        metrics_text,
        openapi_json,
    ),
    components(schemas(
        ErrorBody,
        error::ErrorDetail,
        view::SessionView,
        view::BatchBody,
        view::BatchView,
        view::BatchItemView,
        view::EventView,
        stats::StatsView,
        agents::AgentView,
        agents::AgentBody,
        agents::AgentRunBody,
        agents::AgentListView
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "Submit, watch, read and remove sessions"),
        (name = "events", description = "Server-Sent Events"),
        (name = "agents", description = "Saved scraper configs, their schedules and runs"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// A router that remembers the (method, path) of every route it registers.
pub struct Routes {
    router: Router<AppState>,
    list: Vec<(&'static str, &'static str)>,
}

impl Routes {
    fn new() -> Routes {
        Routes {
            router: Router::new(),
            list: Vec::new(),
        }
    }

    /// Registers `handler` for `methods` (lower case, e.g. `["get", "delete"]`) on `path`.
    fn route(
        mut self,
        path: &'static str,
        methods: &[&'static str],
        handler: MethodRouter<AppState>,
    ) -> Routes {
        for m in methods {
            self.list.push((m, path));
        }
        self.router = self.router.route(path, handler);
        self
    }
}

fn routes() -> Routes {
    Routes::new()
        .route("/healthz", &["get"], get(healthz))
        .route("/readyz", &["get"], get(readyz))
        .route("/metrics", &["get"], get(metrics_text))
        .route("/v1/openapi.json", &["get"], get(openapi_json))
        .route(
            "/v1/sessions",
            &["get", "post"],
            get(sessions::list_sessions).post(sessions::submit),
        )
        .route(
            "/v1/sessions/batch",
            &["post"],
            post(sessions::submit_batch),
        )
        .route(
            "/v1/sessions/{id}",
            &["get", "delete"],
            get(sessions::get_session).merge(delete(sessions::close)),
        )
        .route(
            "/v1/sessions/{id}/cancel",
            &["post"],
            post(sessions::cancel),
        )
        .route("/v1/sessions/{id}/records", &["get"], get(records::records))
        .route("/v1/sessions/{id}/log", &["get"], get(sessions::log))
        .route(
            "/v1/sessions/{id}/context",
            &["get"],
            get(sessions::context),
        )
        .route(
            "/v1/sessions/{id}/context/{name}",
            &["get"],
            get(sessions::context_variable),
        )
        .route(
            "/v1/configs/validate",
            &["post"],
            post(sessions::validate_config),
        )
        .route(
            "/v1/sessions/{id}/events",
            &["get"],
            get(events::session_events),
        )
        .route("/v1/events", &["get"], get(events::all_events))
        .route("/v1/stats", &["get"], get(stats::stats))
        .route("/v1/agents", &["get"], get(agents::list_agents))
        .route(
            "/v1/agents/{name}",
            &["get", "put", "delete"],
            get(agents::get_agent)
                .put(agents::put_agent)
                .delete(agents::delete_agent),
        )
        .route("/v1/agents/{name}/run", &["post"], post(agents::run_agent))
}

/// Every (method, path) the router serves, methods in lower case, paths as in OpenAPI
/// (`{id}`).
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    routes().list
}

/// The OpenAPI document as JSON.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The application's routes.
pub fn router(harvest: Harvest, metrics: Option<PrometheusHandle>) -> Router {
    let limit = harvest.config().server.max_body_bytes;
    routes()
        .router
        .merge(console::router())
        .fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // A response other than 503 means the store answered the request, if it asked it.
        .layer(axum::middleware::map_response(
            |resp: axum::response::Response| async move {
                if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
                    crate::store::outage::answered("API request");
                }
                resp
            },
        ))
        .with_state(AppState { harvest, metrics })
}

/// The routes of `metrics.bind`: `/metrics`, `/healthz` and `/readyz`, nothing else (404), so
/// that a port opened to a Prometheus server exposes no API.
pub fn metrics_router(harvest: Harvest, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(AppState { harvest, metrics })
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = HealthView))
)]
pub async fn healthz() -> axum::Json<HealthView> {
    axum::Json(HealthView {
        status: "ok".into(),
    })
}

/// Readiness: the store answers and this process's workers run (when it has any).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthView),
        (status = 503, description = "Store unavailable or workers stopped", body = ErrorBody),
    )
)]
pub async fn readyz(State(st): State<AppState>) -> Result<axum::Json<HealthView>, ApiError> {
    let health = st.harvest.store().health();
    crate::metrics::store_health(&health);
    if let crate::store::StoreHealth::Unhealthy(why) = health {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the store is unhealthy: {why}"),
        ));
    }
    let workers = st.harvest.config().workers.concurrency == 0 || st.harvest.workers_running();
    // One row read, not the counts: on PostgreSQL counting reads every session, and a probe
    // polled every few seconds must stay cheap however many sessions the store keeps.
    let store = st
        .harvest
        .store()
        .session_list(crate::store::SessionList {
            limit: 1,
            ..Default::default()
        })
        .await;
    match (workers, store) {
        (true, Ok(_)) => {
            crate::store::outage::answered("readiness check");
            Ok(axum::Json(HealthView {
                status: "ready".into(),
            }))
        }
        (false, _) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the workers of this process are not running",
        )),
        (true, Err(e)) => {
            crate::store::outage::unavailable("readiness check", &e);
            Err(ApiError {
                retry_after: Some(error::STORE_RETRY_AFTER_SECS),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    "the session store does not answer (the server log says why)",
                )
            })
        }
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content((String = "text/plain"))),
        (status = 404, description = "No metrics recorder in this process", body = ErrorBody),
    )
)]
pub async fn metrics_text(State(st): State<AppState>) -> Response {
    crate::metrics::store_health(&st.harvest.store().health());
    match &st.metrics {
        Some(h) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content((Object = "application/json"))))
)]
pub async fn openapi_json() -> Response {
    match openapi().to_json() {
        Ok(text) => ([(CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot render the OpenAPI document: {e}"),
        )
        .into_response(),
    }
}
