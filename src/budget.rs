//! The Cloudflare API's request budget: one per API token, shared by every source and job that
//! uses the token.
//!
//! Cloudflare allows 1,200 requests per 5 minutes per user or account token, counted across the
//! dashboard, the API and every token alike; crossing it answers HTTP 429 and blocks **every**
//! call for the next 5 minutes (developers.cloudflare.com/fundamentals/api/reference/limits/). One
//! D1 export polled every second costs 300 requests per 5 minutes, so a few sources or drills on
//! one token would cross it, and D1 then cancels the exports it can no longer poll. So every
//! Cloudflare API request Ferry makes (D1 export and its polls, the query API, import, Time
//! Travel) first asks this budget, kept in one Durable Object per token (keyed by [`token_id`], a
//! hash: the token itself is never stored).
//!
//! The decision is pure: given the grants of the current window, the rate-limit headers seen and
//! `now`, [`Budget::decide`] grants a request or says until when to wait.
//! - **Its own count**: a sliding window of `window` (5 min, or the `w` of `Ratelimit-Policy`)
//!   holding at most `limit` (1,200, or a lower limit the headers give) grants, counted per
//!   second.
//! - **What Cloudflare says**, folded in by [`Budget::observe`] from every answer: `retry-after`
//!   (delta-seconds or an HTTP-date) and a 429 without it block until then (5 min by default);
//!   `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds, a Unix time or
//!   an HTTP-date), and the IETF draft's `Ratelimit: "default";r=<remaining>;t=<seconds>` and
//!   `Ratelimit-Policy: "…";q=<quota>;w=<window>`, which today's API also sends. The remaining
//!   count a header reports is lowered by every grant made since, and never raised within its
//!   window by a later (reordered) answer.
//! - **Polls first**: D1 cancels an export that is not polled, so the last
//!   `poll_reserve_percent` (10 %) of a window is kept for polls of running exports
//!   ([`Need::Poll`]); new work
//!   ([`Need::Start`]: a new export, an import, a query, a Time Travel call) waits for the next
//!   window instead.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::http::{parse_retry_after, HttpRequest};
use crate::providers::{Credentials, ProviderConfig};
use crate::time::Timestamp;

/// How much longer than the window a grant is counted: the request it allowed may reach
/// Cloudflare a little later than it was granted.
const MARGIN: Duration = Duration::from_secs(1);

/// The budget's sizes; the defaults are Cloudflare's documented limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Requests allowed per window (Cloudflare: 1,200), unless the headers give a lower one.
    pub limit: u32,
    /// The window (Cloudflare: 5 minutes), unless `Ratelimit-Policy` gives another.
    pub window: Duration,
    /// How long a 429 without `retry-after` blocks every call (Cloudflare: 5 minutes).
    pub block: Duration,
    /// The share of each window, in percent, kept for polls of running exports.
    pub poll_reserve_percent: u32,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            limit: 1200,
            window: Duration::from_secs(300),
            block: Duration::from_secs(300),
            poll_reserve_percent: 10,
        }
    }
}

/// The sizes a source sets for its token's budget (D1's `api_budget_requests` and
/// `api_budget_window_seconds`), sent with every request to the budget's object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// Requests allowed per window.
    pub limit: u32,
    /// The window, in seconds.
    pub window_s: u64,
}

impl Default for Sizes {
    fn default() -> Self {
        let p = BudgetPolicy::default();
        Self { limit: p.limit, window_s: p.window.as_secs() }
    }
}

impl Sizes {
    /// A source's sizes: its own for D1 (whose defaults are Cloudflare's 1,200 per 5 minutes),
    /// Cloudflare's for any other kind.
    pub fn of(provider: &ProviderConfig) -> Self {
        match provider {
            ProviderConfig::D1(cfg) => {
                Self { limit: cfg.api_budget_requests, window_s: u64::from(cfg.api_budget_window_seconds) }
            }
            _ => Self::default(),
        }
    }
}

