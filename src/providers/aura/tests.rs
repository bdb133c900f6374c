use std::io::Read as _;

use flate2::read::GzDecoder;

use super::*;
use crate::config::{Config, SourceConfig};
use crate::providers::ProviderConfig;
use crate::secret::Secret;

fn source(mode: &str, page_size: u32) -> SourceConfig {
    Config::from_value(&json!([{
        "name": "graph", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
        "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET", "db_password_secret": "NEO_PW",
        "api_base": "http://127.0.0.1:9", "query_api_base": "http://127.0.0.1:9", "mode": mode, "page_size": page_size,
    }]))
    .unwrap()
    .sources
    .remove(0)
}

fn cfg(s: &SourceConfig) -> &AuraConfig {
    match &s.provider {
        ProviderConfig::Aura(c) => c,
        _ => panic!(),
    }
}

fn creds() -> Credentials {
    let mut c = Credentials::new();
    c.insert("AURA_ID", Secret::new("id"));
    c.insert("AURA_SECRET", Secret::new("secret"));
    c.insert("NEO_PW", Secret::new("pw"));
    c
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn token(ttl: u64) -> HttpResponse {
    HttpResponse::json(200, &json!({"access_token": "tok-1", "expires_in": ttl, "token_type": "bearer"}))
}

fn snapshot(status: &str) -> HttpResponse {
    HttpResponse::json(
        200,
        &json!({"data": {"snapshot_id": "afdb4e9d", "instance_id": "2f49c2b3", "profile": "AdHoc",
        "status": status, "timestamp": "2026-11-23T04:00:10Z", "exportable": true}}),
    )
}

#[test]
fn token_then_snapshot_then_polls_until_completed() {
    let s = source("both", 1000);
    let c = cfg(&s);
    let mut st = AuraState::default();
    assert_eq!(st.advance(c, t(0)), None);
    let req = st.next_request(c, &creds()).unwrap();
    assert_eq!(req.url, "http://127.0.0.1:9/oauth/token");
    assert_eq!(req.header_value("authorization"), Some(format!("Basic {}", STANDARD.encode("id:secret")).as_str()));
    assert_eq!(req.body.as_deref(), Some(&b"grant_type=client_credentials"[..]));
    assert_eq!(st.on_response(c, &token(3600), t(0)).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
    let create = st.next_request(c, &creds()).unwrap();
    assert_eq!(
        (create.method, create.url.as_str()),
        (crate::http::Method::Post, "http://127.0.0.1:9/v1/instances/2f49c2b3/snapshots")
    );
    assert_eq!(create.header_value("authorization"), Some("Bearer tok-1"));
    let created = HttpResponse::json(202, &json!({"data": {"snapshot_id": "afdb4e9d"}}));
    assert_eq!(st.on_response(c, &created, t(1)).unwrap(), Progress::Pending { poll_after: None });
    let poll = st.next_request(c, &creds()).unwrap();
    assert_eq!(poll.url, "http://127.0.0.1:9/v1/instances/2f49c2b3/snapshots/afdb4e9d");
    assert_eq!(st.on_response(c, &snapshot("Pending"), t(2)).unwrap(), Progress::Pending { poll_after: None });
    assert_eq!(st.on_response(c, &snapshot("InProgress"), t(3)).unwrap(), Progress::Pending { poll_after: None });
    let Progress::Ready(files) = st.on_response(c, &snapshot("Completed"), t(4)).unwrap() else { panic!() };
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].origin, Origin::Graph);
    let refs = st.references(c);
    assert_eq!(refs["snapshot"]["snapshot_id"], "afdb4e9d");
    assert_eq!(refs["snapshot"]["status"], "Completed");
    assert_eq!(refs["snapshot"]["timestamp"], "2026-11-23T04:00:10Z");
    assert_eq!(st.token_fetches, 1);
}

#[test]
fn snapshot_only_mode_commits_without_files_and_failed_snapshot_fails() {
    let s = source("snapshot", 1000);
    let c = cfg(&s);
    let mut st = AuraState {
        secret_access_token: Some("tok".into()),
        token_expires_at: Some(t(3600)),
        snapshot_id: Some("afdb4e9d".into()),
        ..Default::default()
    };
    assert_eq!(st.on_response(c, &snapshot("Completed"), t(1)).unwrap(), Progress::Ready(vec![]));
    let Progress::Failed(msg) = st.on_response(c, &snapshot("Failed"), t(1)).unwrap() else { panic!() };
    assert_eq!(msg, "Aura snapshot afdb4e9d of instance 2f49c2b3 failed");
}

