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

/// The error of a library call under a [`ClientError`]; its type varies with the call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a [`ClientError::Handshake`] or [`ClientError::UnexpectedReply`] is about: a message and, when a library call
/// failed (a URL or header that does not parse, a reply that does not deserialise), that call's error as the source.
/// Shows as its message, which already quotes the source's text.
#[derive(Debug)]
pub struct Detail {
    message: String,
    source: Option<BoxError>,
}

impl Detail {
    /// A problem the client found itself: no library error under it.
    pub fn new(message: impl Into<String>) -> Self {
        Detail { message: message.into(), source: None }
    }

    /// A library call that failed while doing `what`: shows as `what: source`.
    pub fn caused(what: &str, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Detail { message: format!("{what}: {source}"), source: Some(source) }
    }

    /// A failure shown as `message` (which says what the source says, in other words).
    pub fn described(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Detail { message: message.into(), source: Some(source.into()) }
    }

    /// A library call that failed, shown as its own error's text.
    pub fn of(source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Detail { message: source.to_string(), source: Some(source) }
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Detail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as &(dyn std::error::Error + 'static))
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
    Handshake(#[source] Detail),
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
    UnexpectedReply(#[source] Detail),
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
