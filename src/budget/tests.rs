//! The budget's decisions: window counts, headers, blocks and the priority of polls.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::config::Config;
use crate::secret::Secret;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_secs(1_900_000_000 + secs)
}

fn tiny() -> BudgetPolicy {
    BudgetPolicy {
        limit: 10,
        window: Duration::from_secs(60),
        block: Duration::from_secs(60),
        poll_reserve_percent: 25,
    }
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn grants(b: &mut Budget, p: &BudgetPolicy, need: Need, now: Timestamp) -> usize {
    (0..100).take_while(|_| b.decide(p, need, now) == Decision::Grant).count()
}

#[test]
fn new_work_stops_at_the_poll_reserve_and_polls_use_the_rest() {
    let (p, mut b) = (tiny(), Budget::default());
    assert_eq!(grants(&mut b, &p, Need::Start, t(0)), 7, "10 - 3 (25 %, rounded up) kept for polls");
    assert_eq!(b.decide(&p, Need::Start, t(0)), Decision::Wait { until: t(62) });
    assert_eq!(grants(&mut b, &p, Need::Poll, t(0)), 3, "a running export is still polled");
    assert_eq!(b.decide(&p, Need::Poll, t(0)), Decision::Wait { until: t(62) });
    assert_eq!(b.view(&p, t(0)).remaining, 0);
}

#[test]
fn the_window_slides_a_second_at_a_time() {
    let (p, mut b) = (tiny(), Budget::default());
    for s in 0..10 {
        assert_eq!(b.decide(&p, Need::Poll, t(s)), Decision::Grant);
    }
    // Full: a grant of second 0 may have been made at 0.999 and reach Cloudflare later still, so
    // it is counted until second 62 (window, the rest of its second, a second of margin).
    assert_eq!(b.decide(&p, Need::Poll, t(30)), Decision::Wait { until: t(62) });
    assert_eq!(b.decide(&p, Need::Poll, t(61)), Decision::Wait { until: t(62) });
    assert_eq!(b.decide(&p, Need::Poll, t(62)), Decision::Grant);
    // New work needs 4 free (3 reserved + itself): grants of seconds 1, 2, 3 and 4 must go.
    assert_eq!(b.decide(&p, Need::Start, t(62)), Decision::Wait { until: t(66) });
    assert_eq!(b.decide(&p, Need::Start, t(66)), Decision::Grant);
    assert_eq!(b.view(&p, t(66)).remaining, 3);
}

#[test]
fn no_window_ever_holds_more_than_the_limit() {
    let p = tiny();
    let mut b = Budget::default();
    let mut sent: Vec<i64> = Vec::new();
    let mut seed = 7u64;
    let mut now = 0i64;
    for _ in 0..5_000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        now += (seed >> 60) as i64 % 3;
        let need = if (seed >> 33) & 1 == 0 { Need::Poll } else { Need::Start };
        match b.decide(&p, need, t(now)) {
            Decision::Grant => sent.push(now),
            Decision::Wait { until } => assert!(until > t(now), "a wait always ends later"),
        }
    }
    for (i, start) in sent.iter().enumerate() {
        let in_window = sent[i..].iter().take_while(|s| **s < start + 62).count();
        assert!(in_window <= 10, "{in_window} grants in the 62 s from {start}");
    }
    assert!(sent.len() > 500, "the budget is used, not just refused");
}

#[test]
fn retry_after_and_a_bare_429_block_every_call_even_polls() {
    let (p, mut b) = (tiny(), Budget::default());
    b.observe(&p, 429, &h(&[("retry-after", "30")]), t(0));
    assert_eq!(b.decide(&p, Need::Poll, t(10)), Decision::Wait { until: t(30) });
    assert_eq!(b.view(&p, t(10)).remaining, 0);
    assert_eq!(b.view(&p, t(10)).blocked_until, Some(t(30)));
    assert_eq!(b.decide(&p, Need::Poll, t(30)), Decision::Grant);
    // An HTTP-date works as well; a later answer never shortens a block.
    let mut b = Budget::default();
    let date = t(120).to_datetime().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    b.observe(&p, 429, &h(&[("Retry-After", &date)]), t(0));
    b.observe(&p, 429, &h(&[("retry-after", "5")]), t(1));
    assert_eq!(b.decide(&p, Need::Poll, t(60)), Decision::Wait { until: t(120) });
    // A 429 without retry-after: Cloudflare blocks for 5 minutes (here the policy's 60 s).
    let mut b = Budget::default();
    b.observe(&p, 429, &[], t(0));
    assert_eq!(b.decide(&p, Need::Poll, t(0)), Decision::Wait { until: t(60) });
    assert_eq!(b.throttled, 1);
}

