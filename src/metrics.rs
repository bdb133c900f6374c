//! `GET /metrics`: the sources' reports in the Prometheus text exposition format (0.0.4).
//!
//! Names follow Prometheus conventions: a `ferry_` prefix, base units in the name (`_seconds`,
//! `_bytes`), `_total` on counters, and one `# HELP` and `# TYPE` line per family. Every sample
//! carries the `source` label; values come from the reports only, never from a default.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::health::Light;
use crate::identity::Task;
use crate::job::Phase;
use crate::status::SourceReport;

/// One source as the metrics see it.
pub struct SourceMetrics<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its provider kind.
    pub kind: &'a str,
    /// Its report.
    pub report: &'a SourceReport,
    /// Committed backups in R2 (manifests), when they could be counted.
    pub backups_retained: Option<usize>,
    /// In account mode, the committed backups of each member (a Dgraph account's backends), when
    /// their manifests could be read ([`count_by_member`]); `None` otherwise.
    pub retained_by_member: Option<BTreeMap<String, usize>>,
}

/// Committed backups per member, from each backup's member (`None`: a backup of no member).
pub fn count_by_member(members: impl IntoIterator<Item = Option<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for member in members.into_iter().flatten() {
        *counts.entry(member).or_insert(0) += 1;
    }
    counts
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

/// The exposition text for all sources.
pub fn render(sources: &[SourceMetrics<'_>]) -> String {
    let mut families = [
        family("ferry_source_info", "gauge", "A source Ferry backs up (value 1), with its provider kind."),
        family("ferry_source_healthy", "gauge", "1 when the source is green (backed up as scheduled), else 0."),
        family("ferry_source_stale", "gauge", "1 when no committed backup is within the source's max_age."),
        family(
            "ferry_last_success_timestamp_seconds",
            "gauge",
            "When the newest committed backup finished (Unix time).",
        ),
        family("ferry_last_backup_size_bytes", "gauge", "Bytes stored by the newest committed backup."),
        family("ferry_last_backup_duration_seconds", "gauge", "How long the newest committed backup took."),
        family("ferry_jobs_total", "counter", "Finished jobs by outcome (committed, failed, skipped, verified, ...)."),
        family("ferry_job_in_flight", "gauge", "1 while a job of the source runs."),
        family("ferry_job_copied_bytes", "gauge", "Bytes the job in flight has stored so far."),
        family(
            "ferry_backups_retained",
            "gauge",
            "Committed backups of the source in R2 (account mode: of each member, labelled member).",
        ),
        family(
            "ferry_last_verification_timestamp_seconds",
            "gauge",
            "When the latest verification finished (Unix time).",
        ),
        family(
            "ferry_last_verification_success",
            "gauge",
            "1 when the latest verification found every file intact, else 0.",
        ),
        family("ferry_last_drill_timestamp_seconds", "gauge", "When the latest restore drill finished (Unix time)."),
        family(
            "ferry_last_drill_success",
            "gauge",
            "1 when the latest restore drill passed (D1: every table's rows; Aura: every label's and type's count and typed values), else 0.",
        ),
        family(
            "ferry_member_healthy",
            "gauge",
            "Account mode: 1 when the member (a Dgraph account's backend) is green, else 0.",
        ),
        family("ferry_member_stale", "gauge", "Account mode: 1 when no committed backup of the member is within max_age."),
    ];
    for s in sources {
        let r = s.report;
        let source = format!("source=\"{}\"", escape(s.name));
        let mut put = |i: usize, labels: &str, value: f64| families[i].samples.push((labels.to_string(), value));
        put(0, &format!("{source},kind=\"{}\"", escape(s.kind)), 1.0);
        put(1, &source, if r.health.light == Light::Green { 1.0 } else { 0.0 });
        put(2, &source, if r.health.is_stale() { 1.0 } else { 0.0 });
        // In account mode every member is its own series: its newest backup carries its label,
        // and no source-wide "newest backup" (one member's) stands for the others.
        let last = r.history.iter().rev().find(|h| h.task == Task::Export && h.phase == Phase::Committed);
        let newest: Vec<(String, &crate::history::JobSummary)> = if r.members.is_empty() {
            last.map(|l| (source.clone(), l)).into_iter().collect()
        } else {
            r.members
                .iter()
                .filter_map(|(m, status)| {
                    status.last_backup.as_ref().map(|l| (format!("{source},member=\"{}\"", escape(m)), l))
                })
                .collect()
        };
        for (labels, last) in newest {
            put(3, &labels, last.finished_at.millis() as f64 / 1000.0);
            put(4, &labels, last.bytes as f64);
            put(5, &labels, last.finished_at.since(last.started_at).as_secs_f64());
        }
        for (m, status) in &r.members {
            let labels = format!("{source},member=\"{}\"", escape(m));
            put(14, &labels, if status.health.light == Light::Green { 1.0 } else { 0.0 });
            put(15, &labels, if status.health.is_stale() { 1.0 } else { 0.0 });
        }
        for (phase, n) in &r.outcomes {
            let outcome = serde_json::to_value(phase).ok().and_then(|v| v.as_str().map(str::to_string));
            put(6, &format!("{source},outcome=\"{}\"", outcome.unwrap_or_default()), *n as f64);
        }
        put(7, &source, if r.current_job.is_some() { 1.0 } else { 0.0 });
        if let Some(p) = &r.progress {
            put(8, &source, p.bytes_copied as f64);
        }
        // In account mode each member's backups are counted apart (a member the health judges
        // but with none in R2 counts 0); a count that could not be broken down stays source-wide.
        match (&s.retained_by_member, s.backups_retained) {
            (Some(by_member), _) if !r.members.is_empty() || !by_member.is_empty() => {
                let names: std::collections::BTreeSet<&String> = r.members.keys().chain(by_member.keys()).collect();
                for m in names {
                    let labels = format!("{source},member=\"{}\"", escape(m));
                    put(9, &labels, by_member.get(m).copied().unwrap_or(0) as f64);
                }
            }
            (_, Some(n)) => put(9, &source, n as f64),
            (_, None) => {}
        }
        let verify = r.history.iter().rev().find(|h| h.task == Task::Verify && h.phase.is_terminal());
        if let Some(v) = verify {
            put(10, &source, v.finished_at.millis() as f64 / 1000.0);
            put(11, &source, if v.phase == Phase::Verified { 1.0 } else { 0.0 });
        }
        let drill = r.history.iter().rev().find(|h| h.task == Task::Drill && h.phase.is_terminal());
        if let Some(d) = drill {
            put(12, &source, d.finished_at.millis() as f64 / 1000.0);
            put(13, &source, if d.phase == Phase::Restored { 1.0 } else { 0.0 });
        }
    }
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
        }
    }
    out
}

