//! Retention: which committed backups of a source to keep, which to delete, and why.
//!
//! A source's optional `retention` table is a [`RetentionPolicy`] with restic's `forget`
//! semantics, so operators can reason about it with what they already know:
//!
//! - `keep_last = N` keeps the N newest backups.
//! - `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`, `keep_yearly` (`= N`) walk the
//!   backups newest first and keep the newest backup of each distinct period (UTC hour, day, ISO
//!   week, month, year) until N periods are kept. As restic does (since 0.17), when fewer than N
//!   periods exist the oldest backup is kept as well ("oldest daily …"): the longest history is
//!   kept while the rule still has room.
//! - `keep_within = "1y6m"` keeps every backup made less than that duration before the newest
//!   backup (not before now: a source that stopped backing up keeps its last stretch). As restic,
//!   "newest" here is the newest backup that is not in the future, and the cut-off is exclusive.
//!
//! A backup kept by any rule is kept, with every rule that keeps it listed. On top of the rules,
//! some backups are never deleted: the newest backup, pinned backups, and, when the source
//! verifies (it has a `verify_schedule`), every backup whose replacement has not passed
//! verification (the newest backup verified `ok`, and everything newer).
//!
//! In account mode (a Dgraph account's backends) every member is its own series: the rules, the
//! newest-backup and the verification protections apply to each member's backups apart, so one
//! backend's backups never push another's out.
//!
//! [`plan`] is pure: backups and "now" are arguments, nothing is read or deleted here. The
//! runtime lists the source's manifests, builds [`BackupInfo`]s, calls [`plan`] and deletes
//! what the plan says (manifest first); `GET /v1/sources/{name}/retention` shows the same plan.

use std::fmt;

use chrono::{Datelike, Months, TimeDelta};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::manifest::Manifest;
use crate::time::Timestamp;

/// Name of the pin marker in a backup's folder: a pinned backup is never deleted.
///
/// Pins live in R2 next to the backup rather than in the source's Durable Object, so they survive
/// the loss of the object's storage and go away together with the backup.
pub const PIN_NAME: &str = "pin.json";

/// The key of the pin marker of `folder` (`{source}/{stamp}-{job}/`).
pub fn pin_key(folder: &str) -> String {
    format!("{folder}{PIN_NAME}")
}

/// The content of a pin marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// When the backup was pinned.
    pub pinned_at: Timestamp,
}

/// The largest count a `keep_*` rule accepts.
pub const MAX_COUNT: u64 = 1_000_000;
/// The largest number in one part of a `keep_within` duration.
pub const MAX_DURATION_PART: u64 = 100_000;

/// The fields of a `retention` table, as written in the config.
pub const FIELDS: &[&str] =
    &["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"];

/// A `keep_*` count: a whole number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Count(u32);

impl Count {
    /// `n` as a count, when it is from 1 to [`MAX_COUNT`].
    pub fn new(n: u64) -> Option<Self> {
        (1..=MAX_COUNT).contains(&n).then_some(Self(n as u32))
    }

    /// The number.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl Visitor<'_> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a whole number from 1 to {MAX_COUNT}")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Count::new(n)
                    .ok_or_else(|| E::custom(format!("must be a whole number from 1 to {MAX_COUNT} (got {n})")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("must be a whole number from 1 to {MAX_COUNT} (got {n})"))),
                }
            }
        }
        d.deserialize_u64(CountVisitor)
    }
}

/// A `keep_within` duration in restic's calendar units: years, months, days and hours.
///
/// Accepted syntax (surrounding spaces ignored):
/// - restic's: one or more `<number><unit>` with units `y`, `m` (months), `d`, `h`, each at most
///   once, in any order: `1y6m`, `30d`, `2d12h`;
/// - ISO 8601: `P[nY][nM][nW][nD][T[nH]]`, for example `P1Y6M`, `P30D`, `P2W` (14 days), `PT12H`.
///   Minutes and seconds are refused: retention works in hours at the finest.
///
/// Each number is at most [`MAX_DURATION_PART`]; a zero duration is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepWithin {
    /// Years.
    pub years: u32,
    /// Calendar months.
    pub months: u32,
    /// Days.
    pub days: u32,
    /// Hours.
    pub hours: u32,
}

