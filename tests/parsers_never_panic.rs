//! Property tests: every parser of outside input refuses bad input with a typed error and never
//! panics (a panic resets the whole wasm instance). Arbitrary and mutated inputs go to the config
//! parser, the alerts config parser and alert payloads, webhook verification, API routing, the
//! API budget's reading of rate-limit headers, the resume decisions on download answers, every
//! provider's response parsing and the age decryptor (headers, payloads, keys, lengths).

use proptest::prelude::*;
use serde_json::{json, Value};

use ferry::alerts::payload::{slack_body, webhook_body};
use ferry::alerts::AlertsConfig;
use ferry::api::route;
use ferry::budget::{Budget, BudgetPolicy, Decision, Need};
use ferry::config::Config;
use ferry::encryption::{self, Decryptor, Encryptor, Envelope, Identity, Recipient};
use ferry::http::HttpResponse;
use ferry::providers::d1::query::{plan, Content, QueryPlan, ScanTable, VirtualTable};
use ferry::providers::{Credentials, ProviderState, StepInput};
use ferry::secret::Secret;
use ferry::time::Timestamp;
use ferry::transfer::{parse_content_range, CopyState, Generator, Resume};
use ferry::webhook::{verify, WebhookHeaders, WebhookSecret};

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn sources() -> Vec<Value> {
    vec![
        json!({"name": "d", "kind": "d1", "schedule": "0 3 * * *", "account_id": "a", "database_id": "db", "token_secret": "T", "api_base": "http://127.0.0.1:9/client/v4"}),
        json!({"name": "g", "kind": "dgraph", "schedule": "0 3 * * *", "endpoint": "http://127.0.0.1:9", "api_key_secret": "T"}),
        json!({"name": "n", "kind": "aura", "schedule": "0 3 * * *", "instance_id": "2f49c2b3", "client_id_secret": "T", "client_secret_secret": "T", "db_password_secret": "T", "api_base": "http://127.0.0.1:9", "query_api_base": "http://127.0.0.1:9"}),
        json!({"name": "x", "kind": "dxp", "schedule": "0 3 * * *", "api_base": "http://127.0.0.1:9", "user_token_secret": "T"}),
    ]
}