/// The notification families: failed delivery attempts per destination, from the `~alerts`
/// record (every configured destination appears, at 0 until one fails, as counters should).
pub fn render_notifications(destinations: &[&str], failures: &BTreeMap<String, u64>) -> String {
    let mut f = family(
        "ferry_notification_failures_total",
        "counter",
        "Alert delivery attempts that failed (non-2xx, no answer, misconfigured, or not queued), by destination.",
    );
    let mut names: Vec<&str> = destinations.to_vec();
    names.extend(failures.keys().map(String::as_str).filter(|n| !destinations.contains(n)));
    for name in names {
        let n = failures.get(name).copied().unwrap_or(0);
        f.samples.push((format!("destination=\"{}\"", escape(name)), n as f64));
    }
    exposition(&[f])
}

/// The Cloudflare API request budget of each token (see [`crate::budget`]), labelled by the
/// short hash of the token (never the token): what is left now, the limit in force, whether
/// every call is blocked, and the 429s Cloudflare answered.
pub fn render_budgets(budgets: &[(String, crate::budget::BudgetView)]) -> String {
    let mut families = [
        family("ferry_api_budget_remaining", "gauge", "Cloudflare API requests left to this token now."),
        family("ferry_api_budget_limit", "gauge", "Cloudflare API requests allowed to this token per window."),
        family("ferry_api_budget_blocked", "gauge", "1 while Cloudflare blocks every call of this token (a 429)."),
        family("ferry_api_budget_throttled_total", "counter", "Cloudflare API answers 429 to this token."),
    ];
    for (id, view) in budgets {
        let label = format!("token=\"{}\"", escape(crate::budget::short_id(id)));
        let values = [
            f64::from(view.remaining),
            f64::from(view.limit),
            if view.blocked_until.is_some() { 1.0 } else { 0.0 },
            f64::from(view.throttled),
        ];
        for (f, value) in families.iter_mut().zip(values) {
            f.samples.push((label.clone(), value));
        }
    }
    exposition(&families)
}