impl KeepWithin {
    /// Parses a duration; the error says what is wrong and what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let parsed = match s.strip_prefix(['P', 'p']) {
            Some(iso) => Self::parse_iso(iso),
            None => Self::parse_restic(s),
        };
        let d = parsed.map_err(|problem| {
            format!(
                "is not a valid duration: {text:?}: {problem} (use restic's units y, m, d, h as in \"1y6m\", \"30d\", \
                 \"12h\", or ISO 8601 as in \"P1Y6M\", \"P30D\", \"PT12H\")"
            )
        })?;
        if d == Self::default() {
            return Err(format!("is not a valid duration: {text:?} is zero; keep_within must be longer than zero"));
        }
        Ok(d)
    }

    fn parse_restic(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("it is empty".into());
        }
        let mut d = Self::default();
        let mut seen = String::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (n, unit, after) = number_and_unit(rest)?;
            let slot = match unit {
                'y' => &mut d.years,
                'm' => &mut d.months,
                'd' => &mut d.days,
                'h' => &mut d.hours,
                other => return Err(format!("unknown unit {other:?} after {n}")),
            };
            if seen.contains(unit) {
                return Err(format!("the unit {unit:?} appears twice"));
            }
            seen.push(unit);
            *slot = n;
            rest = after;
        }
        Ok(d)
    }

    fn parse_iso(s: &str) -> Result<Self, String> {
        let (date, time) = match s.split_once(['T', 't']) {
            Some((date, "")) => return Err(format!("nothing after T in P{date}T")),
            Some((date, time)) => (date, Some(time)),
            None => (s, None),
        };
        if date.is_empty() && time.is_none() {
            return Err("nothing after P".into());
        }
        let mut d = Self::default();
        let mut order = "YMWD".chars();
        let mut rest = date;
        while !rest.is_empty() {
            let (n, unit, after) = number_and_unit(rest)?;
            let unit = unit.to_ascii_uppercase();
            // Each designator at most once, in ISO order.
            if !order.any(|u| u == unit) {
                return Err(format!(
                    "{unit:?} is out of place or not a date designator (use Y, M, W, D in that order)"
                ));
            }
            match unit {
                'Y' => d.years = n,
                'M' => d.months = n,
                'W' => d.days = d.days.saturating_add(n.saturating_mul(7)),
                _ => d.days = d.days.saturating_add(n),
            }
            rest = after;
        }
        if let Some(time) = time {
            let (n, unit, after) = number_and_unit(time)?;
            match unit.to_ascii_uppercase() {
                'H' if after.is_empty() => d.hours = n,
                'H' => return Err(format!("{after:?} after the hours: minutes and seconds are not supported")),
                other => return Err(format!("{other:?} in the time part: only hours (H) are supported")),
            }
        }
        if u64::from(d.days) > MAX_DURATION_PART {
            return Err(format!("more than {MAX_DURATION_PART} days"));
        }
        Ok(d)
    }

    /// The instant this duration before `t`, in calendar arithmetic (months clamped to the end of
    /// the month); the earliest representable instant when it falls outside the calendar.
    pub fn before(self, t: Timestamp) -> Timestamp {
        let months = self.years.saturating_mul(12).saturating_add(self.months);
        t.to_datetime()
            .checked_sub_months(Months::new(months))
            .and_then(|d| d.checked_sub_signed(TimeDelta::try_days(i64::from(self.days))?))
            .and_then(|d| d.checked_sub_signed(TimeDelta::try_hours(i64::from(self.hours))?))
            .map_or(Timestamp::from_millis(i64::MIN), Timestamp::from_datetime)
    }
}

/// `"12d…"` → `(12, 'd', "…")`.
fn number_and_unit(s: &str) -> Result<(u32, char, &str), String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("expected a number at {s:?}"));
    }
    let n: u64 = s[..digits].parse().map_err(|_| format!("{} is too large", &s[..digits]))?;
    if n > MAX_DURATION_PART {
        return Err(format!("{n} is larger than {MAX_DURATION_PART}"));
    }
    let mut rest = s[digits..].chars();
    let unit = rest.next().ok_or_else(|| format!("no unit after {n}"))?;
    Ok((n as u32, unit, rest.as_str()))
}

