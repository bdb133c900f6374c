use super::*;
use crate::encryption::{decrypt, Identity};

fn identity() -> Identity {
    Identity::from_secret_bytes([7u8; 32])
}

fn envelope_for(identity: &Identity) -> Envelope {
    let random: Vec<u8> = (0..random_len(1) as u32).map(|i| (i * 31 + 5) as u8).collect();
    envelope(&[identity.to_recipient()], &random).unwrap()
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// A server holding `data`: answers a page request as a range server does.
fn serve(data: &[u8], req: &HttpRequest, etag: &str) -> HttpResponse {
    let range = req.header_value("range").unwrap();
    let (from, to) = range.trim_start_matches("bytes=").split_once('-').unwrap();
    let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
    if from >= data.len() {
        return HttpResponse {
            status: 416,
            headers: vec![("content-range".into(), format!("bytes */{}", data.len()))],
            body: vec![],
        };
    }
    let end = to.min(data.len() - 1);
    HttpResponse {
        status: 206,
        headers: vec![
            ("content-range".into(), format!("bytes {from}-{end}/{}", data.len())),
            ("etag".into(), etag.into()),
        ],
        body: data[from..=end].to_vec(),
    }
}

fn state() -> CopyState {
    CopyState::new("src/f/dump.sql.age".into(), 0, Timestamp::from_secs(0))
}

/// Copies `data` encrypted, `pages` pages per slice, each slice resumed from the previous one's
/// cursor (through JSON, as the job record holds it); returns the file and its details.
fn sealed_copy(data: &[u8], page: u64, pages_per_slice: usize, tally: bool) -> (Vec<u8>, Value, usize) {
    let id = identity();
    let env = envelope_for(&id);
    let mut state = state();
    let mut file = Vec::new();
    let mut slices = 0;
    loop {
        slices += 1;
        let cursor: Option<SealCursor> = state.cursor_as().unwrap();
        let fresh = cursor.is_none();
        let mut g =
            Sealed::new(Plain::Download(HttpRequest::get("https://x/dump.sql")), fresh.then_some(&env), cursor, tally)
                .unwrap();
        if fresh {
            g.page = page;
        }
        let mut pages = 0;
        while let Some(req) = g.next_request() {
            if pages == pages_per_slice {
                break;
            }
            if pages > 0 || !fresh {
                assert!(req.header_value("if-range").is_some(), "later pages carry If-Range");
            }
            g.on_response(&serve(data, &req, "\"v1\""), Timestamp::from_secs(1)).unwrap();
            file.extend(g.take_output());
            pages += 1;
        }
        if g.next_request().is_none() {
            let (rest, details) = Box::new(g).finish().unwrap();
            file.extend(rest);
            return (file, details, slices);
        }
        let rest = Box::new(g).end_slice(&mut state).unwrap();
        file.extend(rest);
        let text = serde_json::to_string(&state).unwrap();
        assert!(!text.contains(&hex::encode(&data[..data.len().min(16)])) || data.len() < 16);
        state = serde_json::from_str(&text).unwrap();
    }
}

#[test]
fn a_download_encrypted_across_slices_is_one_age_file_of_the_plaintext() {
    for (len, page, per_slice) in [
        (0usize, 65_536u64, 1usize),
        (1, 65_536, 1),
        (65_536, 65_536, 1),
        (65_537, 65_536, 1),
        (300_001, 65_536, 2),
        (300_001, 100_000, 1),
        (1_000_000, 262_144, 3),
    ] {
        let data = plaintext(len);
        let (file, details, slices) = sealed_copy(&data, page, per_slice, false);
        assert_eq!(decrypt(&[identity()], &file).unwrap(), data, "len {len}, page {page}, {slices} slices");
        assert_eq!(details["encryption"]["plaintext"]["size"], json!(len));
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
        assert_eq!(details["encryption"]["plaintext"]["sha256"], json!(sha));
        assert_eq!(details["encryption"]["format"], "age-v1");
        if len > 200_000 {
            assert!(slices > 1, "the copy was cut into slices");
        }
    }
}

#[test]
fn a_sql_dumps_md5_and_row_counts_are_of_its_plaintext() {
    let dump = b"PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE t (a);\nINSERT INTO \"t\" VALUES(1);\nINSERT INTO \"t\" VALUES(2);\n".repeat(3000);
    let (file, details, _) = sealed_copy(&dump, 65_536, 1, true);
    assert_eq!(decrypt(&[identity()], &file).unwrap(), dump);
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&dump));
    assert_eq!(details["encryption"]["plaintext"]["md5"], json!(md5));
    assert_eq!(details["encryption"]["plaintext"]["row_counts"]["t"], json!(6000));
}

