//! The names every part of Ferry shares for a job: its id, what started it and what it does.
//!
//! They sit below every other module: the manifest records them, each task's state machine and
//! the job engine above those use them, and none of these types knows anything else.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job's id: 16 lower-case hex characters from the runtime's random source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// Wraps an id (tests and storage).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// An id from 8 random bytes.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        Self(hex::encode(bytes))
    }

    /// Parses an id from a URL, refusing anything that is not 16 lower-case hex characters.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then(|| Self(s.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The source's cron schedule.
    Cron,
    /// A signed `POST /v1/sources/{name}/exports` (or `/verify`).
    Webhook,
    /// The same routes with the API bearer token (the dashboard's "Back up now" and "Verify now").
    Api,
}

/// What a job does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Export from the provider and copy into R2 (a backup).
    #[default]
    Export,
    /// Read a committed backup back from R2 and check every hash (`verify` says which).
    Verify,
    /// Copy a committed backup into the source's replica bucket (`replica` says which).
    Replicate,
    /// Restore a committed backup into a database (`restore` says how; see [`crate::restore`]).
    Restore,
    /// Restore the newest backup into a scratch database, compare, delete it.
    Drill,
}
