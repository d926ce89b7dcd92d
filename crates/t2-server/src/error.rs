//! Every failure the API reports, mapped to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key that may not do this (a generation key changing experts), or writes turned off.
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    Conflict { message: String, code: &'static str },
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("the request did not finish within {0} s")]
    Timeout(u64),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::InvalidRequest { param, code, .. } => ("invalid_request_error", *param, *code),
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::Forbidden(_) => (
                "invalid_request_error",
                None,
                Some("insufficient_permissions"),
            ),
            Self::Conflict { code, .. } => ("invalid_request_error", None, Some(*code)),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("payload_too_large")),
            Self::Overloaded { .. } => ("rate_limit_error", None, Some("queue_full")),
            Self::Unavailable(_) => ("server_error", None, Some("unavailable")),
            Self::Timeout(_) => ("server_error", None, Some("timeout")),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                r#type: kind.into(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

/// OpenAI's error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, Self::Internal(_)) {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        match &self {
            Self::Overloaded { retry_after_s, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            Self::Unauthorized(_) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

impl From<t2_engine::EngineError> for ApiError {
    fn from(e: t2_engine::EngineError) -> Self {
        use t2_engine::EngineError as E;
        match e {
            E::Invalid(m) => Self::InvalidRequest {
                message: m,
                param: None,
                code: None,
            },
            E::Svf(t2_svf::SvfError::UnknownExpert { .. })
            | E::Svf(t2_svf::SvfError::BadMix(_))
            | E::NoSvf => Self::invalid(e.to_string(), "adaptation"),
            E::Model(t2_model::ModelError::Invalid(m)) => Self::InvalidRequest {
                message: m,
                param: None,
                code: None,
            },
            // The model's chat template refused the conversation (e.g. roles out of order).
            E::Model(t2_model::ModelError::Template(m)) => {
                Self::invalid(format!("the model's chat template: {m}"), "messages")
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<t2_model::ModelError> for ApiError {
    fn from(e: t2_model::ModelError) -> Self {
        t2_engine::EngineError::from(e).into()
    }
}

impl From<t2_engine::Failure> for ApiError {
    fn from(f: t2_engine::Failure) -> Self {
        use t2_engine::FailureKind as K;
        match f.kind {
            K::Invalid => Self::invalid(f.message, "adaptation"),
            K::Unavailable => Self::Unavailable(f.message),
            K::Internal => Self::Internal(f.message),
        }
    }
}