#[test]
fn the_key_and_plaintext_in_the_cursor_are_secret_fields_and_never_print() {
    let data = plaintext(200_000);
    let id = identity();
    let env = envelope_for(&id);
    let mut g = Sealed::new(Plain::Download(HttpRequest::get("https://x/f")), Some(&env), None, false).unwrap();
    let req = g.next_request().unwrap();
    g.on_response(&serve(&data, &req, "\"v1\""), Timestamp::from_secs(1)).unwrap();
    let mut state = state();
    Box::new(g).end_slice(&mut state).unwrap();
    let cursor = state.cursor.clone().unwrap();
    let keys: Vec<&String> = cursor["encryptor"].as_object().unwrap().keys().collect();
    assert!(
        keys.iter().any(|k| k.as_str() == "secret_payload_key")
            && keys.iter().any(|k| k.as_str() == "secret_plaintext")
    );
    let shown = crate::providers::redact(serde_json::to_value(&state).unwrap());
    assert!(shown["cursor"]["encryptor"].get("secret_payload_key").is_none(), "redacted from everything shown");
    let cursor: SealCursor = state.cursor_as().unwrap().unwrap();
    assert!(!format!("{cursor:?}").contains(&hex::encode(&data[..8])));
}

#[test]
fn a_download_that_changes_or_drops_ranges_mid_copy_fails_for_good() {
    let data = plaintext(300_000);
    let env = envelope_for(&identity());
    let mut g = Sealed::new(Plain::Download(HttpRequest::get("https://x/f")), Some(&env), None, false).unwrap();
    g.page = 100_000;
    let req = g.next_request().unwrap();
    g.on_response(&serve(&data, &req, "\"v1\""), Timestamp::from_secs(1)).unwrap();
    let req = g.next_request().unwrap();
    assert_eq!(req.header_value("range"), Some("bytes=100000-199999"));
    assert_eq!(req.header_value("if-range"), Some("\"v1\""));
    let e = g.on_response(&serve(&data, &req, "\"v2\""), Timestamp::from_secs(1)).unwrap_err();
    assert!(!e.is_retryable() && e.to_string().contains("ETag changed"), "{e}");
    let whole = HttpResponse { status: 200, headers: vec![], body: data.clone() };
    let e = g.on_response(&whole, Timestamp::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("whole object"), "{e}");
    let e = g
        .on_response(&HttpResponse { status: 503, headers: vec![], body: b"busy".to_vec() }, Timestamp::from_secs(1))
        .unwrap_err();
    assert!(e.is_retryable(), "a 503 is tried again: {e}");
}

#[test]
fn a_server_without_ranges_is_read_whole_from_the_start() {
    let data = plaintext(5000);
    let env = envelope_for(&identity());
    let mut g = Sealed::new(Plain::Download(HttpRequest::get("https://x/f")), Some(&env), None, false).unwrap();
    let _ = g.next_request().unwrap();
    g.on_response(&HttpResponse { status: 200, headers: vec![], body: data.clone() }, Timestamp::from_secs(1)).unwrap();
    assert!(g.next_request().is_none());
    let mut file = g.take_output();
    let (rest, _) = Box::new(g).finish().unwrap();
    file.extend(rest);
    assert_eq!(decrypt(&[identity()], &file).unwrap(), data);
}

/// A generated file of `n` pages of 50,000 bytes each, with a cursor.
struct Pages {
    at: u32,
    n: u32,
    out: Vec<u8>,
}

impl Generator for Pages {
    fn next_request(&self) -> Option<HttpRequest> {
        (self.at < self.n).then(|| HttpRequest::get(format!("https://api/page/{}", self.at)))
    }
    fn on_response(&mut self, _resp: &HttpResponse, _now: Timestamp) -> Result<(), StepError> {
        self.out.extend(plaintext(50_000).iter().map(|b| b.wrapping_add(self.at as u8)));
        self.at += 1;
        Ok(())
    }
    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
    fn shrink_page(&mut self, _why: &str) -> Result<u32, StepError> {
        Ok(1)
    }
    fn end_slice(mut self: Box<Self>, state: &mut CopyState) -> Result<Vec<u8>, StepError> {
        state.set_cursor(&self.at)?;
        state.warnings = vec!["inner warning".into()];
        Ok(self.take_output())
    }
    fn finish(mut self: Box<Self>) -> Result<(Vec<u8>, Value), StepError> {
        Ok((self.take_output(), json!({"nodes": self.n})))
    }
}

