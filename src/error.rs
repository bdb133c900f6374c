//! The error every provider step reports: retryable or permanent.
//!
//! The job engine decides what to do from the class alone: a transient error is retried with
//! backoff (honouring `Retry-After`), a permanent one fails the job with the provider's message.

use std::time::Duration;

/// A failed provider step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth retrying: 5xx, 429, a network failure or timeout.
    #[error("{message}")]
    Transient {
        /// What happened, in the provider's words where it gave any.
        message: String,
        /// How long the server asked us to wait, if it did.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: bad credentials, a refused request, a malformed answer.
    #[error("{message}")]
    Permanent {
        /// What happened, in the provider's words where it gave any.
        message: String,
    },
}

impl StepError {
    /// A transient error without a server hint.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient { message: message.into(), retry_after: None }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent { message: message.into() }
    }

    /// True when the step may be retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Self::Transient { message, .. } | Self::Permanent { message } => message,
        }
    }
}