impl fmt::Display for KeepWithin {
    /// restic's form: `1y6m`, `30d`, `2d12h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, unit) in [(self.years, 'y'), (self.months, 'm'), (self.days, 'd'), (self.hours, 'h')] {
            if n != 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for KeepWithin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeepWithin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WithinVisitor;
        impl Visitor<'_> for WithinVisitor {
            type Value = KeepWithin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"1y6m\", \"30d\" or \"P30D\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeepWithin, E> {
                KeepWithin::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(WithinVisitor)
    }
}

/// The `retention` table as written, before the check that it sets a rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFields {
    #[serde(default)]
    keep_last: Option<Count>,
    #[serde(default)]
    keep_hourly: Option<Count>,
    #[serde(default)]
    keep_daily: Option<Count>,
    #[serde(default)]
    keep_weekly: Option<Count>,
    #[serde(default)]
    keep_monthly: Option<Count>,
    #[serde(default)]
    keep_yearly: Option<Count>,
    #[serde(default)]
    keep_within: Option<KeepWithin>,
}

/// A source's retention policy: restic's `forget` rules (see the module doc). Unknown fields are
/// refused, and so is a table that sets no rule (it would mean "delete everything but the
/// protected backups", which nobody writes on purpose; leave the table out to keep everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "PolicyFields")]
pub struct RetentionPolicy {
    /// Keep the N newest backups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<Count>,
    /// Keep the newest backup of each of the N newest UTC hours that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<Count>,
    /// … of each of the N newest UTC days.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<Count>,
    /// … of each of the N newest ISO weeks (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<Count>,
    /// … of each of the N newest UTC months.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<Count>,
    /// … of each of the N newest UTC years.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<Count>,
    /// Keep every backup newer than this before the newest backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<KeepWithin>,
}

impl TryFrom<PolicyFields> for RetentionPolicy {
    type Error = String;
    fn try_from(f: PolicyFields) -> Result<Self, String> {
        let policy = Self {
            keep_last: f.keep_last,
            keep_hourly: f.keep_hourly,
            keep_daily: f.keep_daily,
            keep_weekly: f.keep_weekly,
            keep_monthly: f.keep_monthly,
            keep_yearly: f.keep_yearly,
            keep_within: f.keep_within,
        };
        if policy == Self::default() {
            return Err(format!(
                "sets no rule: set at least one of {} (or leave the retention table out to keep every backup)",
                FIELDS.join(", ")
            ));
        }
        Ok(policy)
    }
}

/// A problem with a `retention` table; `field` is the offending key inside it, if one is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct PolicyError {
    /// The key inside the table (`keep_daily`), or `None` for the table as a whole.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl PolicyError {
    /// The field's path under `table` (`retention.keep_daily`), or `table` itself.
    pub fn path(&self, table: &str) -> String {
        match &self.field {
            Some(field) => format!("{table}.{field}"),
            None => table.to_string(),
        }
    }
}

impl RetentionPolicy {
    /// Parses a `retention` table, naming the offending field on error.
    pub fn from_value(value: &Value) -> Result<Self, PolicyError> {
        let whole = |problem: String| PolicyError { field: None, problem };
        let Some(map) = value.as_object() else { return Err(whole("must be a table".into())) };
        for (key, v) in map {
            let checked = match key.as_str() {
                "keep_within" => KeepWithin::deserialize(v).map(|_| ()),
                k if FIELDS.contains(&k) => Count::deserialize(v).map(|_| ()),
                _ => Err(de::Error::custom(format!("is not a known field (expected one of {})", FIELDS.join(", ")))),
            };
            checked.map_err(|e| PolicyError { field: Some(key.clone()), problem: e.to_string() })?;
        }
        Self::deserialize(value).map_err(|e| whole(e.to_string()))
    }
}

/// What the planner needs to know about one committed backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// `{source}/{stamp}-{job}/`.
    pub folder: String,
    /// The backup's time: see [`backup_time`].
    pub time: Timestamp,
    /// Whether it carries a pin marker.
    pub pinned: bool,
    /// Its last verification: `Some(true)` for `ok`, `Some(false)` for a mismatch, `None` when it
    /// was never verified.
    pub verified: Option<bool>,
    /// In account mode, the member it belongs to ([`member`]): each member is its own series.
    pub member: Option<String>,
}

/// The time retention counts a backup at: the cron fire time it serves when it was scheduled,
/// else when its job started. A scheduled backup belongs to its fire time's hour, day and week
/// however long its job waited (a catch-up, a busy source), so periods follow the schedule.
pub fn backup_time(manifest: &Manifest) -> Timestamp {
    manifest.scheduled_for.unwrap_or(manifest.started_at)
}