/// The text of some families (those with samples).
fn exposition(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
        }
    }
    out
}

fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family { name, kind, help, samples: Vec::new() }
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn each_tokens_budget_is_shown_by_its_short_hash() {
        let id = crate::budget::token_id("cf-secret-token");
        let view = crate::budget::BudgetView {
            remaining: 37,
            limit: 1200,
            blocked_until: Some(crate::time::Timestamp::from_secs(9)),
            throttled: 2,
        };
        let text = super::render_budgets(&[(id.clone(), view)]);
        let short = &id[..8];
        assert!(text.contains(&format!("ferry_api_budget_remaining{{token=\"{short}\"}} 37\n")), "{text}");
        assert!(text.contains(&format!("ferry_api_budget_limit{{token=\"{short}\"}} 1200\n")), "{text}");
        assert!(text.contains(&format!("ferry_api_budget_blocked{{token=\"{short}\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("ferry_api_budget_throttled_total{{token=\"{short}\"}} 2\n")), "{text}");
        assert!(text.contains("# TYPE ferry_api_budget_remaining gauge"));
        assert!(!text.contains("cf-secret-token") && !text.contains(&id), "neither the token nor its full hash");
        assert_eq!(super::render_budgets(&[]), "");
    }

    use super::*;
    use crate::health::Health;
    use crate::history::JobSummary;
    use crate::identity::{JobId, Trigger};
    use crate::time::Timestamp;

    fn summary(task: Task, phase: Phase, start: i64, end: i64, bytes: u64) -> JobSummary {
        JobSummary {
            id: JobId::new(format!("{start:016x}")),
            task,
            trigger: Trigger::Cron,
            phase,
            started_at: Timestamp::from_secs(start),
            finished_at: Timestamp::from_secs(end),
            bytes,
            error: None,
            folder: None,
            member: None,
            warnings: Vec::new(),
        }
    }

    fn report() -> SourceReport {
        SourceReport {
            current_job: None,
            progress: None,
            last_job: None,
            health: Health {
                light: Light::Green,
                reason: "ok".into(),
                max_age_seconds: 7200,
                last_backup_at: Some(Timestamp::from_secs(1_000)),
            },
            history: vec![
                summary(Task::Export, Phase::Committed, 900, 1_000, 4096),
                summary(Task::Verify, Phase::Failed, 1_100, 1_150, 4096),
                summary(Task::Drill, Phase::Failed, 1_200, 1_250, 0),
                summary(Task::Drill, Phase::Restored, 1_300, 1_350, 0),
            ],
            outcomes: BTreeMap::from([(Phase::Committed, 3), (Phase::Failed, 1)]),
            members: BTreeMap::new(),
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_carry_the_source() {
        let r = report();
        let text = render(&[SourceMetrics {
            name: "app-db",
            kind: "d1",
            report: &r,
            backups_retained: Some(3),
            retained_by_member: None,
        }]);
        for line in [
            "# TYPE ferry_jobs_total counter",
            "ferry_source_info{source=\"app-db\",kind=\"d1\"} 1",
            "ferry_source_healthy{source=\"app-db\"} 1",
            "ferry_last_success_timestamp_seconds{source=\"app-db\"} 1000",
            "ferry_last_backup_size_bytes{source=\"app-db\"} 4096",
            "ferry_last_backup_duration_seconds{source=\"app-db\"} 100",
            "ferry_jobs_total{source=\"app-db\",outcome=\"committed\"} 3",
            "ferry_jobs_total{source=\"app-db\",outcome=\"failed\"} 1",
            "ferry_job_in_flight{source=\"app-db\"} 0",
            "ferry_backups_retained{source=\"app-db\"} 3",
            "ferry_last_verification_success{source=\"app-db\"} 0",
            "ferry_last_drill_timestamp_seconds{source=\"app-db\"} 1350",
            "ferry_last_drill_success{source=\"app-db\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert!(names.iter().all(|n| text.contains(&format!("# HELP {}", n.split(' ').next().unwrap()))));
        assert!(!text.contains("ferry_job_copied_bytes"), "no sample, no family");
    }

    #[test]
    fn in_account_mode_each_backend_is_its_own_series_labelled_by_member() {
        let mut r = report();
        let member = |light, at: i64, bytes| crate::status::MemberStatus {
            health: Health {
                light,
                reason: "r".into(),
                max_age_seconds: 7200,
                last_backup_at: Some(Timestamp::from_secs(at)),
            },
            last_backup: Some(summary(Task::Export, Phase::Committed, at - 10, at, bytes)),
        };
        r.members = BTreeMap::from([
            ("alpha".to_string(), member(Light::Green, 5_000, 10)),
            ("beta".to_string(), member(Light::Red, 1_000, 20)),
        ]);
        r.health.light = Light::Red;
        r.members.insert("gamma".to_string(), member(Light::Amber, 900, 0));
        let by_member = count_by_member([Some("alpha".into()), None, Some("beta".into()), Some("alpha".into())]);
        let text = render(&[SourceMetrics {
            name: "acct",
            kind: "dgraph",
            report: &r,
            backups_retained: Some(4),
            retained_by_member: Some(by_member),
        }]);
        for line in [
            "ferry_source_healthy{source=\"acct\"} 0",
            "ferry_member_healthy{source=\"acct\",member=\"alpha\"} 1",
            "ferry_member_healthy{source=\"acct\",member=\"beta\"} 0",
            "ferry_member_stale{source=\"acct\",member=\"beta\"} 1",
            "ferry_last_success_timestamp_seconds{source=\"acct\",member=\"alpha\"} 5000",
            "ferry_last_success_timestamp_seconds{source=\"acct\",member=\"beta\"} 1000",
            "ferry_last_backup_size_bytes{source=\"acct\",member=\"beta\"} 20",
            "ferry_backups_retained{source=\"acct\",member=\"alpha\"} 2",
            "ferry_backups_retained{source=\"acct\",member=\"beta\"} 1",
            "ferry_backups_retained{source=\"acct\",member=\"gamma\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("ferry_last_success_timestamp_seconds{source=\"acct\"}"),
            "no source-wide newest backup stands for one member"
        );
        assert!(!text.contains("ferry_backups_retained{source=\"acct\"}"), "counted per member, not source-wide");
    }

    #[test]
    fn notification_failures_are_a_counter_per_destination_starting_at_zero() {
        let failures = BTreeMap::from([("flaky".to_string(), 3), ("removed".to_string(), 1)]);
        let text = render_notifications(&["ops", "flaky"], &failures);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "# HELP ferry_notification_failures_total Alert delivery attempts that failed (non-2xx, no answer, misconfigured, or not queued), by destination.",
                "# TYPE ferry_notification_failures_total counter",
                "ferry_notification_failures_total{destination=\"ops\"} 0",
                "ferry_notification_failures_total{destination=\"flaky\"} 3",
                "ferry_notification_failures_total{destination=\"removed\"} 1",
            ]
        );
        assert_eq!(render_notifications(&[], &BTreeMap::new()), "", "no destinations, no family");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