impl BudgetPolicy {
    /// Cloudflare's policy with a source's limit and window (zero is taken as one).
    pub fn with_sizes(sizes: Sizes) -> Self {
        Self { limit: sizes.limit.max(1), window: Duration::from_secs(sizes.window_s.max(1)), ..Self::default() }
    }
}

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// A status poll of a running export, which D1 cancels when it goes unpolled: it may use the
    /// whole window.
    Poll,
    /// Anything else (a new export, an import, a query): it leaves `poll_reserve` requests.
    Start,
}

/// The budget's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Send it now (the grant is counted).
    Grant,
    /// Do not send it before `until`.
    Wait {
        /// When to ask again.
        until: Timestamp,
    },
}

/// What the latest rate-limit headers said, and what was granted since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Reported {
    remaining: u32,
    reset_at: Timestamp,
    granted_since: u32,
}

/// One token's budget, persisted in its Durable Object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Grants of the window: `(second, count)`, oldest first.
    #[serde(default)]
    grants: Vec<(i64, u32)>,
    /// No request before this (a 429 or `retry-after`).
    #[serde(default)]
    blocked_until: Option<Timestamp>,
    /// The latest `x-ratelimit-remaining`/`Ratelimit` count, until its reset.
    #[serde(default)]
    reported: Option<Reported>,
    /// The limit the headers gave (`x-ratelimit-limit`, `Ratelimit-Policy` `q`), if lower.
    #[serde(default)]
    limit_seen: Option<u32>,
    /// The window `Ratelimit-Policy` gave (`w`, seconds).
    #[serde(default)]
    window_seen: Option<u64>,
    /// Requests refused by Cloudflare with 429 (counted for `/metrics`).
    #[serde(default)]
    pub throttled: u32,
    /// The sizes the latest request came with (what `/metrics` shows the budget by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<Sizes>,
}

/// What `/metrics` shows of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    /// Requests left now.
    pub remaining: u32,
    /// The limit in force.
    pub limit: u32,
    /// Blocked until then, if blocked.
    pub blocked_until: Option<Timestamp>,
    /// 429s seen.
    pub throttled: u32,
}

impl Budget {
    fn limit(&self, policy: &BudgetPolicy) -> u32 {
        self.limit_seen.map_or(policy.limit, |seen| seen.min(policy.limit))
    }

    fn window(&self, policy: &BudgetPolicy) -> Duration {
        self.window_seen.filter(|w| *w > 0).map_or(policy.window, Duration::from_secs)
    }

    /// The requests of a window that only polls may use: `poll_reserve_percent` of the limit,
    /// rounded up, never the whole limit.
    fn poll_reserve(&self, policy: &BudgetPolicy) -> u32 {
        let limit = self.limit(policy);
        let share = (u64::from(limit) * u64::from(policy.poll_reserve_percent)).div_ceil(100);
        u32::try_from(share).unwrap_or(u32::MAX).min(limit.saturating_sub(1))
    }

    fn forget_old(&mut self, policy: &BudgetPolicy, now: Timestamp) {
        // A grant counted in second `s` may have been made as late as `s + 1` and reach
        // Cloudflare later still: it is held through second `s + window + 1`.
        let horizon = now.minus(self.window(policy)).minus(MARGIN).secs();
        self.grants.retain(|(second, _)| *second >= horizon);
        if self.reported.is_some_and(|r| now >= r.reset_at) {
            self.reported = None;
        }
        if self.blocked_until.is_some_and(|b| now >= b) {
            self.blocked_until = None;
        }
    }

    fn used(&self) -> u32 {
        self.grants.iter().map(|(_, n)| *n).sum()
    }

    /// Requests left now, by Ferry's own count and by what Cloudflare last said.
    fn left(&self, policy: &BudgetPolicy) -> u32 {
        let own = self.limit(policy).saturating_sub(self.used());
        match self.reported {
            Some(r) => own.min(r.remaining.saturating_sub(r.granted_since)),
            None => own,
        }
    }

