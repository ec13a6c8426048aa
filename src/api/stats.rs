//! `GET /v1/stats`: the caller's sessions counted by status and client, and what ended in the
//! last hour (the registry's `size()` and per-client lists of the seed, without paging through
//! sessions). A client sees only its own sessions; without `[[clients]]`, every client's.

use std::collections::BTreeMap;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::store::SessionStats;

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    /// Sessions per status, every status present.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub by_status: BTreeMap<String, u64>,
    /// Per client id (sorted), its sessions per status.
    pub clients: Vec<ClientStatsView>,
    /// What ended in each minute of the last hour.
    pub last_hour: LastHourView,
}

/// One client's counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientStatsView {
    /// The client id (`""` for sessions submitted without one).
    pub client_id: String,
    /// Its sessions per status, every status present.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub by_status: BTreeMap<String, u64>,
}

/// Sixty one-minute buckets, oldest first; the last is the minute up to now.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastHourView {
    /// Sessions that ended (completed, failed or cancelled) in each minute.
    pub finished_per_minute: Vec<u64>,
    /// Records of those sessions.
    pub records_per_minute: Vec<u64>,
}

fn statuses(m: &BTreeMap<crate::session::SessionStatus, u64>) -> BTreeMap<String, u64> {
    crate::session::SessionStatus::ALL
        .into_iter()
        .map(|s| (s.to_string(), m.get(&s).copied().unwrap_or(0)))
        .collect()
}

impl StatsView {
    fn of(s: SessionStats) -> StatsView {
        StatsView {
            by_status: statuses(&s.by_status),
            clients: s
                .clients
                .iter()
                .map(|(id, m)| ClientStatsView {
                    client_id: id.clone(),
                    by_status: statuses(m),
                })
                .collect(),
            last_hour: LastHourView {
                finished_per_minute: s.finished_per_minute,
                records_per_minute: s.records_per_minute,
            },
        }
    }
}

/// Sessions by status and client, and the last hour, for the caller's tenant.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "sessions",
    responses(
        (status = 200, description = "Counts (up to a second old)", body = StatsView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    )
)]
pub async fn stats(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<StatsView>, ApiError> {
    let stats = st.harvest.stats(caller.client_id()).await?;
    Ok(axum::Json(StatsView::of(stats)))
}