#[test]
fn the_remaining_count_cloudflare_reports_caps_the_budget_and_counts_down_with_each_grant() {
    let (p, mut b) = (tiny(), Budget::default());
    // Other clients of the same user spent most of the window already.
    b.observe(
        &p,
        200,
        &h(&[("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", "40")]),
        t(0),
    );
    assert_eq!(grants(&mut b, &p, Need::Start, t(0)), 2, "5 left, 3 kept for polls");
    assert_eq!(b.decide(&p, Need::Start, t(1)), Decision::Wait { until: t(40) }, "until Cloudflare's reset");
    assert_eq!(grants(&mut b, &p, Need::Poll, t(1)), 3);
    // An answer to an earlier request, arriving late, does not give back what was spent.
    b.observe(&p, 200, &h(&[("x-ratelimit-remaining", "4"), ("x-ratelimit-reset", "39")]), t(1));
    assert_eq!(b.view(&p, t(1)).remaining, 0);
    // After the reset only Ferry's own count is left (5 grants in the window).
    assert_eq!(b.view(&p, t(40)).remaining, 5);
}

#[test]
fn reset_is_read_as_seconds_a_unix_time_or_an_http_date() {
    let p = tiny();
    let date = t(50).to_datetime().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let unix = t(45).secs().to_string();
    for (reset, at) in [("20", t(20)), (unix.as_str(), t(45)), (date.as_str(), t(50))] {
        let mut b = Budget::default();
        b.observe(&p, 200, &h(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset)]), t(0));
        assert_eq!(b.decide(&p, Need::Poll, t(0)), Decision::Wait { until: at }, "{reset}");
    }
    // No reset header: the remaining count holds for one window.
    let mut b = Budget::default();
    b.observe(&p, 200, &h(&[("x-ratelimit-remaining", "0")]), t(0));
    assert_eq!(b.decide(&p, Need::Poll, t(0)), Decision::Wait { until: t(60) });
}

#[test]
fn the_ietf_ratelimit_headers_are_read_too() {
    let p = BudgetPolicy::default();
    let mut b = Budget::default();
    b.observe(
        &p,
        200,
        &h(&[("ratelimit", "\"default\";r=50;t=30"), ("ratelimit-policy", "\"burst\";q=100;w=60")]),
        t(0),
    );
    let view = b.view(&p, t(0));
    assert_eq!((view.remaining, view.limit), (50, 100));
    assert_eq!(grants(&mut b, &p, Need::Poll, t(0)), 50);
    assert_eq!(b.decide(&p, Need::Poll, t(0)), Decision::Wait { until: t(30) });
    // After Cloudflare's reset Ferry's own count goes on over the policy's 60 s window.
    assert_eq!(grants(&mut b, &p, Need::Poll, t(30)), 50, "100 in 60 s, 50 of them spent");
    assert_eq!(b.decide(&p, Need::Poll, t(30)), Decision::Wait { until: t(62) });
}

#[test]
fn a_limit_lower_than_the_policys_is_adopted_and_garbage_headers_change_nothing() {
    let p = BudgetPolicy::default();
    let mut b = Budget::default();
    b.observe(&p, 200, &h(&[("x-ratelimit-limit", "8")]), t(0));
    assert_eq!(b.view(&p, t(0)).limit, 8);
    assert_eq!(grants(&mut b, &p, Need::Start, t(0)), 7, "8 less 10 % rounded up");
    let mut b = Budget::default();
    b.observe(&p, 200, &h(&[("x-ratelimit-limit", "1")]), t(0));
    assert_eq!(grants(&mut b, &p, Need::Start, t(0)), 1, "the reserve never takes the whole limit");
    let mut b = Budget::default();
    let junk = h(&[
        ("x-ratelimit-remaining", "many"),
        ("x-ratelimit-reset", "soon"),
        ("retry-after", "later"),
        ("ratelimit", ";;r=;t"),
    ]);
    b.observe(&p, 200, &junk, t(0));
    assert_eq!(b, Budget::default());
}