/// In account mode, the member a backup belongs to (a Dgraph account's backend, a D1 account's
/// database, as its manifest's references name it); `None` for a source of one database.
pub fn member(manifest: &Manifest) -> Option<String> {
    match manifest.kind.as_str() {
        "dgraph" => crate::providers::dgraph::member_of(&manifest.provider),
        "d1" => crate::providers::d1::member_of(&manifest.provider),
        "aura" => crate::providers::aura::member_of(&manifest.provider),
        _ => None,
    }
}

/// The calendar periods of the period rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Period {
    /// A UTC hour: `2026-11-27T10`.
    Hourly,
    /// A UTC day: `2026-11-27`.
    Daily,
    /// An ISO week: `2026-W48`.
    Weekly,
    /// A UTC month: `2026-11`.
    Monthly,
    /// A UTC year: `2026`.
    Yearly,
}

impl Period {
    /// Every period, finest first.
    pub const ALL: [Period; 5] = [Self::Hourly, Self::Daily, Self::Weekly, Self::Monthly, Self::Yearly];

    /// The rule's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hourly => "hourly",
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Yearly => "yearly",
        }
    }

    /// The period `t` falls in, as a label that sorts and compares like the period.
    pub fn label(self, t: Timestamp) -> String {
        let d = t.to_datetime();
        match self {
            Self::Hourly => d.format("%Y-%m-%dT%H").to_string(),
            Self::Daily => d.format("%Y-%m-%d").to_string(),
            Self::Weekly => {
                let w = d.iso_week();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Self::Monthly => d.format("%Y-%m").to_string(),
            Self::Yearly => format!("{:04}", d.year()),
        }
    }

    /// The policy's count for this period.
    pub fn count(self, policy: &RetentionPolicy) -> Option<Count> {
        match self {
            Self::Hourly => policy.keep_hourly,
            Self::Daily => policy.keep_daily,
            Self::Weekly => policy.keep_weekly,
            Self::Monthly => policy.keep_monthly,
            Self::Yearly => policy.keep_yearly,
        }
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The newest backup: never deleted.
    Newest,
    /// Pinned: never deleted.
    Pinned,
    /// The source verifies and no newer backup has passed verification: never deleted.
    ReplacementNotVerified,
    /// The source has no retention policy: every backup is kept.
    NoPolicy,
    /// One of the `keep_last` newest.
    Last,
    /// The newest of its period under a period rule; `oldest` when it is instead the oldest backup
    /// kept because the rule had room left (restic's "oldest daily snapshot").
    Period {
        /// The rule.
        period: Period,
        /// The period's label.
        bucket: String,
        /// Kept as the oldest backup, not as its period's newest.
        oldest: bool,
    },
    /// Within `keep_within` of the newest backup.
    Within(KeepWithin),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Newest => f.write_str("newest"),
            Self::Pinned => f.write_str("pinned"),
            Self::ReplacementNotVerified => f.write_str("replacement not verified"),
            Self::NoPolicy => f.write_str("no retention policy"),
            Self::Last => f.write_str("last"),
            Self::Period { period, bucket, oldest: false } => write!(f, "{} {bucket}", period.name()),
            Self::Period { period, bucket, oldest: true } => write!(f, "oldest {} {bucket}", period.name()),
            Self::Within(d) => write!(f, "within {d}"),
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The verdict on one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `{source}/{stamp}-{job}/`.
    pub folder: String,
    /// The backup's time.
    pub time: Timestamp,
    /// `keep` or `delete`.
    pub action: Action,
    /// Every rule and protection that keeps it (empty when it goes).
    pub reasons: Vec<Reason>,
    /// In account mode, the member whose series it was judged in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// What happens to a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// It stays.
    Keep,
    /// It is deleted (manifest first).
    Delete,
}

/// Every backup with its verdict, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The decisions, newest first (by time, then folder).
    pub backups: Vec<Decision>,
}

