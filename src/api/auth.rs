//! Tenants: who is calling, from `Authorization: Bearer <token>`.
//!
//! With `[[clients]]` configured, every `/v1` data route needs a token of one of them, compared in
//! constant time; the caller then sees and touches only sessions whose client id is its own, and
//! another client's session answers 404 exactly like a missing one (its existence is not
//! revealed). Without clients the server is single-user: every caller may do everything.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::session::Session;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No clients are configured: the single user, allowed everything.
    Anyone,
    /// The configured client with this id.
    Client(String),
}

impl Caller {
    /// The client id this caller is restricted to, if any.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Client(id) => Some(id),
        }
    }

    /// Whether this caller may see and touch the session.
    pub fn owns(&self, session: &Session) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Client(id) => session.client.client_id() == id,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let clients = &state.harvest.config().clients;
        if clients.is_empty() {
            return Ok(Caller::Anyone);
        }
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "this server has clients configured: send Authorization: Bearer <token>",
                )
            })?
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
        let token = bearer_token(header).ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be \"Bearer <token>\"")
        })?;
        // Compare against every client, without stopping at the first match, so the time taken
        // says nothing about which token (or which prefix) was close.
        let mut found: Option<&str> = None;
        for c in clients {
            let equal: bool = c.token.as_bytes().ct_eq(token.as_bytes()).into();
            if equal && found.is_none() {
                found = Some(&c.id);
            }
        }
        match found {
            Some(id) => Ok(Caller::Client(id.to_string())),
            None => Err(ApiError::unauthorized(
                "unknown token: use the token of one of the server's [[clients]]",
            )),
        }
    }
}

/// The token of an `Authorization` value whose scheme is `Bearer`, in any letter case (RFC 7235:
/// the scheme is case-insensitive), with the spaces around it trimmed; `None` for another scheme
/// or an empty token.
pub(crate) fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in [
            "Bearer tok-123",
            "bearer tok-123",
            "BEARER tok-123",
            "bEaReR tok-123",
            "Bearer   tok-123 ",
        ] {
            assert_eq!(bearer_token(h), Some("tok-123"), "{h:?}");
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_not_bearer_tokens() {
        for h in [
            "Basic dG9rOjEyMw==",
            "Bearer",
            "Bearer ",
            "Bearertok-123",
            "tok-123",
            "",
        ] {
            assert_eq!(bearer_token(h), None, "{h:?}");
        }
    }
}