/// Provider states part-way through their protocols, as well as fresh ones.
fn states(kind: &str) -> Vec<Value> {
    match kind {
        "d1" => {
            let plan = |columns: Value| {
                json!({"export": true, "dump_tables": [], "scan_at": 0, "schema": true, "data": true,
                "virtual_tables": [], "scan": [{"name": "t", "columns": columns}]})
            };
            vec![
                json!({"kind": "d1", "at_bookmark": "b", "polls": 1, "filename": null, "messages": []}),
                json!({"kind": "d1", "polls": 0, "filename": null, "messages": [],
                       "schema": [{"type": "table", "name": "t", "tbl_name": "t", "sql": "CREATE TABLE t(a)"}]}),
                json!({"kind": "d1", "polls": 0, "filename": null, "messages": [], "plan": plan(Value::Null)}),
                json!({"kind": "d1", "polls": 0, "filename": null, "messages": [], "plan": plan(json!(["a", "b"]))}),
            ]
        }
        "dgraph" => vec![json!({"kind": "dgraph", "secret_access_jwt": null, "secret_refresh_jwt": null, "logins": 0,
                                "export_id": "e", "task_id": "t", "status": "Running", "polls": 1, "files": []})],
        _ => vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_config_parser_never_panics(value in json_value(), text in ".{0,200}") {
        let _ = Config::from_value(&value);
        let _ = Config::from_value(&Value::Array(vec![value.clone()]));
        let _ = Config::from_value(&Value::String(text));
        // Mutations of valid sources: each field replaced by arbitrary JSON.
        for mut source in sources() {
            let keys: Vec<String> = source.as_object().unwrap().keys().cloned().collect();
            for k in keys {
                source[k.as_str()] = value.clone();
                let _ = Config::from_value(&Value::Array(vec![source.clone()]));
            }
        }
    }

    #[test]
    fn the_alerts_config_parser_never_panics(value in json_value(), text in ".{0,200}") {
        let _ = AlertsConfig::from_value(&value);
        let _ = AlertsConfig::from_value(&Value::Array(vec![value.clone()]));
        let _ = AlertsConfig::from_value(&Value::String(text));
        let destinations = [
            json!({"name": "ops", "kind": "webhook", "url": "https://h.io/x", "secret_secret": "K", "events": ["failed"],
                   "sources": ["d"], "dashboard_url": "https://f.io/", "max_attempts": 3, "retry_delay_seconds": 5}),
            json!({"name": "chat", "kind": "slack", "url_secret": "S", "events": ["stale", "recovered"]}),
        ];
        for mut d in destinations {
            let keys: Vec<String> = d.as_object().unwrap().keys().cloned().collect();
            for k in keys {
                d[k.as_str()] = value.clone();
                let _ = AlertsConfig::from_value(&Value::Array(vec![d.clone()]));
            }
        }
    }

    #[test]
    fn alert_payloads_never_panic_whatever_the_source_and_error_text(source in ".{0,80}", error in "(?s).{0,4000}", kind in 0usize..5) {
        let kinds = ["committed", "failed", "recovered", "stale", "verify_failed"];
        let event = json!({"id": "msg_0", "kind": kinds[kind], "at": "2026-11-28T10:00:00.000Z", "source": source,
            "source_kind": "d1", "reason": error, "recovered_from": ["failed"],
            "job": {"id": "0123456789abcdef", "task": "export", "trigger": "cron", "phase": "failed",
                    "started_at": "2026-11-28T10:00:00.000Z", "finished_at": "2026-11-28T10:00:00.000Z",
                    "bytes": 1, "error": error, "folder": source}});
        let event = serde_json::from_value(event).unwrap();
        let slack = slack_body(&event, None);
        for b in slack["blocks"].as_array().unwrap() {
            prop_assert!(b["text"]["text"].as_str().unwrap().chars().count() <= 3000);
        }
        let _ = webhook_body(&event, None);
    }

    #[test]
    fn webhook_verification_never_panics(id in ".{0,40}", ts in ".{0,20}", sig in ".{0,120}", body in prop::collection::vec(any::<u8>(), 0..256), secret in ".{0,60}") {
        let key = WebhookSecret::parse(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let headers = WebhookHeaders { id: Some(&id), timestamp: Some(&ts), signature: Some(&sig) };
        prop_assert!(verify(&key, headers, &body, Timestamp::from_secs(1_700_000_000)).is_err());
        let _ = WebhookSecret::parse(&Secret::new(secret));
    }

    #[test]
    fn rate_limit_headers_never_panic_and_a_wait_always_ends_later(status in 100u16..600, retry in ".{0,40}", remaining in ".{0,20}", reset in ".{0,40}", ietf in ".{0,60}", policy in ".{0,60}", secs in 0i64..4_000_000_000) {
        let now = Timestamp::from_secs(secs);
        let headers = vec![("retry-after".to_string(), retry), ("x-ratelimit-remaining".to_string(), remaining),
            ("x-ratelimit-reset".to_string(), reset), ("ratelimit".to_string(), ietf), ("ratelimit-policy".to_string(), policy)];
        let rules = BudgetPolicy::default();
        let mut budget = Budget::default();
        budget.observe(&rules, status, &headers, now);
        for need in [Need::Poll, Need::Start] {
            if let Decision::Wait { until } = budget.decide(&rules, need, now) {
                prop_assert!(until > now);
            }
        }
        let _ = budget.view(&rules, now);
    }

    #[test]
    fn api_routing_never_panics(method in "[A-Z]{0,8}", path in ".{0,200}") {
        let _ = route(&method, &path);
    }

    #[test]
    fn download_answers_never_panic(status in 100u16..600, range in ".{0,60}", etag in ".{0,30}", len in ".{0,20}") {
        let _ = parse_content_range(&range);
        let headers = vec![("content-range".to_string(), range), ("etag".to_string(), etag), ("content-length".to_string(), len)];
        let mut fresh = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        let _ = fresh.check_response(status, &headers);
        let mut resumed = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        resumed.offset = 10;
        let _ = resumed.check_response(status, &headers);
        let _ = resumed.check_unsatisfiable(&headers);
    }

    /// A resumed copy (10 bytes stored of an object whose first answer said `"v1"`, and 100 bytes
    /// when `sized`) continues only on a 206 from its offset, of the same object, of the length it
    /// started with (or, when it never learnt one, a stated total); a 416 completes it only for
    /// `bytes */10` of that same object. Anything else is refused (restart or failure).
    #[test]
    fn download_answers_that_do_not_continue_the_copy_are_refused(
        sized in any::<bool>(), status in prop::sample::select(vec![200u16, 206, 416]),
        start in 0u64..20, end in 0u64..120, total in prop::option::of(0u64..120),
        etag in prop::option::of(prop::sample::select(vec!["\"v1\"", "\"v2\"", "W/\"v1\""])),
    ) {
        let mut copy = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        let first = if sized { vec![("etag".to_string(), "\"v1\"".to_string()), ("content-length".to_string(), "100".to_string())] }
            else { vec![("etag".to_string(), "\"v1\"".to_string())] };
        prop_assert_eq!(copy.check_response(200, &first), Resume::Continue);
        copy.offset = 10;
        copy.parts_stored = 1;
        let shown = total.map_or("*".to_string(), |t| t.to_string());
        let mut headers = vec![("content-range".to_string(), if status == 416 { format!("bytes */{shown}") } else { format!("bytes {start}-{end}/{shown}") })];
        if let Some(e) = etag {
            headers.push(("etag".to_string(), e.to_string()));
        }
        // A 206 answers `If-Range: "v1"` only when that validator held (RFC 9110 §13.1.5): one
        // without an ETag is the same object; another ETag is not.
        let same = etag.is_none_or(|e| e == "\"v1\"");
        if status == 416 {
            let done = copy.clone().check_unsatisfiable(&headers).is_ok();
            prop_assert!(!done || (total == Some(10) && etag == Some("\"v1\"") && !sized), "416 {:?} completed a copy it does not prove", headers);
        } else {
            let went_on = copy.check_response(status, &headers) == Resume::Continue;
            let fits = status == 206 && start == 10 && same && end >= start
                && if sized { total.is_none_or(|t| t == 100 && end < t) } else { total.is_some_and(|t| end < t) };
            prop_assert_eq!(went_on, fits, "{} {:?}", status, headers);
        }
    }

    #[test]
    fn provider_answers_never_panic(status in 100u16..600, body in json_value(), raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut creds = Credentials::new();
        creds.insert("T", Secret::new("t"));
        let params = json!({});
        for source in sources() {
            let config = Config::from_value(&Value::Array(vec![source.clone()])).unwrap();
            let src = &config.sources[0];
            let input = StepInput { provider: &src.provider, creds: &creds, now: Timestamp::from_secs(1_700_000_000), params: &params, seen: &[] };
            let mut all = vec![ProviderState::new(&src.provider)];
            for s in states(src.kind()) {
                all.push(serde_json::from_value(s).unwrap());
            }
            for state in all {
                for payload in [body.to_string().into_bytes(), raw.clone()] {
                    let resp = HttpResponse { status, headers: vec![("retry-after".into(), "x".into())], body: payload };
                    let _ = state.clone().on_response(&input, &resp);
                }
            }
        }
    }

    #[test]
    fn aura_instance_answers_never_panic(body in json_value(), url in ".{0,80}", name in ".{0,30}") {
        use ferry::providers::aura::drill::{created, named, query_api_base};
        let _ = created(&body);
        let _ = named(&body, &name);
        if let Ok(base) = query_api_base(&url) {
            prop_assert!(base.starts_with("http://") || base.starts_with("https://"), "{base}");
        }
        let _ = created(&json!({"data": {"id": "aaaabbbb", "connection_url": url, "username": "u", "password": "p"}}));
    }

    #[test]
    fn d1_query_export_answers_and_schemas_never_panic(status in 100u16..600, body in json_value(), raw in prop::collection::vec(any::<u8>(), 0..300), sql in ".{0,120}", name in ".{0,12}") {
        let config = Config::from_value(&Value::Array(vec![sources()[0].clone()])).unwrap();
        let ferry::providers::ProviderConfig::D1(cfg) = &config.sources[0].provider else { unreachable!() };
        let objects = vec![ferry::providers::d1::query::SchemaObject { kind: "table".into(), name: name.clone(), tbl_name: name.clone(), sql: Some(sql.clone()) }];
        let _ = plan(&objects, &[name.clone()].into(), &Default::default());
        let mut p = QueryPlan { export: true, schema: true, data: true, ..Default::default() };
        for content in [Content::Rows, Content::External, Content::Contentless] {
            p.virtual_tables.push(VirtualTable { name: name.clone(), sql: sql.clone(), content });
        }
        p.scan.push(ScanTable { name: name.clone(), columns: None, big: [("c".to_string(), 1)].into(), rowid_alias: false, key: None });
        let spec = cfg.query_export("db", &p, &Secret::new("t")).unwrap();
        for payload in [body.to_string().into_bytes(), raw.clone()] {
            let resp = HttpResponse { status, headers: vec![], body: payload };
            let mut writer = spec.resume(None);
            for _ in 0..4 {
                let _ = writer.next_request();
                let _ = writer.on_response(&resp, Timestamp::from_secs(1_700_000_000));
            }
            let _ = writer.finish();
        }
    }

    #[test]
    fn the_age_decryptor_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        lines in prop::collection::vec(prop_oneof![
            "-> X25519 [A-Za-z0-9+/]{0,50}", "-> [ -~]{0,24}", "[A-Za-z0-9+/=]{0,70}", "--- [A-Za-z0-9+/]{0,50}", "---", "(?s).{0,20}",
        ], 0..6),
        plaintext in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(1usize..200, 1..8),
        flip in any::<usize>(),
        mask in any::<u8>(),
        numbers in (any::<u64>(), any::<u64>()),
        key_text in ".{0,100}",
    ) {
        let identity = Identity::from_secret_bytes([7; 32]);
        let ids = [identity.clone()];
        // Arbitrary bytes, and arbitrary header text after the version line.
        let mut text = b"age-encryption.org/v1\n".to_vec();
        text.extend_from_slice(lines.join("\n").as_bytes());
        text.extend_from_slice(&bytes);
        for input in [&bytes, &text] {
            let _ = Decryptor::open(&ids, input);
            let _ = encryption::decrypt(&ids, input);
        }
        // A real file, one byte flipped (or none), pushed in arbitrary slices.
        let envelope = Envelope::new(&[identity.to_recipient()], &[1; 16], &[[2; 32]], &[3; 16]).unwrap();
        let mut file = encryption::encrypt(&envelope, &plaintext).unwrap();
        let len = file.len();
        if mask != 0 {
            file[flip % len] ^= mask;
        }
        if let Ok(Some(mut decryptor)) = Decryptor::open(&ids, &file) {
            let mut rest = &file[decryptor.header_len() as usize..];
            let mut out = Vec::new();
            let mut failed = false;
            for cut in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (now, later) = rest.split_at((*cut).min(rest.len()));
                rest = later;
                match decryptor.push(now) { Ok(p) => out.extend(p), Err(_) => { failed = true; break; } }
            }
            match decryptor.finish() { Ok(p) => out.extend(p), Err(_) => failed = true }
            if mask == 0 { prop_assert!(!failed && out == plaintext); }
        } else {
            prop_assert!(mask != 0, "an intact file's header must open");
        }
        // Payload bytes straight into a resumed decryptor, at any chunk.
        let mut resumed = Decryptor::resume(envelope.payload_key().clone(), numbers.0, numbers.1);
        let _ = resumed.push(&bytes);
        let _ = resumed.finish();
        let _ = (resumed.ciphertext_offset(), resumed.plaintext_offset());
        // Lengths, resume points and keys.
        let _ = encryption::plaintext_len(numbers.0, numbers.1);
        let _ = encryption::ciphertext_len(numbers.0, numbers.1);
        let _ = encryption::resume_point(numbers.0, numbers.1);
        let (mut encryptor, _) = Encryptor::resume(&envelope, numbers.1 % 2_000);
        let _ = encryptor.push(&plaintext);
        let _ = encryptor.finish();
        let _ = key_text.parse::<Recipient>();
        let _ = key_text.parse::<Identity>();
        let _ = Identity::parse_key_file(&key_text);
    }
}