#[test]
fn the_budget_survives_storage() {
    let (p, mut b) = (tiny(), Budget::default());
    b.decide(&p, Need::Start, t(0));
    b.observe(&p, 429, &h(&[("retry-after", "9"), ("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "9")]), t(0));
    let back: Budget = serde_json::from_value(serde_json::to_value(&b).unwrap()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn tokens_are_named_by_a_hash_never_by_themselves() {
    let id = token_id("cf-token-abc");
    assert_eq!(id.len(), 32);
    assert_eq!(id, token_id("cf-token-abc"));
    assert_ne!(id, token_id("cf-token-abd"));
    assert!(!id.contains("abc"));
    assert_eq!(short_id(&id).len(), 8);
}

#[test]
fn only_requests_to_the_cloudflare_api_of_a_d1_source_spend_the_budget() {
    let config = Config::from_value(&json!([
        {"name": "app", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db",
         "token_secret": "D1_TOKEN", "api_base": "http://127.0.0.1:9/client/v4"},
        {"name": "graph", "kind": "dgraph", "schedule": "0 3 * * *", "endpoint": "http://127.0.0.1:9/",
         "api_key_secret": "K"}
    ]))
    .unwrap();
    let mut creds = Credentials::new();
    creds.insert("D1_TOKEN", Secret::new("tok"));
    let d1 = &config.sources[0].provider;
    let api = HttpRequest::get("http://127.0.0.1:9/client/v4/accounts/acc/d1/database/db/export");
    assert_eq!(cloudflare_token(d1, &api, &creds).map(|s| s.expose()), Some("tok"));
    let signed = HttpRequest::get("http://127.0.0.1:9/__signed/export.sql?X-Amz-Signature=1");
    assert!(cloudflare_token(d1, &signed, &creds).is_none(), "a presigned download is not an API call");
    let lookalike = HttpRequest::get("http://127.0.0.1:9/client/v4x/accounts");
    assert!(cloudflare_token(d1, &lookalike, &creds).is_none());
    assert!(cloudflare_token(&config.sources[1].provider, &api, &creds).is_none());
    assert!(cloudflare_token(d1, &api, &Credentials::new()).is_none(), "no token, nothing to count");
}

fn d1_source(extra: serde_json::Value) -> Result<Config, String> {
    let mut v = json!({"name": "app", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc",
        "database_id": "db", "token_secret": "D1_TOKEN"});
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    Config::from_value(&json!([v])).map_err(|e| e.to_string())
}

#[test]
fn a_d1_source_sets_its_tokens_budget_sizes_and_the_default_is_cloudflares_1200_per_5_minutes() {
    let default = d1_source(json!({})).unwrap();
    assert_eq!(Sizes::of(&default.sources[0].provider), Sizes { limit: 1200, window_s: 300 });
    assert_eq!(BudgetPolicy::with_sizes(Sizes::default()), BudgetPolicy::default());
    let own = d1_source(json!({"api_budget_requests": 3, "api_budget_window_seconds": 60})).unwrap();
    let sizes = Sizes::of(&own.sources[0].provider);
    assert_eq!(sizes, Sizes { limit: 3, window_s: 60 });
    // The budget holds requests to those sizes: three a minute, then a wait into the next minute.
    let policy = BudgetPolicy { poll_reserve_percent: 0, ..BudgetPolicy::with_sizes(sizes) };
    let mut b = Budget::default();
    assert_eq!(grants(&mut b, &policy, Need::Poll, t(0)), 3);
    let Decision::Wait { until } = b.decide(&policy, Need::Poll, t(1)) else { panic!("a wait") };
    assert!(until > t(59) && until <= t(62), "{until:?}");
}

#[test]
fn bad_budget_sizes_are_refused_naming_the_field() {
    let e = d1_source(json!({"api_budget_requests": 0})).unwrap_err();
    assert!(e.contains("field \"api_budget_requests\""), "{e}");
    let e = d1_source(json!({"api_budget_window_seconds": "5m"})).unwrap_err();
    assert!(e.contains("field \"api_budget_window_seconds\""), "{e}");
}
