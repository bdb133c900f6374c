//! The providers Ferry exports from, behind one small protocol.
//!
//! Every provider is a little state machine persisted with the job: it says which request to send
//! next, folds each answer into its state, and finally hands over the files to copy into R2. The
//! job engine (`job.rs`) owns everything else: retries, deadlines, the copy and the manifest.

pub mod d1;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ProviderConfig, SourceConfig};
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::secret::Secret;
use crate::time::Timestamp;

/// The Worker secrets a step may use, by secret name.
#[derive(Debug, Clone, Default)]
pub struct Credentials(BTreeMap<String, Secret>);

impl Credentials {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret.
    pub fn insert(&mut self, name: impl Into<String>, value: Secret) {
        self.0.insert(name.into(), value);
    }

    /// The secret called `name`, or a permanent error naming it.
    pub fn get(&self, name: &str) -> Result<&Secret, StepError> {
        self.0
            .get(name)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| StepError::permanent(format!("the Worker secret {name} is not set (wrangler secret put {name})")))
    }
}

/// A finished export file to copy into R2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// Where to GET it. Signed URLs are credentials: never shown in API responses.
    pub url: String,
    /// The provider's file name, used as the object's name in the backup folder.
    pub filename: String,
    /// Content type to store.
    pub content_type: String,
    /// Whether the GET needs the provider's credentials (signed URLs do not).
    pub authenticated: bool,
}

/// What a provider answer means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not done; ask again after `poll_after` (or the source's poll interval).
    Pending {
        /// Provider-specific delay; `None` means the source's `poll_interval`.
        poll_after: Option<Duration>,
    },
    /// The export is complete: copy these files.
    Ready(Vec<Download>),
    /// The provider reported that the export failed, with its own words.
    Failed(String),
}

/// Per-provider protocol state, persisted with the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderState {
    /// Cloudflare D1.
    D1(d1::D1State),
}

impl ProviderState {
    /// Fresh state for a new job of `source`.
    pub fn new(source: &SourceConfig) -> Self {
        match &source.provider {
            ProviderConfig::D1(_) => Self::D1(d1::D1State::default()),
        }
    }

    /// The next request of the export protocol.
    pub fn next_request(&self, source: &SourceConfig, creds: &Credentials) -> Result<HttpRequest, StepError> {
        match (self, &source.provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => {
                Ok(d1::export_request(cfg, state, creds.get(&cfg.token_secret)?))
            }
        }
    }

    /// Folds the answer to [`ProviderState::next_request`] into the state.
    pub fn on_response(
        &mut self,
        _source: &SourceConfig,
        resp: &HttpResponse,
        now: Timestamp,
    ) -> Result<Progress, StepError> {
        match self {
            Self::D1(state) => d1::on_export_response(state, resp, now),
        }
    }

    /// The GET that fetches one finished file.
    pub fn download_request(
        &self,
        source: &SourceConfig,
        download: &Download,
        creds: &Credentials,
    ) -> Result<HttpRequest, StepError> {
        let req = HttpRequest::get(download.url.clone());
        if !download.authenticated {
            return Ok(req);
        }
        match &source.provider {
            ProviderConfig::D1(cfg) => {
                Ok(req.header("authorization", format!("Bearer {}", creds.get(&cfg.token_secret)?.expose())))
            }
        }
    }

    /// The provider's references for the manifest (ids, bookmarks, filenames).
    pub fn references(&self, source: &SourceConfig) -> Value {
        match (self, &source.provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => state.references(cfg),
        }
    }
}