    /// Grants a request of kind `need` now (and counts it), or says until when to wait.
    pub fn decide(&mut self, policy: &BudgetPolicy, need: Need, now: Timestamp) -> Decision {
        self.forget_old(policy, now);
        if let Some(until) = self.blocked_until {
            return Decision::Wait { until };
        }
        let floor = match need {
            Need::Poll => 0,
            Need::Start => self.poll_reserve(policy),
        };
        if self.left(policy) > floor {
            let second = now.secs();
            match self.grants.last_mut() {
                Some(last) if last.0 == second => last.1 += 1,
                _ => self.grants.push((second, 1)),
            }
            if let Some(r) = self.reported.as_mut() {
                r.granted_since += 1;
            }
            return Decision::Grant;
        }
        Decision::Wait { until: self.free_at(policy, floor, now) }
    }

    /// When more than `floor` requests will be left: once enough grants have left the window,
    /// and (when the headers are what holds it back) once Cloudflare's window resets.
    fn free_at(&self, policy: &BudgetPolicy, floor: u32, now: Timestamp) -> Timestamp {
        let limit = self.limit(policy);
        let mut at = now.plus(Duration::from_secs(1));
        // Own count: the grants that must expire for `used` to fall below `limit - floor`.
        let allowed = limit.saturating_sub(floor).saturating_sub(1);
        let mut over = self.used().saturating_sub(allowed);
        for (second, n) in &self.grants {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(*n);
            at = at
                .max(Timestamp::from_secs(*second).plus(self.window(policy)).plus(MARGIN).plus(Duration::from_secs(1)));
        }
        if let Some(r) = self.reported {
            if r.remaining.saturating_sub(r.granted_since) <= floor {
                at = at.max(r.reset_at);
            }
        }
        at
    }

    /// Folds in an answer of the Cloudflare API: its status and rate-limit headers.
    pub fn observe(&mut self, policy: &BudgetPolicy, status: u16, headers: &[(String, String)], now: Timestamp) {
        self.forget_old(policy, now);
        let header = |name: &str| crate::transfer::header(headers, name).map(str::trim);
        let retry = header("retry-after").and_then(|v| parse_retry_after(v, now));
        if status == 429 {
            self.throttled += 1;
        }
        if let Some(wait) = retry.or((status == 429).then_some(policy.block)) {
            let until = now.plus(wait.max(Duration::from_secs(1)));
            self.blocked_until = Some(self.blocked_until.map_or(until, |b| b.max(until)));
        }
        let (ietf_remaining, ietf_reset) = header("ratelimit").map(ietf_ratelimit).unwrap_or((None, None));
        let (ietf_quota, ietf_window) = header("ratelimit-policy").map(ietf_policy).unwrap_or((None, None));
        if let Some(limit) = header("x-ratelimit-limit").and_then(|v| v.parse::<u32>().ok()).or(ietf_quota) {
            self.limit_seen = Some(limit);
        }
        if let Some(window) = ietf_window.filter(|w| *w > 0) {
            self.window_seen = Some(window);
        }
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.parse::<u32>().ok()).or(ietf_remaining);
        let Some(remaining) = remaining else { return };
        let reset_at = header("x-ratelimit-reset")
            .and_then(|v| reset_time(v, now))
            .or(ietf_reset.map(|s| now.plus(Duration::from_secs(s))))
            .unwrap_or_else(|| now.plus(self.window(policy)));
        let fresh = Reported { remaining, reset_at, granted_since: 0 };
        self.reported = Some(match self.reported {
            // The same window: an answer to an earlier request may arrive after a later one's.
            Some(old) if old.reset_at == reset_at => {
                if remaining < old.remaining.saturating_sub(old.granted_since) {
                    fresh
                } else {
                    old
                }
            }
            _ => fresh,
        });
        if status == 429 && remaining == 0 && self.blocked_until.is_none() {
            self.blocked_until = Some(reset_at);
        }
    }

    /// What `/metrics` and the status show.
    pub fn view(&self, policy: &BudgetPolicy, now: Timestamp) -> BudgetView {
        let mut current = self.clone();
        current.forget_old(policy, now);
        BudgetView {
            remaining: if current.blocked_until.is_some() { 0 } else { current.left(policy) },
            limit: current.limit(policy),
            blocked_until: current.blocked_until,
            throttled: current.throttled,
        }
    }
}