#[test]
fn logical_only_mode_needs_no_management_call() {
    let s = source("logical", 1000);
    assert_eq!(AuraState::default().advance(cfg(&s), t(0)).unwrap(), Progress::Ready(AuraState::files(cfg(&s))));
}

#[test]
fn token_is_cached_until_a_minute_before_expiry() {
    let s = source("both", 1000);
    let c = cfg(&s);
    let mut st = AuraState::default();
    st.on_response(c, &token(3600), t(0)).unwrap();
    assert_eq!(st.advance(c, t(3539)), None);
    assert!(st.secret_access_token.is_some(), "still valid for more than a minute");
    st.advance(c, t(3540));
    assert!(st.secret_access_token.is_none(), "refetched shortly before expiry");
}

#[test]
fn expired_token_403_refetches_then_gives_up() {
    let s = source("both", 1000);
    let c = cfg(&s);
    let mut st = AuraState::default();
    st.on_response(c, &token(3600), t(0)).unwrap();
    let expired = HttpResponse::json(403, &json!({"error": "Forbidden"}));
    assert_eq!(st.on_response(c, &expired, t(1)).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
    assert!(st.secret_access_token.is_none());
    st.on_response(c, &token(3600), t(1)).unwrap();
    assert_eq!(st.on_response(c, &expired, t(2)).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
    st.on_response(c, &token(3600), t(2)).unwrap();
    let e = st.on_response(c, &expired, t(3)).unwrap_err();
    assert!(!e.is_retryable());
    assert_eq!(e.message(), "the Aura API refused the token (HTTP 403): Forbidden");
}

#[test]
fn token_and_api_errors_are_classified() {
    let s = source("both", 1000);
    let c = cfg(&s);
    let bad =
        HttpResponse::json(401, &json!({"errors": [{"message": "Invalid credentials", "reason": "unauthorized"}]}));
    let e = AuraState::default().on_response(c, &bad, t(0)).unwrap_err();
    assert_eq!(
        e.message(),
        "the Aura API refused the client credentials (HTTP 401): Invalid credentials (unauthorized)"
    );
    let limited = HttpResponse::json(429, &json!({})).with_header("retry-after", "7");
    let e = AuraState::default().on_response(c, &limited, t(0)).unwrap_err();
    assert_eq!(
        e,
        StepError::Transient {
            message: "the Aura token endpoint answered HTTP 429: {}".into(),
            retry_after: Some(Duration::from_secs(7))
        }
    );
    let mut st = AuraState { secret_access_token: Some("tok".into()), ..Default::default() };
    let missing =
        HttpResponse::json(404, &json!({"errors": [{"message": "DB not found: 2f49c2b3", "reason": "db-not-found"}]}));
    let e = st.on_response(c, &missing, t(0)).unwrap_err();
    assert!(!e.is_retryable() && e.message().contains("DB not found: 2f49c2b3 (db-not-found)"), "{}", e.message());
    assert!(st.on_response(c, &HttpResponse::json(503, &json!({})), t(0)).unwrap_err().is_retryable());
}

fn page(fields: &[&str], rows: Vec<Value>) -> HttpResponse {
    HttpResponse::json(202, &json!({"data": {"fields": fields, "values": rows}, "bookmarks": ["FB:x"]}))
}

fn gunzip_lines(bytes: &[u8]) -> Vec<Value> {
    let mut text = String::new();
    GzDecoder::new(bytes).read_to_string(&mut text).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The digests of a graph file's typed values, folded line by line.
fn digests_of_file(bytes: &[u8]) -> digest::ValueDigests {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes).read_to_string(&mut text).unwrap();
    let mut d = digest::ValueDigests::default();
    for line in text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        let props = line["properties"].as_object().cloned().unwrap_or_default();
        match line["type"].as_str() {
            Some("node") => {
                let labels: Vec<String> =
                    line["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
                d.add_node(&labels, &props);
            }
            Some("relationship") => d.add_relationship(line["rel_type"].as_str().unwrap(), &props),
            _ => {}
        }
    }
    d
}

fn ty(kind: &str, value: Value) -> Value {
    json!({"$type": kind, "_value": value})
}

fn s(v: &str) -> Value {
    ty("String", json!(v))
}

/// A typed node row: id, labels, props (already typed).
fn node_row(id: &str, labels: &[&str], props: Value) -> Value {
    json!([s(id), ty("List", labels.iter().map(|l| s(l)).collect()), ty("Map", props)])
}

fn rel_row(id: &str, t: &str, start: &str, end: &str, props: Value) -> Value {
    json!([s(id), s(t), s(start), s(end), ty("Map", props)])
}

const NODE_FIELDS: [&str; 3] = ["id", "labels", "props"];
const REL_FIELDS: [&str; 5] = ["id", "type", "start", "end", "props"];

fn seek_plan(op: &str) -> HttpResponse {
    HttpResponse::json(
        202,
        &json!({"data": {"fields": NODE_FIELDS, "values": []}, "bookmarks": [],
                "queryPlan": {"operatorType": "ProduceResults@neo4j", "arguments": {}, "identifiers": ["n"],
                   "children": [{"operatorType": format!("{op}@neo4j"), "arguments": {}, "identifiers": ["n"], "children": []}]}}),
    )
}

fn max(n: Option<u64>) -> HttpResponse {
    let v = n.map_or(json!({"$type": "Null", "_value": null}), typed_integer);
    page(&["max"], vec![json!([v])])
}

fn request_body(req: &HttpRequest) -> Value {
    serde_json::from_slice(req.body.as_deref().unwrap()).unwrap()
}

/// Node ids 0..=2 and relationship ids 0..=0, pages of 2 ids: the answers in order.
fn small_graph_answers() -> Vec<HttpResponse> {
    vec![
        seek_plan("NodeByIdSeek"),
        max(Some(2)),
        page(
            &NODE_FIELDS,
            vec![node_row("4:a:0", &["Person"], json!({"name": s("Ada")})), node_row("4:a:1", &[], json!({}))],
        ),
        page(
            &NODE_FIELDS,
            vec![node_row(
                "4:a:2",
                &["City", "Capital"],
                json!({"name": s("Paris"), "pop": ty("Float", json!("2.1"))}),
            )],
        ),
        seek_plan("DirectedRelationshipByIdSeek"),
        max(Some(0)),
        page(
            &REL_FIELDS,
            vec![rel_row("5:a:0", "LIVES_IN", "4:a:0", "4:a:2", json!({"since": ty("Integer", json!("2020"))}))],
        ),
    ]
}

#[test]
fn graph_export_explains_then_pages_id_ranges_up_to_the_highest_id_in_typed_json() {
    let src = source("logical", 2);
    let spec = GraphExport::for_config(cfg(&src), &creds(), t(100)).unwrap();
    assert!(!format!("{spec:?}").contains("pw"), "no password in Debug");
    let mut w = spec.start();
    let mut out = Vec::new();
    let expected = [
        (format!("EXPLAIN {NODES_QUERY}"), json!({"from": typed_integer(0), "to": typed_integer(1)})),
        (MAX_NODE_ID.to_string(), json!({})),
        (NODES_QUERY.to_string(), json!({"from": typed_integer(0), "to": typed_integer(1)})),
        (NODES_QUERY.to_string(), json!({"from": typed_integer(2), "to": typed_integer(2)})),
        (format!("EXPLAIN {RELATIONSHIPS_QUERY}"), json!({"from": typed_integer(0), "to": typed_integer(1)})),
        (MAX_RELATIONSHIP_ID.to_string(), json!({})),
        (RELATIONSHIPS_QUERY.to_string(), json!({"from": typed_integer(0), "to": typed_integer(0)})),
    ];
    for (answer, (statement, parameters)) in small_graph_answers().iter().zip(expected) {
        let req = w.next_request().unwrap();
        assert_eq!(req.url, "http://127.0.0.1:9/db/neo4j/query/v2");
        assert_eq!(req.header_value("authorization"), Some(format!("Basic {}", STANDARD.encode("neo4j:pw")).as_str()));
        assert_eq!(req.header_value("content-type"), Some(TYPED_JSON), "typed parameters");
        assert_eq!(req.header_value("accept"), Some(TYPED_JSON), "typed results");
        let body = request_body(&req);
        assert_eq!((body["statement"].as_str().unwrap(), &body["parameters"]), (statement.as_str(), &parameters));
        w.on_response(answer, t(101)).unwrap();
        out.extend(w.take_output());
    }
    assert!(w.next_request().is_none());
    assert!(w.warnings().is_empty(), "seeks warn nothing");
    let (rest, mut details) = w.finish().unwrap();
    out.extend(rest);
    let values = details.as_object_mut().unwrap().remove("values").expect("the typed values' digests");
    assert_eq!(values, serde_json::to_value(digests_of_file(&out)).unwrap(), "digests of exactly what was written");
    assert_eq!(
        details,
        json!({"format": "ferry-neo4j-jsonl", "nodes": 3, "relationships": 1,
               "labels": {"Person": 1, "City": 1, "Capital": 1}, "types": {"LIVES_IN": 1}})
    );
    let lines = gunzip_lines(&out);
    assert_eq!(lines.len(), 6);
    assert_eq!(
        (&lines[0]["type"], &lines[0]["version"], &lines[0]["values"]),
        (&json!("header"), &json!(2), &json!("typed-json"))
    );
    assert_eq!(lines[0]["exported_at"], "1970-01-01T00:01:40.000Z");
    assert_eq!(
        lines[1],
        json!({"type": "node", "id": "4:a:0", "labels": ["Person"], "properties": {"name": s("Ada")}})
    );
    assert_eq!(lines[3]["labels"], json!(["City", "Capital"]));
    assert_eq!(
        lines[4],
        json!({"type": "relationship", "id": "5:a:0", "rel_type": "LIVES_IN", "start": "4:a:0", "end": "4:a:2",
               "properties": {"since": ty("Integer", json!("2020"))}})
    );
    assert_eq!(lines[5], json!({"type": "footer", "nodes": 3, "relationships": 1}));
}

#[test]
fn an_empty_graph_asks_the_highest_id_and_pages_nothing() {
    let src = source("logical", 2);
    let mut w = GraphExport::for_config(cfg(&src), &creds(), t(0)).unwrap().start();
    for answer in [seek_plan("NodeByIdSeek"), max(None), seek_plan("DirectedRelationshipByIdSeek"), max(None)] {
        w.next_request().unwrap();
        w.on_response(&answer, t(0)).unwrap();
    }
    assert!(w.next_request().is_none());
    assert_eq!(w.finish().unwrap().1["nodes"], 0);
}

#[test]
fn a_paging_plan_that_scans_and_sorts_becomes_one_warning_naming_the_operators() {
    let src = source("logical", 2);
    let mut w = GraphExport::for_config(cfg(&src), &creds(), t(0)).unwrap().start();
    let scan = HttpResponse::json(
        202,
        &json!({"data": {"fields": [], "values": []}, "queryPlan": {"operatorType": "ProduceResults@neo4j",
            "children": [{"operatorType": "Top@neo4j", "children": [{"operatorType": "Filter@neo4j",
                "children": [{"operatorType": "AllNodesScan@neo4j", "children": []}]}]}]}}),
    );
    w.next_request().unwrap();
    w.on_response(&scan, t(0)).unwrap();
    let warning = &w.warnings()[0];
    assert!(
        warning.contains("node page statement") && warning.contains("AllNodesScan") && warning.contains("Top"),
        "{warning}"
    );
    assert!(warning.contains("square"), "{warning}");
    let cursor: GraphCursor = serde_json::from_str(&serde_json::to_string(&w.cursor()).unwrap()).unwrap();
    assert_eq!(cursor.warnings.len(), 1, "the warning goes with the cursor to the job");
    assert!(plan_warning(&json!({"queryPlan": {"operatorType": "NodeByIdSeek@neo4j"}}), "node").is_none());
    assert!(plan_warning(&json!({}), "node").is_none(), "no plan, no claim");
}

#[test]
fn typed_values_are_written_exactly_as_the_query_api_typed_them() {
    let src = source("logical", 10);
    let mut w = GraphExport::for_config(cfg(&src), &creds(), t(0)).unwrap().start();
    for answer in [seek_plan("NodeByIdSeek"), max(Some(0))] {
        w.next_request().unwrap();
        w.on_response(&answer, t(0)).unwrap();
    }
    let props = json!({
        "d": ty("Date", json!("2015-03-26")), "z": ty("ZonedDateTime", json!("2015-11-21T21:40:32.142+01:00[Europe/Berlin]")),
        "o": ty("OffsetDateTime", json!("2024-01-01T21:40:32-01:00")), "p": ty("Point", json!("SRID=4979;POINT Z (1.0 2.0 3.0)")),
        "b": ty("Base64", json!("A2+/")), "big": ty("Integer", json!("9007199254740993")), "nan": ty("Float", json!("NaN")),
        "l": ty("List", json!([ty("Duration", json!("P14DT16H12M"))])),
    });
    w.next_request().unwrap();
    w.on_response(&page(&NODE_FIELDS, vec![node_row("4:a:0", &["V"], props.clone())]), t(0)).unwrap();
    let mut out = w.take_output();
    out.extend(w.finish().unwrap().0);
    assert_eq!(gunzip_lines(&out)[1]["properties"], props);
    // A plain value where a typed one belongs is a malformed answer, not a silent string.
    let mut w = GraphExport::for_config(cfg(&src), &creds(), t(0)).unwrap().start();
    for answer in [seek_plan("NodeByIdSeek"), max(Some(0))] {
        w.next_request().unwrap();
        w.on_response(&answer, t(0)).unwrap();
    }
    let plain = page(&NODE_FIELDS, vec![json!(["4:a:0", ["V"], {"d": "2015-03-26"}])]);
    assert!(w.on_response(&plain, t(0)).unwrap_err().message().contains("malformed"));
}

#[test]
fn query_api_errors_are_failures_whatever_the_status() {
    let auth = HttpResponse::json(
        401,
        &json!({"errors": [{"code": "Neo.ClientError.Security.Unauthorized", "message": "The client is unauthorized"}]}),
    );
    let e = query_rows(&auth, t(0)).unwrap_err();
    assert!(!e.is_retryable() && e.message().contains("db_password_secret"));
    let syntax = HttpResponse::json(
        202,
        &json!({"errors": [{"code": "Neo.ClientError.Statement.SyntaxError", "message": "Invalid input"}]}),
    );
    assert!(!query_rows(&syntax, t(0)).unwrap_err().is_retryable());
    let transient = HttpResponse::json(
        202,
        &json!({"errors": [{"code": "Neo.TransientError.General.DatabaseUnavailable", "message": "busy"}]}),
    );
    assert!(query_rows(&transient, t(0)).unwrap_err().is_retryable());
    let html = HttpResponse { status: 200, headers: vec![], body: b"<html>502 Bad Gateway</html>".to_vec() };
    assert!(query_rows(&html, t(0)).unwrap_err().message().contains("malformed"));
}

#[test]
fn an_export_begun_by_element_id_paging_goes_on_that_way_in_plain_json() {
    // A format 1 cursor persisted before this version: started, no id range.
    let cursor =
        GraphCursor { phase: "nodes".into(), after: "4:a:2".into(), nodes: 2, started: true, ..GraphCursor::default() };
    let src = source("logical", 10);
    let mut w = GraphExport::for_config(cfg(&src), &creds(), t(0)).unwrap().resume(Some(&cursor));
    let req = w.next_request().unwrap();
    assert_eq!(req.header_value("content-type"), Some("application/json"));
    let body = request_body(&req);
    assert_eq!(body["statement"], LEGACY_NODES_QUERY);
    assert_eq!(body["parameters"], json!({"after": "4:a:2", "limit": 10}));
    // serde_json's default float parser can be off by one ulp; the export must not be.
    let raw = br#"{"data":{"fields":["id","labels","props"],"values":[["4:a:3",["City"],{"lon":94.89924441094519,"big":9007199254740993,"tiny":5e-324}]]},"bookmarks":[]}"#;
    w.on_response(&HttpResponse { status: 202, headers: vec![], body: raw.to_vec() }, t(0)).unwrap();
    assert_eq!(w.cursor().id_range, None, "it stays a format 1 export");
    let req = w.next_request().unwrap();
    assert_eq!(request_body(&req)["statement"], LEGACY_RELATIONSHIPS_QUERY, "a short page ends the phase");
    let mut out = w.take_output();
    out.extend(w.finish().unwrap().0);
    let mut text = String::new();
    GzDecoder::new(&out[..]).read_to_string(&mut text).unwrap();
    let node = text.lines().next().unwrap();
    assert!(
        node.contains("94.89924441094519") && node.contains("9007199254740993") && node.contains("5e-324"),
        "{node}"
    );
}

#[test]
fn a_sliced_graph_export_is_concatenated_gzip_members_with_the_same_lines() {
    let src = source("logical", 2);
    let spec = GraphExport::for_config(cfg(&src), &creds(), t(100)).unwrap();
    let answers = small_graph_answers();
    // Whole, in one writer.
    let mut whole = spec.start();
    let mut one = Vec::new();
    for a in &answers {
        whole.next_request().unwrap();
        whole.on_response(a, t(101)).unwrap();
        one.extend(whole.take_output());
    }
    one.extend(whole.finish().unwrap().0);
    // One request per slice, the cursor persisted as JSON between slices.
    let mut sliced = Vec::new();
    let mut cursor: Option<GraphCursor> = None;
    let mut asked = Vec::new();
    for a in &answers {
        let mut w = spec.resume(cursor.as_ref());
        asked.push(request_body(&w.next_request().unwrap()));
        w.on_response(a, t(101)).unwrap();
        sliced.extend(w.take_output());
        let (rest, next) = w.end_member().unwrap();
        sliced.extend(rest);
        cursor = Some(serde_json::from_str(&serde_json::to_string(&next).unwrap()).unwrap());
    }
    assert_eq!(
        asked.iter().filter(|b| b["statement"].as_str().unwrap().starts_with("EXPLAIN")).count(),
        2,
        "one plan per phase"
    );
    let w = spec.resume(cursor.as_ref());
    assert!(w.next_request().is_none(), "every page was read");
    let (rest, mut details) = w.finish().unwrap();
    sliced.extend(rest);
    let values = details.as_object_mut().unwrap().remove("values").expect("the typed values' digests");
    assert_eq!(values, serde_json::to_value(digests_of_file(&sliced)).unwrap(), "digests went across slices");
    assert_eq!(
        details,
        json!({"format": "ferry-neo4j-jsonl", "nodes": 3, "relationships": 1,
               "labels": {"Person": 1, "City": 1, "Capital": 1}, "types": {"LIVES_IN": 1}}),
        "the per-label and per-type counts went across slices with the cursor"
    );
    let read_all = |bytes: &[u8]| {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(bytes).read_to_string(&mut text).unwrap();
        text
    };
    assert_eq!(read_all(&sliced), read_all(&one));
    assert_eq!(read_all(&sliced).lines().count(), 6, "one header, four elements, one footer");
}

#[test]
fn a_page_over_the_response_cap_halves_the_id_range_and_remembers_it() {
    let src = source("logical", 1000);
    let spec = GraphExport::for_config(cfg(&src), &creds(), t(100)).unwrap();
    let mut w = spec.start();
    for answer in [seek_plan("NodeByIdSeek"), max(Some(1_000_000))] {
        w.next_request().unwrap();
        w.on_response(&answer, t(0)).unwrap();
    }
    let range = |w: &GraphWriter| {
        let p = request_body(&w.next_request().unwrap())["parameters"].clone();
        let n = |k: &str| p[k]["_value"].as_str().unwrap().parse::<u64>().unwrap();
        (n("from"), n("to"))
    };
    assert_eq!(range(&w), (0, 999));
    assert_eq!(w.shrink_page("the answer is larger than 4194304 bytes").unwrap(), 500);
    assert_eq!(range(&w), (0, 499), "the same page is asked again, smaller");
    let cursor: GraphCursor = serde_json::from_str(&serde_json::to_string(&w.cursor()).unwrap()).unwrap();
    assert_eq!(range(&spec.resume(Some(&cursor))), (0, 499), "later slices keep the lowered size");
    let mut tiny = spec.resume(Some(&GraphCursor { page_size: Some(1), ..cursor }));
    let err = tiny.shrink_page("the answer is larger than 4194304 bytes").unwrap_err();
    assert!(!err.is_retryable() && err.message().contains("page_size"), "{}", err.message());
}

fn listed(items: Value) -> HttpResponse {
    HttpResponse::json(200, &json!({ "data": items }))
}

/// A state whose token is fresh and whose snapshot POST went unanswered at `at`.
fn unanswered_at(c: &AuraConfig, at: Timestamp) -> AuraState {
    let mut st = AuraState::default();
    st.on_response(c, &token(3600), at).unwrap();
    assert!(st.create_unanswered(at).unwrap().contains("checked before another is requested"));
    st
}

#[test]
fn an_unanswered_snapshot_post_is_looked_up_and_adopted_instead_of_taken_twice() {
    let s = source("snapshot", 1000);
    let c = cfg(&s);
    let at = Timestamp::parse_rfc3339("2026-11-23T04:00:05Z").unwrap();
    let mut st = unanswered_at(c, at);
    let find = st.next_request(c, &creds()).unwrap();
    assert_eq!(find.method, crate::http::Method::Get, "no second POST");
    assert_eq!(find.url, "http://127.0.0.1:9/v1/instances/2f49c2b3/snapshots?date=2026-11-23");
    assert_eq!(find.header_value("authorization"), Some("Bearer tok-1"));
    let list = listed(json!([
        {"snapshot_id": "old-daily", "profile": "Scheduled", "status": "Completed", "timestamp": "2026-11-23T04:00:20Z"},
        {"snapshot_id": "yesterday", "profile": "AdHoc", "status": "Completed", "timestamp": "2026-11-23T03:00:00Z"},
        {"snapshot_id": "ours", "profile": "AdHoc", "status": "InProgress", "timestamp": "2026-11-23T04:00:06Z"},
    ]));
    assert_eq!(st.on_response(c, &list, at).unwrap(), Progress::Again, "a look-up is not progress");
    assert_eq!(st.snapshot_id.as_deref(), Some("ours"));
    let poll = st.next_request(c, &creds()).unwrap();
    assert_eq!(poll.url, "http://127.0.0.1:9/v1/instances/2f49c2b3/snapshots/ours");
    assert_eq!(st.references(c)["snapshot"]["origin"], "found after an unanswered request");
}

#[test]
fn when_no_snapshot_was_taken_the_lookup_leads_to_one_new_request() {
    let s = source("snapshot", 1000);
    let c = cfg(&s);
    let at = Timestamp::parse_rfc3339("2026-11-23T04:00:05Z").unwrap();
    let mut st = unanswered_at(c, at);
    let stale = listed(json!([
        {"snapshot_id": "early", "profile": "AdHoc", "status": "Completed", "timestamp": "2026-11-23T01:00:00Z"}
    ]));
    st.on_response(c, &stale, at).unwrap();
    assert_eq!(st.snapshot_id, None);
    let create = st.next_request(c, &creds()).unwrap();
    assert_eq!(
        (create.method, create.url.as_str()),
        (crate::http::Method::Post, "http://127.0.0.1:9/v1/instances/2f49c2b3/snapshots")
    );
    // Not a create: an unanswered poll or token request asks nothing of the list.
    st.snapshot_id = Some("x".into());
    assert_eq!(st.create_unanswered(at), None);
    let bad = listed(json!("not a list"));
    let mut st = unanswered_at(c, at);
    assert!(st.on_response(c, &bad, at).is_err(), "a malformed list is an error, never a panic");
}

fn whole_tenant(extra: Value) -> SourceConfig {
    let mut v = json!({
        "name": "tenant", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "prod-*", "tenant_id": "t-1",
        "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET", "db_password_secret_prefix": "NEO_PW_",
        "api_base": "http://127.0.0.1:9",
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    Config::from_value(&json!([v])).unwrap().sources.remove(0)
}

#[test]
fn a_whole_tenant_source_lists_the_tenants_instances_and_spawns_one_job_per_matching_instance() {
    let s = whole_tenant(json!({}));
    let c = cfg(&s);
    assert!(s.provider.whole_account());
    let mut st = AuraState::default();
    assert_eq!(st.advance(c, t(0)), None, "the discovery copies nothing itself");
    st.on_response(c, &token(3600), t(0)).unwrap();
    let list = st.next_request(c, &creds()).unwrap();
    assert_eq!(
        (list.method, list.url.as_str()),
        (crate::http::Method::Get, "http://127.0.0.1:9/v1/instances?tenantId=t-1")
    );
    let answer = HttpResponse::json(
        200,
        &json!({"data": [
            {"id": "AAAA0001", "name": "prod-orders", "tenant_id": "t-1", "cloud_provider": "gcp"},
            {"id": "aaaa0002", "name": "staging", "tenant_id": "t-1", "cloud_provider": "gcp"},
            {"id": "aaaa0003", "name": "prod-users", "tenant_id": "t-1", "cloud_provider": "aws"},
            {"id": "aaaa0004", "name": "prod-elsewhere", "tenant_id": "t-2", "cloud_provider": "aws"}
        ]}),
    );
    let Progress::Spawn(children) = st.on_response(c, &answer, t(1)).unwrap() else { panic!("spawns") };
    let members: Vec<String> = children.iter().filter_map(crate::providers::ProviderState::member).collect();
    assert_eq!(members, ["aaaa0001", "aaaa0003"], "by id, the tenant's instances whose names match");
    let crate::providers::ProviderState::Aura(child) = &children[1] else { panic!() };
    // The child starts with the discovery's token, snapshots its own instance and exports its own
    // Query API with its own password.
    let snap = child.next_request(c, &creds()).unwrap();
    assert_eq!(snap.url, "http://127.0.0.1:9/v1/instances/aaaa0003/snapshots");
    assert_eq!(snap.header_value("authorization"), Some("Bearer tok-1"));
    let mut with_pw = creds();
    with_pw.insert("NEO_PW_AAAA0003", Secret::new("pw-3"));
    let state = crate::providers::ProviderState::Aura(child.clone());
    let export = state.graph_export(&s.provider, &with_pw, t(2)).unwrap();
    assert_eq!(
        format!("{export:?}"),
        "GraphExport { url: \"https://aaaa0003.databases.neo4j.io/db/neo4j/query/v2\", database: \"neo4j\", .. }"
    );
    let missing = state.graph_export(&s.provider, &creds(), t(2)).unwrap_err();
    assert!(missing.to_string().contains("NEO_PW_AAAA0003"), "{missing}");
    assert_eq!(state.member_secret_names(&s.provider), ["NEO_PW_AAAA0003"], "read for this job only");
    let refs = child.references(c);
    assert_eq!(refs["instance_id"], "aaaa0003");
    assert_eq!(member_of(&refs).as_deref(), Some("aaaa0003"));
    assert_eq!(member_of(&AuraState::default().references(cfg(&source("both", 10)))), None);
}

#[test]
fn a_whole_tenant_source_needs_its_tenant_and_a_password_prefix_and_takes_no_drill() {
    let err = |extra: Value| {
        let mut v = json!({
            "name": "tenant", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "*",
            "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET",
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        Config::from_value(&json!([v])).unwrap_err().to_string()
    };
    assert!(err(json!({"db_password_secret_prefix": "P_"})).contains("\"tenant_id\""));
    assert!(err(json!({"tenant_id": "t"})).contains("\"db_password_secret_prefix\""));
    assert!(err(json!({"tenant_id": "t", "db_password_secret": "PW"})).contains("\"db_password_secret\""));
    assert!(err(json!({"tenant_id": "t", "mode": "snapshot", "drill_database": "d"})).contains("no drill settings"));
    let ok = whole_tenant(json!({"mode": "snapshot", "db_password_secret_prefix": null}));
    assert!(cfg(&ok).whole_tenant());
    let one = err(json!({"instance_id": "2f49c2b3", "tenant_id": "t", "db_password_secret": "PW"}));
    assert!(one.contains("\"tenant_id\"") && one.contains("whole-tenant mode only"), "{one}");
}

#[test]
fn a_whole_tenant_source_whose_pattern_matches_nothing_skips_naming_it() {
    let s = whole_tenant(json!({}));
    let c = cfg(&s);
    let mut st = AuraState::default();
    st.on_response(c, &token(3600), t(0)).unwrap();
    let none = HttpResponse::json(200, &json!({"data": [{"id": "aaaa0002", "name": "staging", "tenant_id": "t-1"}]}));
    assert_eq!(
        st.on_response(c, &none, t(1)).unwrap(),
        Progress::Skip("no instance of tenant t-1 matches \"prod-*\"".into())
    );
}

#[test]
fn ferrys_own_drill_instances_are_never_members_of_a_whole_tenant() {
    let s = whole_tenant(json!({"instance_id": "*"}));
    let c = cfg(&s);
    let mut st = AuraState::default();
    st.on_response(c, &token(3600), t(0)).unwrap();
    let list = HttpResponse::json(
        200,
        &json!({"data": [{"id": "aaaa0001", "name": "orders", "tenant_id": "t-1"},
                         {"id": "aaaa0009", "name": "ferry-drill-0123456789abcdef", "tenant_id": "t-1"}]}),
    );
    let Progress::Spawn(children) = st.on_response(c, &list, t(1)).unwrap() else { panic!("spawns") };
    let members: Vec<String> = children.iter().filter_map(crate::providers::ProviderState::member).collect();
    assert_eq!(members, ["aaaa0001"]);
}
