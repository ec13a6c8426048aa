//! The API's one error shape, `{"error": {"code", "message"}}`, and the extractors that make
//! axum's own rejections (bad JSON, wrong content type, body too large, bad query or path) use it.
//!
//! No handler returns plain text on failure: every 4xx/5xx goes through [`ApiError`].

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::service::HarvestError;
use crate::store::StoreError;

/// An error answer: an HTTP status, a stable machine-readable code, and a message for a person.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code, e.g. `not_found`, `invalid_config`, `duplicate_session`.
    pub code: &'static str,
    /// What was wrong and what to do.
    pub message: String,
    /// Seconds to send as `Retry-After` (a 429 or 503 the caller should retry).
    pub retry_after: Option<u64>,
}

/// `Retry-After` of a 429 `quota_exceeded`: pending sessions start within seconds when workers
/// have slots.
pub const QUOTA_RETRY_AFTER_SECS: u64 = 5;

/// Seconds a client is told to wait (`Retry-After`) when the store is unavailable.
pub const STORE_RETRY_AFTER_SECS: u64 = 2;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// What was wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 503 `store_unavailable` with `Retry-After`: the store could not be reached. The message
    /// names no internals (schema, pool, server address): the operator's log has them.
    pub fn store_unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "store_unavailable",
            message: format!(
                "the session store is unavailable for the moment; retry in {STORE_RETRY_AFTER_SECS} s"
            ),
            retry_after: Some(STORE_RETRY_AFTER_SECS),
        }
    }

    /// The same error with a `Retry-After: secs` header.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found` for a session (also for another client's session: its existence is not
    /// revealed).
    pub fn session_not_found(id: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("session {id} not found"),
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 503 `not_ready` with `Retry-After`: the process has not opened its store yet (it waits
    /// for the database at start).
    pub fn store_not_open() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: format!(
                "the server is starting and waits for its session store; retry in {STORE_RETRY_AFTER_SECS} s"
            ),
            retry_after: Some(STORE_RETRY_AFTER_SECS),
        }
    }

    /// The code for a status when nothing more specific is known.
    fn code_for(status: StatusCode) -> &'static str {
        match status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            s if s.is_server_error() => "internal",
            _ => "error",
        }
    }

    /// An error from one of axum's rejections; 422 (data that does not fit the type) is answered
    /// as 400 like every other invalid request.
    fn from_rejection(status: StatusCode, text: String) -> ApiError {
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        ApiError::new(status, ApiError::code_for(status), text)
    }
}

impl From<HarvestError> for ApiError {
    fn from(e: HarvestError) -> ApiError {
        let message = e.to_string();
        match e {
            HarvestError::InvalidConfig(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", message)
            }
            HarvestError::InvalidId(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_session_id", message)
            }
            HarvestError::Invalid(_) => ApiError::invalid(message),
            HarvestError::Duplicate(_) => {
                ApiError::new(StatusCode::CONFLICT, "duplicate_session", message)
            }
            HarvestError::NotFound(_) | HarvestError::AgentNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            HarvestError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            HarvestError::QuotaExceeded { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
                    .retry_after(QUOTA_RETRY_AFTER_SECS)
            }
            // A bad cursor (or another out-of-range parameter) is the caller's mistake.
            HarvestError::Store(StoreError::Invalid(m)) => ApiError::invalid(m),
            HarvestError::Store(StoreError::Duplicate(id)) => ApiError::new(
                StatusCode::CONFLICT,
                "duplicate_session",
                format!(
                    "session {id} already exists; choose another id (an id can be reused only once its session is removed)"
                ),
            ),
            HarvestError::Busy(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
            }
            HarvestError::Store(e) if e.is_unavailable() => {
                crate::store::outage::unavailable("API request", &e);
                ApiError::store_unavailable()
            }
            HarvestError::Store(_) | HarvestError::Startup(_) => {
                tracing::error!(error = %message, "request failed in the store");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    format!("{message}; retry later, and check the server log if it persists"),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        // A 503 is temporary (work queued up, the store away): say when to come back.
        let retry = match self.retry_after {
            Some(secs) => Some(secs),
            None if self.status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            None => None,
        };
        if let Some(secs) = retry {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let text = match &r {
            JsonRejection::MissingJsonContentType(_) => {
                "the request body must be JSON: send Content-Type: application/json".to_string()
            }
            _ => r.body_text(),
        };
        ApiError::from_rejection(r.status(), text)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::from_rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::from_rejection(r.status(), r.body_text())
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(v) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

/// 404 for every path the router does not know.
pub async fn not_found_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}; see /v1/openapi.json for the API", uri.path()),
    )
}

/// 405 for a known path with a method it does not take.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; see /v1/openapi.json",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_a_503_that_says_when_to_retry() {
        let r = ApiError::from(HarvestError::Busy("every slot taken".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let r = ApiError::invalid("x").into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }
}