#[test]
fn a_generated_file_is_encrypted_across_slices_keeping_its_cursor_warnings_and_details() {
    let id = identity();
    let env = envelope_for(&id);
    let mut state = state();
    let mut file = Vec::new();
    let expected: Vec<u8> =
        (0..7u32).flat_map(|at| plaintext(50_000).into_iter().map(move |b| b.wrapping_add(at as u8))).collect();
    loop {
        let cursor: Option<SealCursor> = state.cursor_as().unwrap();
        let at = cursor
            .as_ref()
            .and_then(|c| c.inner.clone())
            .map(|v| serde_json::from_value::<u32>(v).unwrap())
            .unwrap_or(0);
        let inner = Box::new(Pages { at, n: 7, out: Vec::new() });
        let fresh = cursor.is_none();
        let mut g = Sealed::new(Plain::Generated(inner), fresh.then_some(&env), cursor, false).unwrap();
        for _ in 0..2 {
            let Some(req) = g.next_request() else { break };
            g.on_response(
                &HttpResponse { status: 200, headers: vec![], body: req.url.into_bytes() },
                Timestamp::from_secs(1),
            )
            .unwrap();
            file.extend(g.take_output());
        }
        if g.next_request().is_none() {
            let (rest, details) = Box::new(g).finish().unwrap();
            file.extend(rest);
            assert_eq!(details["nodes"], 7, "the inner generator's details are kept");
            assert_eq!(details["encryption"]["plaintext"]["size"], json!(expected.len()));
            break;
        }
        file.extend(Box::new(g).end_slice(&mut state).unwrap());
        assert_eq!(state.warnings, ["inner warning"]);
    }
    assert_eq!(decrypt(&[id], &file).unwrap(), expected);
}

#[test]
fn an_expired_signed_url_is_told_apart_from_other_refusals() {
    let env = envelope_for(&identity());
    let g = Sealed::new(Plain::Download(HttpRequest::get("https://x/f")), Some(&env), None, false).unwrap();
    let expired = HttpResponse {
        status: 403,
        headers: vec![],
        body: b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>".to_vec(),
    };
    assert!(g.expired(&expired).unwrap().contains("Request has expired"));
    let busy = HttpResponse { status: 503, headers: vec![], body: b"busy".to_vec() };
    assert_eq!(g.expired(&busy), None);
    let authed = HttpRequest::get("https://x/f").header("authorization", "Bearer t");
    let g = Sealed::new(Plain::Download(authed), Some(&env), None, false).unwrap();
    assert_eq!(g.expired(&expired), None, "a download with credentials has no signed URL to renew");
}

#[test]
fn a_range_server_that_gives_no_total_ends_at_the_first_short_page() {
    let data = plaintext(150_000);
    let env = envelope_for(&identity());
    let mut g = Sealed::new(Plain::Download(HttpRequest::get("https://x/f")), Some(&env), None, false).unwrap();
    g.page = 100_000;
    let mut file = Vec::new();
    while let Some(req) = g.next_request() {
        let mut resp = serve(&data, &req, "\"v1\"");
        let range = resp.header("content-range").unwrap().rsplit_once('/').unwrap().0.to_string();
        resp.headers[0].1 = format!("{range}/*");
        g.on_response(&resp, Timestamp::from_secs(1)).unwrap();
        file.extend(g.take_output());
    }
    let (rest, _) = Box::new(g).finish().unwrap();
    file.extend(rest);
    assert_eq!(decrypt(&[identity()], &file).unwrap(), data);
}

#[test]
fn a_login_page_served_for_a_dump_is_refused_before_anything_is_encrypted() {
    let env = envelope_for(&identity());
    let mut g = Sealed::new(Plain::Download(HttpRequest::get("https://x/d.sql")), Some(&env), None, true)
        .unwrap()
        .checking_start("d.sql");
    let page = b"<!DOCTYPE html><html><body>Sign in</body></html>".to_vec();
    let e =
        g.on_response(&HttpResponse { status: 200, headers: vec![], body: page }, Timestamp::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("HTML page"), "{e}");
    assert!(g.take_output().is_empty(), "nothing was encrypted");
}