impl Plan {
    /// The backups that stay.
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.backups.iter().filter(|d| d.action == Action::Keep)
    }

    /// The backups that go.
    pub fn deleted(&self) -> impl Iterator<Item = &Decision> {
        self.backups.iter().filter(|d| d.action == Action::Delete)
    }

    /// The plan of a source without a retention policy: everything stays.
    pub fn keep_everything(backups: &[BackupInfo]) -> Self {
        let backups = newest_first(backups)
            .into_iter()
            .map(|b| Decision {
                folder: b.folder.clone(),
                time: b.time,
                action: Action::Keep,
                reasons: vec![Reason::NoPolicy],
                member: b.member.clone(),
            })
            .collect();
        Self { backups }
    }
}

fn newest_first(backups: &[BackupInfo]) -> Vec<&BackupInfo> {
    let mut order: Vec<&BackupInfo> = backups.iter().collect();
    order.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.folder.cmp(&a.folder)));
    order
}

/// Decides, for every backup, whether it is kept and why. `verifies` says whether the source has
/// a `verify_schedule`; `now` only decides which backups are "in the future" for `keep_within`.
/// Each member's backups (account mode) are planned as a series of their own.
pub fn plan(policy: &RetentionPolicy, backups: &[BackupInfo], verifies: bool, now: Timestamp) -> Plan {
    let mut series: std::collections::BTreeMap<Option<&str>, Vec<BackupInfo>> = std::collections::BTreeMap::new();
    for b in backups {
        series.entry(b.member.as_deref()).or_default().push(b.clone());
    }
    let mut decisions: Vec<Decision> =
        series.values().flat_map(|one| plan_series(policy, one, verifies, now).backups).collect();
    decisions.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.folder.cmp(&a.folder)));
    Plan { backups: decisions }
}

/// [`plan`] of one series.
fn plan_series(policy: &RetentionPolicy, backups: &[BackupInfo], verifies: bool, now: Timestamp) -> Plan {
    let order = newest_first(backups);
    let n = order.len();
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); n];
    // Never deleted.
    if let Some(first) = reasons.first_mut() {
        first.push(Reason::Newest);
    }
    for (i, b) in order.iter().enumerate() {
        if b.pinned {
            reasons[i].push(Reason::Pinned);
        }
    }
    if verifies {
        // Everything down to (and including) the newest backup verified ok.
        let last_protected = order.iter().position(|b| b.verified == Some(true)).unwrap_or(n.saturating_sub(1));
        for r in reasons.iter_mut().take(last_protected + 1) {
            r.push(Reason::ReplacementNotVerified);
        }
    }
    // The rules.
    if let Some(count) = policy.keep_last {
        for r in reasons.iter_mut().take(count.get()) {
            r.push(Reason::Last);
        }
    }
    for period in Period::ALL {
        let Some(count) = period.count(policy) else { continue };
        let mut left = count.get();
        let mut last: Option<String> = None;
        for (i, b) in order.iter().enumerate() {
            if left == 0 {
                break;
            }
            let bucket = period.label(b.time);
            let new_period = last.as_ref() != Some(&bucket);
            if new_period || i + 1 == n {
                reasons[i].push(Reason::Period { period, bucket: bucket.clone(), oldest: !new_period });
                last = Some(bucket);
                left -= 1;
            }
        }
    }
    if let Some(within) = policy.keep_within {
        // Measured from the newest backup that is not in the future (restic); with none, from the
        // beginning of time, which keeps them all.
        let cutoff = order
            .iter()
            .map(|b| b.time)
            .find(|t| *t <= now)
            .map_or(Timestamp::from_millis(i64::MIN), |t| within.before(t));
        for (i, b) in order.iter().enumerate() {
            if b.time > cutoff {
                reasons[i].push(Reason::Within(within));
            }
        }
    }
    let backups = order
        .into_iter()
        .zip(reasons)
        .map(|(b, reasons)| Decision {
            folder: b.folder.clone(),
            time: b.time,
            action: if reasons.is_empty() { Action::Delete } else { Action::Keep },
            reasons,
            member: b.member.clone(),
        })
        .collect();
    Plan { backups }
}

/// The UTC day of `t`, as days since the epoch.
pub fn utc_day(t: Timestamp) -> i64 {
    t.millis().div_euclid(86_400_000)
}

/// Whether a cron tick at `tick` is due a daily retention pass, given the UTC day of the last one.
/// At most one pass a day: a tick of a later day than the last pass's.
pub fn daily_pass_due(last_pass_day: Option<i64>, tick: Timestamp) -> bool {
    last_pass_day.is_none_or(|last| utc_day(tick) > last)
}

#[cfg(test)]
mod tests;
