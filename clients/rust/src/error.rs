//! The client's error type and the record of how a socket closed.
//!
//! This module describes failures; it does not retry or reconnect.

use crate::frame::Bye;
use switchyard_protocol::{ErrorCode, IdError};

/// How the socket closed: the close frame's code and reason, and the `bye` that preceded it, if any.
///
/// When the connection ended without a close frame, `code` is 1006 (abnormal closure) and `reason` says what
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The WebSocket close code (for example 1000, 1001, 4001, 4003, 4009).
    pub code: u16,
    /// The close frame's reason text.
    pub reason: String,
    /// The `bye` frame the server sent before closing, if it sent one.
    pub bye: Option<Bye>,
}

impl std::fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "close {}", self.code)?;
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

fn describe_close(info: &Option<CloseInfo>) -> String {
    match info {
        Some(info) => format!(": {info}"),
        None => String::new(),
    }
}

/// Everything that can go wrong on a session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the upgrade request with an HTTP error status. `body` holds what arrived with the
    /// status line and headers (the whole body for the short JSON error bodies the server sends).
    #[error("HTTP {status} before the upgrade: {body}")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The response body, decoded as UTF-8 (lossily).
        body: String,
    },
    /// The request could not be built or the handshake was refused or malformed (bad URL, bad header value, an
    /// unsupported scheme or subprotocol).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// A transport or WebSocket failure.
    #[error("websocket error: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// Nothing arrived in time; the string names what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The socket is closed (or closed while waiting), with how it closed when known.
    #[error("connection closed{}", describe_close(.0))]
    Closed(Option<CloseInfo>),
    /// The server answered with an `err` frame (from the typed helpers).
    #[error("server error {code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// An id given to a typed helper is not a valid room or user id.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The server's reply could not be read or lacked a field the helper needs.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for ClientError {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        ClientError::WebSocket(Box::new(err))
    }
}

impl ClientError {
    /// The server's error code, for a [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The close code, for a [`ClientError::Closed`] with a known close.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed(Some(info)) => Some(info.code),
            _ => None,
        }
    }
}
