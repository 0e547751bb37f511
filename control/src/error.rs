//! One error type for the control plane: a machine-readable code and one human line.
//! The code travels in protocol replies; the CLI prints `switchyard: error: <message>`.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is well-formed but an argument is wrong (bad CIDR, IP outside the subnet).
    InvalidArgument,
    /// The request itself is not understood (bad JSON, unknown method, wrong types, too large).
    BadRequest,
    NotFound,
    /// Something with that name/address/port exists or is in use.
    Conflict,
    /// No address or port left.
    Exhausted,
    PermissionDenied,
    /// Creating kernel objects (namespaces, interfaces) failed.
    System,
    /// The daemon is busy or shutting down.
    Unavailable,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, m)
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, m)
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Exhausted, m)
    }
    pub fn system(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::System, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, m)
    }

    /// Prefix the message with what was being done (netavark's `wrap`).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::system(e.to_string())
    }
}