/// `x-ratelimit-reset`: delta-seconds, a Unix time in seconds, or an HTTP-date (RFC 1123).
fn reset_time(value: &str, now: Timestamp) -> Option<Timestamp> {
    if let Ok(n) = value.parse::<i64>() {
        // Anything past 2001 is a Unix time; smaller numbers are seconds from now.
        return Some(if n > 1_000_000_000 {
            Timestamp::from_millis(n.saturating_mul(1000))
        } else {
            now.plus(Duration::from_secs(u64::try_from(n).unwrap_or(0)))
        });
    }
    parse_retry_after(value, now).map(|d| now.plus(d))
}

/// The IETF draft's `Ratelimit: "default";r=50;t=30`: remaining and seconds to the reset (the
/// smallest remaining when several limits are listed).
fn ietf_ratelimit(value: &str) -> (Option<u32>, Option<u64>) {
    let mut best: (Option<u32>, Option<u64>) = (None, None);
    for item in value.split(',') {
        let (r, t) = (param(item, "r"), param(item, "t"));
        if let Some(r) = r.and_then(|r| u32::try_from(r).ok()) {
            if best.0.is_none_or(|b| r < b) {
                best = (Some(r), t);
            }
        }
    }
    best
}

/// The IETF draft's `Ratelimit-Policy: "burst";q=100;w=60`: the smallest quota and its window.
fn ietf_policy(value: &str) -> (Option<u32>, Option<u64>) {
    let mut best: (Option<u32>, Option<u64>) = (None, None);
    for item in value.split(',') {
        if let Some(q) = param(item, "q").and_then(|q| u32::try_from(q).ok()) {
            if best.0.is_none_or(|b| q < b) {
                best = (Some(q), param(item, "w"));
            }
        }
    }
    best
}

fn param(item: &str, name: &str) -> Option<u64> {
    item.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == name).then(|| v.trim().parse::<u64>().ok()).flatten()
    })
}

/// The name of a token's budget: a SHA-256 of the token (never the token itself), in hex.
pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(format!("ferry-api-budget\0{token}").as_bytes());
    hex::encode(&digest[..16])
}

/// The short form shown in `/metrics` (`token="<8 hex>"`).
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The API token a request to the Cloudflare API spends, when it is one: a D1 source's request
/// to its `api_base` (not a presigned download URL), with the source's token.
pub fn cloudflare_token<'a>(
    provider: &ProviderConfig,
    req: &HttpRequest,
    creds: &'a Credentials,
) -> Option<&'a crate::secret::Secret> {
    let ProviderConfig::D1(cfg) = provider else { return None };
    let base = cfg.api_base.as_ref()?.as_str().trim_end_matches('/');
    let to_api = req.url.strip_prefix(base).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !to_api {
        return None;
    }
    creds.get(&cfg.token_secret).ok()
}

/// The budget ids of every API token the config's D1 sources use (each once), for `/metrics`.
pub fn token_ids(config: &crate::config::Config, creds: &Credentials) -> Vec<String> {
    let mut ids: Vec<String> = config
        .sources
        .iter()
        .filter_map(|s| match &s.provider {
            ProviderConfig::D1(cfg) => creds.get(&cfg.token_secret).ok().map(|t| token_id(t.expose())),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests;
