//! How a failure becomes a response: a status code and `{"error": "…", "field": "…"}`.
//!
//! | failure | status |
//! | --- | --- |
//! | body is not JSON, or not an object; a path that is not valid percent-encoded UTF-8 | 400 |
//! | body over axum's limit (2 MiB) | 413 |
//! | body without `Content-Type: application/json` | 415 |
//! | a field breaks a rule ([`ValidationError`]) | 422, with `field` |
//! | the database refuses a value of the change (e.g. a character its encoding lacks) | 422 |
//! | no such book (or an id that cannot name one) | 404 |
//! | a method the path does not take | 405 |
//! | the book exists already, was removed, or keeps changing concurrently | 409 |
//! | `If-Match` names versions the book is not at (a change the client has not seen) | 412 |
//! | the database does not answer, or keeps aborting the save because of concurrent ones | 503 |
//! | the request took longer than `REQUEST_TIMEOUT` (30 s), its body included | 503 |
//! | anything else (corrupt data, an event that cannot be encoded) | 500 |
//!
//! Messages of user errors are shown as they are; system errors are logged in full and
//! answered with their message too, since the API serves the operators' own dashboard.

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::error;

use crate::domain::{DomainError, ValidationError};
use crate::service::ServiceError;
use crate::store::StoreError;

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, for validation errors.
    pub field: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

/// axum's own refusals (a body over its size limit, a path that does not decode) in the same
/// JSON shape as every other error, rather than axum's plain text.
impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: error.to_string(),
            field: Some(error.field),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        let status = match &error {
            DomainError::Invalid(invalid) => return invalid.clone().into(),
            DomainError::NotFound(_) => StatusCode::NOT_FOUND,
            DomainError::AlreadyExists(_) | DomainError::Removed(_) => StatusCode::CONFLICT,
        };
        Self::new(status, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let status = match &error {
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Database(_)
            | StoreError::Contention(_)
            | StoreError::Sqlite { .. }
            | StoreError::Cancelled
            | StoreError::Timeout(_)
            | StoreError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // The API never applies projection batches; should one's error reach it, it is
            // a fault of the server, not of the request.
            StoreError::UnsupportedUrl(_)
            | StoreError::Corrupt(_)
            | StoreError::Migration(_)
            | StoreError::PositionMoved { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Domain(error) => error.into(),
            ServiceError::Store(error) => error.into(),
            ServiceError::Codec(error) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
            }
            error @ ServiceError::VersionMismatch { .. } => {
                Self::new(StatusCode::PRECONDITION_FAILED, error.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = %self.status, error = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: &self.message,
            field: self.field,
        };
        (self.status, Json(body)).into_response()
    }
}

/// Answers paths that name no route.
pub(super) async fn not_found() -> ApiError {
    ApiError::not_found("no such page")
}

/// Answers 503 when the request takes longer than `limit` (see
/// [`super::HttpState::with_request_timeout`]).
pub(super) async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the request took longer than {limit:?}"),
        )
        .into_response(),
    }
}

/// A path that exists, asked with a method it does not take (axum adds the `Allow` header).
pub(super) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(error: StoreError) -> StatusCode {
        ApiError::from(ServiceError::Store(error)).status
    }

    #[test]
    fn a_change_the_database_refuses_is_the_clients_and_contention_the_servers() {
        let error = || sqlx::Error::Protocol("from the database".to_owned());
        assert_eq!(
            status_of(StoreError::Rejected(error())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status_of(StoreError::Contention(error())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(StoreError::Database(error())),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