/// Fragments of S3's XML answers, to build documents close to real ones.
fn s3_xml() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">".to_string()),
        Just("</ListBucketResult>".to_string()),
        Just("<Contents>".to_string()),
        Just("</Contents>".to_string()),
        Just("<Key>".to_string()),
        Just("</Key>".to_string()),
        Just("<Size>".to_string()),
        Just("</Size>".to_string()),
        Just("<CommonPrefixes><Prefix>".to_string()),
        Just("</Prefix></CommonPrefixes>".to_string()),
        Just("<IsTruncated>true</IsTruncated>".to_string()),
        Just("<NextContinuationToken>".to_string()),
        Just("</NextContinuationToken>".to_string()),
        Just("<InitiateMultipartUploadResult><UploadId>".to_string()),
        Just("</UploadId></InitiateMultipartUploadResult>".to_string()),
        Just("<CompleteMultipartUploadResult/>".to_string()),
        Just("<Error><Code>".to_string()),
        Just("</Code><Message>".to_string()),
        Just("</Message></Error>".to_string()),
        Just("<?xml version=\"1.0\" encoding=\"UTF-8\"?>".to_string()),
        Just("<![CDATA[".to_string()),
        Just("]]>".to_string()),
        Just("<!-- c -->".to_string()),
        "&(amp|lt|gt|quot|apos|#[0-9]{0,8}|#x[0-9a-fA-F]{0,8}|[a-z]{0,6});?",
        "[0-9]{0,25}",
        "[ -~]{0,12}",
        "(?s).{0,6}",
    ];
    prop::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn s3_answers_never_panic(
        xml in s3_xml(),
        raw in prop::collection::vec(any::<u8>(), 0..400),
        status in 100u16..600,
        cut in any::<usize>(),
    ) {
        let cut = cut % (xml.len() + 1);
        let truncated = xml.as_bytes()[..cut].to_vec();
        for body in [xml.as_bytes(), &raw[..], &truncated[..]] {
            let _ = ferry::s3::parse_list(body);
            let _ = ferry::s3::parse_upload_id(body);
            let _ = ferry::s3::check_complete(status, body);
            let e = ferry::s3::error_of(status, body);
            prop_assert_eq!(e.status, status);
            prop_assert!(!e.code.is_empty());
            let _ = e.to_string();
            if (500..600).contains(&status) || status == 429 {
                let permanent = ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "NoSuchBucket"];
                prop_assert_eq!(e.retryable, !permanent.contains(&e.code.as_str()));
            }
        }
        if let Ok(page) = ferry::s3::parse_list(xml.as_bytes()) {
            prop_assert!(page.next.as_deref().is_none_or(|t| !t.is_empty()));
        }
    }

    #[test]
    fn s3_config_keys_and_signing_never_panic(
        value in json_value(),
        text in ".{0,120}",
        key in ".{0,300}",
        id in ".{0,60}",
        meta in prop::collection::vec((".{0,20}", "(?s).{0,40}"), 0..4),
        content_type in "(?s).{0,40}",
        hash in ".{0,70}",
        number in any::<u16>(),
        len in any::<u64>(),
        millis in any::<i64>(),
        virtual_ in any::<bool>(),
    ) {
        let _ = ferry::s3::S3Config::from_value(&value);
        let _ = ferry::s3::S3Keys::parse("REPLICA_S3_KEYS", &text);
        let config = ferry::s3::S3Config::from_value(&json!({
            "endpoint": "http://minio.local:9000", "region": "us-east-1", "bucket": "ferry-copy",
            "credentials_secret": "K", "addressing": if virtual_ { "virtual" } else { "path" },
        })).unwrap();
        let keys = ferry::s3::S3Keys::parse("K", "AKIDTEST:secret/+key").unwrap();
        let c = ferry::s3::S3Client::new(&config, &keys);
        let now = Timestamp::from_millis(millis);
        let metadata: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let requests = [
            c.put_object(&key, key.as_bytes().to_vec(), &content_type, &metadata, now),
            c.get_object(&key, now),
            c.get_object_range(&key, len / 2, len, now),
            c.head_object(&key, now),
            c.delete_object(&key, now),
            c.create_multipart_upload(&key, &content_type, &metadata, now),
            c.upload_part(&key, &id, number, &hash, len, now),
            c.complete_multipart_upload(&key, &id, &[(number, id.clone()), (1, hash.clone())], now),
            c.abort_multipart_upload(&key, &id, now),
            c.list_objects(&key, Some(&id), Some(&hash), 1000, now),
        ];
        // Whatever the text, every request of a key S3 accepts (up to 1024 bytes) is signed.
        for r in &requests {
            prop_assert!(r.header_value("authorization").is_some(), "unsigned: {:?}", r);
        }
    }
}
