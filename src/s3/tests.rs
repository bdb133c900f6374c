use serde_json::json;

use super::*;

/// 2013-05-24T00:00:00Z, the date of AWS's published examples.
const AWS_EXAMPLE_TIME: Timestamp = Timestamp::from_millis(1_369_353_600_000);

/// 2026-11-23T10:15:00Z.
const NOW: Timestamp = Timestamp::from_millis(1_795_428_900_000);

/// The key pair of AWS's S3 signing examples (sig-v4-header-based-auth.html). Note the published
/// secret key has no '/' before `EXAMPLEKEY`.
const AWS_EXAMPLE_KEYS: &str = "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

fn config(v: serde_json::Value) -> S3Config {
    S3Config::from_value(&v).unwrap()
}

fn aws_example_bucket() -> S3Config {
    config(json!({
        "endpoint": "https://s3.amazonaws.com", "region": "us-east-1", "bucket": "examplebucket",
        "credentials_secret": "KEYS", "addressing": "virtual",
    }))
}

fn aws_example_keys() -> S3Keys {
    S3Keys::parse("KEYS", AWS_EXAMPLE_KEYS).unwrap()
}

/// A moto-like local server: path-style, a non-default port.
fn local_bucket() -> S3Config {
    config(json!({
        "endpoint": "http://127.0.0.1:5000/", "region": "eu-central-1", "bucket": "ferry-copy",
        "credentials_secret": "REPLICA_S3_KEYS",
    }))
}

fn local_keys() -> S3Keys {
    S3Keys::parse("REPLICA_S3_KEYS", " AKIDFERRYTEST:ferry/secret+key:with-colon\n").unwrap()
}

fn header<'r>(request: &'r HttpRequest, name: &str) -> &'r str {
    request.header_value(name).unwrap_or_else(|| panic!("no {name} header in {request:?}"))
}

fn signature_of(request: &HttpRequest) -> &str {
    header(request, "authorization").rsplit("Signature=").next().unwrap()
}

// --- Signatures against published and independent values ---

#[test]
fn ranged_get_matches_the_aws_published_get_object_example() {
    // https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html, "Example: GET Object".
    let (config, keys) = (aws_example_bucket(), aws_example_keys());
    let request = S3Client::new(&config, &keys).get_object_range("test.txt", 0, 9, AWS_EXAMPLE_TIME);
    assert_eq!(request.method, Method::Get);
    assert_eq!(request.url, "https://examplebucket.s3.amazonaws.com/test.txt");
    assert_eq!(header(&request, "range"), "bytes=0-9");
    assert_eq!(header(&request, "x-amz-date"), "20130524T000000Z");
    assert_eq!(header(&request, "x-amz-content-sha256"), EMPTY_SHA256);
    assert_eq!(
        header(&request, "authorization"),
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
         Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    );
}

#[test]
fn signer_matches_the_aws_published_put_object_example() {
    // The same page, "Example: PUT Object": a `date` and a storage-class header, and a '$' in the key.
    let (config, keys) = (aws_example_bucket(), aws_example_keys());
    let client = S3Client::new(&config, &keys);
    let url = client.object_url("test$file.text");
    assert_eq!(url, "https://examplebucket.s3.amazonaws.com/test%24file.text");
    let headers = vec![
        ("date".to_string(), "Fri, 24 May 2013 00:00:00 GMT".to_string()),
        ("x-amz-storage-class".to_string(), "REDUCED_REDUNDANCY".to_string()),
    ];
    let request = client.signed(Method::Put, url, headers, Payload::Bytes(b"Welcome to Amazon S3."), AWS_EXAMPLE_TIME);
    assert_eq!(
        header(&request, "x-amz-content-sha256"),
        "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    );
    assert!(header(&request, "authorization")
        .contains("SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"));
    assert_eq!(signature_of(&request), "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd");
}

#[test]
fn signer_matches_the_aws_published_lifecycle_and_list_examples() {
    // The same page, "Example: GET Bucket Lifecycle" and "Example: Get Bucket (List Objects)".
    let (config, keys) = (aws_example_bucket(), aws_example_keys());
    let client = S3Client::new(&config, &keys);
    let sign = |url: &str| client.signed(Method::Get, url.into(), Vec::new(), Payload::Bytes(&[]), AWS_EXAMPLE_TIME);
    let lifecycle = sign("https://examplebucket.s3.amazonaws.com/?lifecycle");
    assert_eq!(signature_of(&lifecycle), "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543");
    let list = sign("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J");
    assert_eq!(signature_of(&list), "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7");
}

// The next expected values were produced once, by hand, with botocore 1.43.11's S3SigV4Auth (an
// implementation independent of aws-sigv4): `AWSRequest(method, url, headers, data)` with the
// same URL, headers and body as the request below (for the part, its bytes `hello part` as the
// body, since botocore hashes the body itself), over http:// so botocore signs the payload's
// SHA-256, with `botocore.auth.get_current_datetime` patched to 2026-11-23T10:15:00Z, keys
// AKIDFERRYTEST / `ferry/secret+key:with-colon`, region eu-central-1.

#[test]
fn upload_part_matches_botocore() {
    let (config, keys) = (local_bucket(), local_keys());
    let hash = "176e0f4c4b8eeac3b0b9a199fd38d04a0d9c8804e84672e72d66083161bc79ab"; // sha256("hello part")
    let request =
        S3Client::new(&config, &keys).upload_part("backups/db 1/part+x=ü.bin", "2~abc/def+ghi=", 3, hash, 10, NOW);
    assert_eq!(
        request.url,
        "http://127.0.0.1:5000/ferry-copy/backups/db%201/part%2Bx%3D%C3%BC.bin?partNumber=3&uploadId=2~abc%2Fdef%2Bghi%3D"
    );
    assert_eq!((request.method, request.body.as_ref()), (Method::Put, None));
    assert_eq!(header(&request, "content-length"), "10");
    assert_eq!(header(&request, "x-amz-content-sha256"), hash);
    assert_eq!(
        header(&request, "authorization"),
        "AWS4-HMAC-SHA256 Credential=AKIDFERRYTEST/20261123/eu-central-1/s3/aws4_request, \
         SignedHeaders=content-length;host;x-amz-content-sha256;x-amz-date, \
         Signature=d8e785aacde4e7809e6c83780593a9a7364d3388425c27bffa501303f81dca12"
    );
}

#[test]
fn put_object_matches_botocore() {
    let (config, keys) = (local_bucket(), local_keys());
    let request = S3Client::new(&config, &keys).put_object(
        "daily/2026-11-23T101500Z/manifest.json",
        b"{\"files\":[]}".to_vec(),
        "application/json",
        &[("sha256", "abc123"), ("Source", "billing-db")],
        NOW,
    );
    assert_eq!(request.url, "http://127.0.0.1:5000/ferry-copy/daily/2026-11-23T101500Z/manifest.json");
    assert_eq!(request.body.as_deref(), Some(&b"{\"files\":[]}"[..]));
    assert_eq!(header(&request, "x-amz-meta-source"), "billing-db");
    assert_eq!(
        header(&request, "authorization"),
        "AWS4-HMAC-SHA256 Credential=AKIDFERRYTEST/20261123/eu-central-1/s3/aws4_request, \
         SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-sha256;\
         x-amz-meta-source, Signature=e347b2da233691bfd5de611e37ece11319d03c66a5cf1e4388085896990b4db2"
    );
}

#[test]
fn list_objects_matches_botocore() {
    let (config, keys) = (local_bucket(), local_keys());
    let request =
        S3Client::new(&config, &keys).list_objects("daily/a b+c", Some("/"), Some("1ueGcx/XY+m36=="), 1000, NOW);
    assert_eq!(
        request.url,
        "http://127.0.0.1:5000/ferry-copy?list-type=2&prefix=daily%2Fa%20b%2Bc&delimiter=%2F\
         &continuation-token=1ueGcx%2FXY%2Bm36%3D%3D&max-keys=1000"
    );
    assert_eq!(signature_of(&request), "8d0b1f45e48bbb9a71f5ee7828e0aaef401110295be9c831b0cce4ff82882edd");
}

// --- What every request carries ---

#[test]
fn every_request_is_signed_with_lowercase_headers_and_no_host() {
    let (config, keys) = (local_bucket(), local_keys());
    let c = S3Client::new(&config, &keys);
    let requests = [
        c.put_object("k", b"body".to_vec(), "text/plain", &[], NOW),
        c.get_object("k", NOW),
        c.get_object_range("k", 5, 9, NOW),
        c.head_object("k", NOW),
        c.delete_object("k", NOW),
        c.create_multipart_upload("k", "application/octet-stream", &[("a", "b")], NOW),
        c.upload_part("k", "id", 1, EMPTY_SHA256, 0, NOW),
        c.complete_multipart_upload("k", "id", &[(1, "\"e\"".into())], NOW),
        c.abort_multipart_upload("k", "id", NOW),
        c.list_objects("", None, None, 10, NOW),
    ];
    for r in &requests {
        assert!(r.headers.iter().all(|(k, _)| *k == k.to_ascii_lowercase()), "{r:?}");
        assert_eq!(r.header_value("host"), None);
        assert_eq!(header(r, "x-amz-date"), "20261123T101500Z");
        let auth = header(r, "authorization");
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDFERRYTEST/20261123/eu-central-1/s3/aws4_request, "));
        assert!(auth.contains("host;") && auth.contains("x-amz-content-sha256;x-amz-date"), "{auth}");
        let hash = header(r, "x-amz-content-sha256");
        let expected = match &r.body {
            Some(body) => hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body)),
            None => EMPTY_SHA256.to_string(),
        };
        assert_eq!(hash, expected, "{r:?}");
        // Debug redacts the signature (`authorization` is in http.rs's SENSITIVE list).
        let shown = format!("{r:?}");
        assert!(!shown.contains(signature_of(r)) && shown.contains("[redacted]"), "{shown}");
    }
    let methods: Vec<Method> = requests.iter().map(|r| r.method).collect();
    use Method::*;
    assert_eq!(methods, [Put, Get, Get, Head, Delete, Post, Put, Post, Delete, Get]);
}

#[test]
fn signatures_change_with_the_time_body_and_secret() {
    let (config, keys) = (local_bucket(), local_keys());
    let other_keys = S3Keys::parse("K", "AKIDFERRYTEST:another-secret").unwrap();
    let c = S3Client::new(&config, &keys);
    let base = c.put_object("k", b"one".to_vec(), "text/plain", &[], NOW);
    let later = c.put_object("k", b"one".to_vec(), "text/plain", &[], NOW.plus(Duration::from_secs(1)));
    let altered = c.put_object("k", b"two".to_vec(), "text/plain", &[], NOW);
    let rekeyed = S3Client::new(&config, &other_keys).put_object("k", b"one".to_vec(), "text/plain", &[], NOW);
    let sigs = [&base, &later, &altered, &rekeyed].map(signature_of);
    for (i, a) in sigs.iter().enumerate() {
        assert_eq!(a.len(), 64);
        assert!(sigs[i + 1..].iter().all(|b| a != b), "{sigs:?}");
    }
    // Same inputs, same signature: nothing here reads a clock.
    assert_eq!(signature_of(&c.put_object("k", b"one".to_vec(), "text/plain", &[], NOW)), sigs[0]);
    // An instant before the epoch signs as the epoch, one past year 9999 as its end, rather than
    // panicking.
    assert_eq!(header(&c.get_object("k", Timestamp::from_millis(-5)), "x-amz-date"), "19700101T000000Z");
    for far in [253_402_300_800_000, i64::MAX] {
        assert_eq!(header(&c.get_object("k", Timestamp::from_millis(far)), "x-amz-date"), "99991231T235959Z");
    }
}

#[test]
fn put_object_sends_its_body_length_type_and_metadata() {
    let (config, keys) = (local_bucket(), local_keys());
    let request = S3Client::new(&config, &keys).put_object(
        "k",
        b"hello".to_vec(),
        "text/plain; charset=utf-8",
        &[("Sha256", "ab"), ("odd name!", " v "), ("unicode", "zürich\n")],
        NOW,
    );
    assert_eq!(header(&request, "content-type"), "text/plain; charset=utf-8");
    assert_eq!(header(&request, "content-length"), "5");
    assert_eq!(header(&request, "x-amz-meta-sha256"), "ab");
    assert_eq!(header(&request, "x-amz-meta-odd-name-"), "v");
    // Values no HTTP stack carries as they are are percent-encoded.
    assert_eq!(header(&request, "x-amz-meta-unicode"), "z%C3%BCrich%0A");
    assert_eq!(header(&request, "x-amz-content-sha256"), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"hello")));
    assert!(header(&request, "authorization").contains(
        "SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-odd-name-;\
         x-amz-meta-sha256;x-amz-meta-unicode,"
    ));
}

#[test]
fn metadata_names_that_collide_give_one_header_with_the_later_value() {
    let (config, keys) = (local_bucket(), local_keys());
    let request = S3Client::new(&config, &keys).put_object(
        "k",
        Vec::new(),
        "x",
        &[("Job", "1"), ("job", "2"), ("jo b", "3"), ("jo:b", "4"), ("job_id", "5")],
        NOW,
    );
    let meta: Vec<(&str, &str)> = request
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-amz-meta-"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // An underscore, which many HTTP servers drop from header names, goes as `-`.
    assert_eq!(meta, [("x-amz-meta-job", "2"), ("x-amz-meta-jo-b", "4"), ("x-amz-meta-job-id", "5")]);
}

#[test]
fn a_url_the_signer_refuses_goes_unsigned_instead_of_panicking() {
    // http's URI parser refuses over 64 KiB; S3 refuses keys over 1024 bytes anyway.
    let (config, keys) = (local_bucket(), local_keys());
    let c = S3Client::new(&config, &keys);
    let huge = "k".repeat(70_000);
    let request = c.get_object(&huge, NOW);
    assert_eq!(request.url, c.object_url(&huge));
    assert_eq!(request.header_value("authorization"), None);
    assert!(c.get_object(&"k".repeat(1024), NOW).header_value("authorization").is_some());
}

#[test]
fn create_multipart_upload_posts_uploads_with_the_objects_type_and_metadata() {
    let (config, keys) = (local_bucket(), local_keys());
    let request =
        S3Client::new(&config, &keys).create_multipart_upload("a/b.gz", "application/gzip", &[("sha256", "x")], NOW);
    assert_eq!(request.url, "http://127.0.0.1:5000/ferry-copy/a/b.gz?uploads");
    assert_eq!((request.method, request.body.as_ref()), (Method::Post, None));
    assert_eq!(header(&request, "content-type"), "application/gzip");
    assert_eq!(header(&request, "x-amz-meta-sha256"), "x");
}

#[test]
fn complete_body_lists_the_parts_in_order_with_escaped_etags() {
    let (config, keys) = (local_bucket(), local_keys());
    let parts = [(2, "\"b<&>\"".to_string()), (1, "\"a54357aff0632cce46d942af68356b38\"".to_string())];
    let request = S3Client::new(&config, &keys).complete_multipart_upload("k", "up id", &parts, NOW);
    assert_eq!(request.url, "http://127.0.0.1:5000/ferry-copy/k?uploadId=up%20id");
    assert_eq!(request.method, Method::Post);
    let body = String::from_utf8(request.body.clone().unwrap()).unwrap();
    assert_eq!(
        body,
        "<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <Part><PartNumber>1</PartNumber><ETag>\"a54357aff0632cce46d942af68356b38\"</ETag></Part>\
         <Part><PartNumber>2</PartNumber><ETag>\"b&lt;&amp;&gt;\"</ETag></Part>\
         </CompleteMultipartUpload>"
    );
    assert_eq!(header(&request, "content-length"), body.len().to_string());
}

#[test]
fn abort_deletes_the_upload_and_head_get_delete_address_the_object() {
    let (config, keys) = (local_bucket(), local_keys());
    let c = S3Client::new(&config, &keys);
    let abort = c.abort_multipart_upload("k", "VXBs+/=", NOW);
    assert_eq!(
        (abort.method, abort.url.as_str()),
        (Method::Delete, "http://127.0.0.1:5000/ferry-copy/k?uploadId=VXBs%2B%2F%3D")
    );
    for r in [c.get_object("a b", NOW), c.head_object("a b", NOW), c.delete_object("a b", NOW)] {
        assert_eq!(r.url, "http://127.0.0.1:5000/ferry-copy/a%20b");
        assert_eq!(r.body, None);
    }
}

// --- URLs ---

#[test]
fn keys_are_percent_encoded_as_s3_expects() {
    let (config, keys) = (local_bucket(), local_keys());
    let c = S3Client::new(&config, &keys);
    let base = "http://127.0.0.1:5000/ferry-copy/";
    for (key, encoded) in [
        ("plain/file.txt", "plain/file.txt"),
        ("with space", "with%20space"),
        ("plus+sign", "plus%2Bsign"),
        ("equals=and&amp?q#f", "equals%3Dand%26amp%3Fq%23f"),
        ("unreserved-._~", "unreserved-._~"),
        ("zürich/日本", "z%C3%BCrich/%E6%97%A5%E6%9C%AC"),
        ("a//b/", "a//b/"),
        ("100%", "100%25"),
        ("$@:,;!*'()", "%24%40%3A%2C%3B%21%2A%27%28%29"),
    ] {
        assert_eq!(c.object_url(key), format!("{base}{encoded}"), "{key}");
    }
}

#[test]
fn path_and_virtual_addressing_build_their_urls_and_hosts() {
    let keys = local_keys();
    let path = config(json!({
        "endpoint": "https://S3.EU-Central-1.amazonaws.com/", "region": "eu-central-1", "bucket": "ferry.copy",
        "credentials_secret": "K",
    }));
    let virtual_ = S3Config { addressing: Addressing::Virtual, ..path.clone() };
    let port = S3Config { endpoint: "https://minio.internal:9000".into(), ..virtual_.clone() };
    let cases = [
        (
            &path,
            "https://s3.eu-central-1.amazonaws.com/ferry.copy/a/b",
            "https://s3.eu-central-1.amazonaws.com/ferry.copy?list-type=2",
        ),
        (
            &virtual_,
            "https://ferry.copy.s3.eu-central-1.amazonaws.com/a/b",
            "https://ferry.copy.s3.eu-central-1.amazonaws.com/?list-type=2",
        ),
        (&port, "https://ferry.copy.minio.internal:9000/a/b", "https://ferry.copy.minio.internal:9000/?list-type=2"),
    ];
    for (config, object, list) in cases {
        let c = S3Client::new(config, &keys);
        assert_eq!(c.object_url("a/b"), object);
        assert!(c.list_objects("", None, None, 5, NOW).url.starts_with(list));
    }
    assert_eq!(path.host(), "s3.eu-central-1.amazonaws.com");
    assert_eq!(virtual_.host(), "ferry.copy.s3.eu-central-1.amazonaws.com");
    assert_eq!(port.host(), "ferry.copy.minio.internal:9000");
    assert_eq!(local_bucket().host(), "127.0.0.1:5000");
}

#[test]
fn the_signed_host_carries_a_non_default_port() {
    // Same request, port 5000 vs port 5001: the host is part of the signature.
    let keys = local_keys();
    let a = local_bucket();
    let b = S3Config { endpoint: "http://127.0.0.1:5001".into(), ..a.clone() };
    let sig = |c: &S3Config| signature_of(&S3Client::new(c, &keys).get_object("k", NOW)).to_string();
    assert_ne!(sig(&a), sig(&b));
}

// --- Config ---

#[test]
fn config_parses_with_path_addressing_by_default_and_a_normalised_endpoint() {
    let c = config(json!({
        "endpoint": " https://s3.eu-central-1.amazonaws.com/ ", "region": "eu-central-1", "bucket": "ferry-copy",
        "credentials_secret": "REPLICA_S3_KEYS",
    }));
    assert_eq!(
        c,
        S3Config {
            endpoint: "https://s3.eu-central-1.amazonaws.com".into(),
            region: "eu-central-1".into(),
            bucket: "ferry-copy".into(),
            credentials_secret: "REPLICA_S3_KEYS".into(),
            addressing: Addressing::Path,
        }
    );
    assert_eq!(c.label(), "s3://ferry-copy at https://s3.eu-central-1.amazonaws.com");
    assert!(c.label().starts_with(LABEL_SCHEME));
    // The default port is dropped, another kept; the serialised form parses back to the same.
    assert_eq!(
        config(json!({"endpoint": "https://h.io:443", "region": "auto", "bucket": "abc", "credentials_secret": "K"}))
            .endpoint,
        "https://h.io"
    );
    let minio = config(
        json!({"endpoint": "http://[::1]:9000", "region": "us-east-1", "bucket": "abc", "credentials_secret": "K", "addressing": "path"}),
    );
    assert_eq!(minio.endpoint, "http://[::1]:9000");
    assert_eq!(S3Config::from_value(&serde_json::to_value(&minio).unwrap()), Ok(minio));
}

#[test]
fn config_errors_name_their_field() {
    let good = json!({
        "endpoint": "https://s3.example.com", "region": "eu-central-1", "bucket": "ferry-copy",
        "credentials_secret": "REPLICA_S3_KEYS",
    });
    let with = |field: &str, value: serde_json::Value| {
        let mut v = good.clone();
        v[field] = value;
        S3Config::from_value(&v).unwrap_err()
    };
    for endpoint in [
        "ftp://s3.example.com",
        "not a url",
        "https://key:secret@s3.example.com",
        "https://s3.example.com/bucket",
        "https://s3.example.com/?x=1",
        "https://s3.example.com/#f",
        "",
    ] {
        let e = with("endpoint", json!(endpoint));
        assert_eq!(e.field, "endpoint", "{endpoint}: {e:?}");
        assert!(!e.problem.contains("secret@"), "{e:?}");
    }
    for region in ["EU-CENTRAL-1", "eu central", "", "eu_central_1"] {
        assert_eq!(with("region", json!(region)).field, "region", "{region}");
    }
    for bucket in ["ab", "Ferry", "-ferry", "ferry-", "fer..ry", "fer_ry", &"a".repeat(64)] {
        assert_eq!(with("bucket", json!(bucket)).field, "bucket", "{bucket}");
    }
    for secret in ["1KEYS", "AKIA:secret", "has space"] {
        assert_eq!(with("credentials_secret", json!(secret)).field, "credentials_secret", "{secret}");
    }
    assert_eq!(with("addressing", json!("dns")).field, "addressing");
    assert_eq!(with("region", json!(5)).field, "region");
    let mut ip = good.clone();
    ip["endpoint"] = json!("http://127.0.0.1:9000");
    ip["addressing"] = json!("virtual");
    assert_eq!(S3Config::from_value(&ip).unwrap_err().field, "addressing");
    // Accepted edge cases.
    for bucket in ["abc", "a.b-c9", &"a".repeat(63)] {
        assert!(S3Config::from_value(&{
            let mut v = good.clone();
            v["bucket"] = json!(bucket);
            v
        })
        .is_ok());
    }
}

#[test]
fn config_refuses_unknown_and_missing_fields_and_non_tables() {
    let mut v = json!({
        "endpoint": "https://s3.example.com", "region": "eu-central-1", "bucket": "ferry-copy",
        "credentials_secret": "REPLICA_S3_KEYS", "prefix": "x/",
    });
    assert_eq!(S3Config::from_value(&v), Err(FieldError::new("prefix", "is not a known field")));
    v.as_object_mut().unwrap().remove("prefix");
    for field in ["endpoint", "region", "bucket", "credentials_secret"] {
        let mut missing = v.clone();
        missing.as_object_mut().unwrap().remove(field);
        assert_eq!(S3Config::from_value(&missing), Err(FieldError::new(field, "is required")));
    }
    assert!(S3Config::from_value(&json!("https://s3.example.com")).unwrap_err().problem.contains("table"));
}

// --- Keys ---

#[test]
fn keys_split_at_the_first_colon_after_trimming() {
    let keys = S3Keys::parse("K", "\n  AKIAIOSFODNN7EXAMPLE:wJal/rX+Utn:FEMI==  \n").unwrap();
    assert_eq!(keys.access_key_id, "AKIAIOSFODNN7EXAMPLE");
    assert_eq!(keys.secret_access_key.expose(), "wJal/rX+Utn:FEMI==");
}

#[test]
fn keys_errors_name_the_secret_and_the_shape_never_the_value() {
    for text in ["", "   ", "nocolonhere", ":secretonly", "idonly:", "idX Y:s3cr3tZ", "idQ/x:s3cr3tQ", "idW:s3cr 3tW"] {
        let e = S3Keys::parse("REPLICA_S3_KEYS", text).unwrap_err();
        assert!(e.contains("REPLICA_S3_KEYS") && e.contains("ACCESS_KEY_ID:SECRET_ACCESS_KEY"), "{e}");
        for part in text.split([':', ' ']).filter(|p| p.len() > 3) {
            assert!(!e.contains(part), "{e} echoes {part}");
        }
    }
}

#[test]
fn keys_debug_never_prints_the_secret_key() {
    let keys = S3Keys::parse("K", "AKIDFERRYTEST:very-secret-value").unwrap();
    let shown = format!("{keys:?}");
    assert!(shown.contains("AKIDFERRYTEST") && !shown.contains("very-secret-value"), "{shown}");
    let (config, keys) = (local_bucket(), keys);
    let shown = format!("{:?}", S3Client::new(&config, &keys));
    assert!(!shown.contains("very-secret-value"), "{shown}");
}

// --- Answers ---

/// ListObjectsV2's first example in the AWS API reference (API_ListObjectsV2.html), with a
/// second object whose key holds `&amp;` and `&lt;`, and its page truncated.
const LIST_TRUNCATED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bucket</Name>
  <Prefix/>
  <KeyCount>2</KeyCount>
  <MaxKeys>2</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents>
    <Key>my-image.jpg</Key>
    <LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>"fba9dede5f27731c9771645a39863328"</ETag>
    <Size>434234</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
  <Contents>
    <Key>R&amp;D/a &lt;b&gt; &#x263A;.txt</Key>
    <LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>"fba9dede5f27731c9771645a39863328"</ETag>
    <Size>0</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
</ListBucketResult>"#;

/// The AWS API reference's example of a listing with a delimiter (`photos/2006/`).
const LIST_WITH_PREFIXES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>example-bucket</Name>
  <Prefix>photos/2006/</Prefix>
  <KeyCount>3</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <Delimiter>/</Delimiter>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>photos/2006/</Key>
    <LastModified>2016-04-30T23:51:29.000Z</LastModified>
    <ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag>
    <Size>0</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
  <CommonPrefixes>
    <Prefix>photos/2006/February/</Prefix>
  </CommonPrefixes>
  <CommonPrefixes>
    <Prefix>photos/2006/January/</Prefix>
  </CommonPrefixes>
</ListBucketResult>"#;

#[test]
fn a_walk_resumes_after_a_key_with_start_after() {
    let (config, keys) = (local_bucket(), local_keys());
    let c = S3Client::new(&config, &keys);
    let url = c.list_objects_after("", None, None, Some("app db/x"), 1000, NOW).url;
    assert!(url.ends_with("&max-keys=1000&start-after=app%20db%2Fx"), "{url}");
    assert!(!c.list_objects("", None, None, 1000, NOW).url.contains("start-after"));
}

fn at(rfc3339: &str) -> Timestamp {
    Timestamp::parse_rfc3339(rfc3339).unwrap()
}

#[test]
fn parse_list_reads_objects_prefixes_and_the_next_token() {
    let page = parse_list(LIST_TRUNCATED.as_bytes()).unwrap();
    assert_eq!(
        page,
        ListPage {
            objects: vec![
                ListedObject {
                    key: "my-image.jpg".into(),
                    size: 434_234,
                    last_modified: Some(at("2009-10-12T17:50:30.000Z"))
                },
                ListedObject {
                    key: "R&D/a <b> ☺.txt".into(),
                    size: 0,
                    last_modified: Some(at("2009-10-12T17:50:30.000Z"))
                },
            ],
            common_prefixes: vec![],
            next: Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=".into()),
        }
    );
    let page = parse_list(LIST_WITH_PREFIXES.as_bytes()).unwrap();
    let modified = Some(at("2016-04-30T23:51:29.000Z"));
    assert_eq!(page.objects, [ListedObject { key: "photos/2006/".into(), size: 0, last_modified: modified }]);
    assert_eq!(page.common_prefixes, ["photos/2006/February/", "photos/2006/January/"]);
    assert_eq!(page.next, None);
    // An empty bucket; keys keep their spaces; CDATA is text.
    let empty = r#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><IsTruncated>false</IsTruncated></ListBucketResult>"#;
    assert_eq!(parse_list(empty.as_bytes()), Ok(ListPage::default()));
    let spaced = "<ListBucketResult><Contents><Key> a </Key><Size>7</Size></Contents><Contents><Key><![CDATA[x&y]]></Key><Size>1</Size></Contents></ListBucketResult>";
    let keys: Vec<String> = parse_list(spaced.as_bytes()).unwrap().objects.into_iter().map(|o| o.key).collect();
    assert_eq!(keys, [" a ", "x&y"]);
}

#[test]
fn parse_list_refuses_a_truncated_page_without_a_token_and_broken_pages() {
    let no_token = LIST_TRUNCATED
        .replace("<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>", "");
    let e = parse_list(no_token.as_bytes()).unwrap_err();
    assert_eq!((e.status, e.code.as_str(), e.retryable), (200, "MalformedResponse", false));
    assert!(e.message.contains("NextContinuationToken"), "{e}");
    for broken in [
        LIST_TRUNCATED.replace("<Size>434234</Size>", "<Size>-1</Size>"),
        LIST_TRUNCATED.replace("<Size>434234</Size>", ""),
        LIST_TRUNCATED.replace("</ListBucketResult>", ""),
        LIST_TRUNCATED.replace("&amp;", "&bogus;"),
        LIST_TRUNCATED.replace("</Key>", "</Kay>"),
        "<InitiateMultipartUploadResult/>".to_string(),
        "not xml at all".to_string(),
        String::new(),
    ] {
        assert_eq!(parse_list(broken.as_bytes()).unwrap_err().code, "MalformedResponse", "{broken}");
    }
    assert_eq!(parse_list(&[0xff, 0xfe, b'<']).unwrap_err().code, "MalformedResponse");
    // A 200 that carries an S3 error document is that error.
    let e = parse_list(NO_SUCH_BUCKET.as_bytes()).unwrap_err();
    assert_eq!(e.code, "NoSuchBucket");
}

#[test]
fn parse_upload_id_reads_the_initiate_result() {
    // API_CreateMultipartUpload.html's example answer.
    let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>example-bucket</Bucket>
  <Key>example-object</Key>
  <UploadId>VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
</InitiateMultipartUploadResult>"#;
    assert_eq!(parse_upload_id(body.as_bytes()).unwrap(), "VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA");
    for broken in [
        "<InitiateMultipartUploadResult><UploadId></UploadId></InitiateMultipartUploadResult>",
        "<Other><UploadId>x</UploadId></Other>",
        "<InitiateMultipartUploadResult>",
        "",
    ] {
        assert_eq!(parse_upload_id(broken.as_bytes()).unwrap_err().code, "MalformedResponse", "{broken}");
    }
    assert_eq!(parse_upload_id(NO_SUCH_BUCKET.as_bytes()).unwrap_err().code, "NoSuchBucket");
}

/// An S3 error document, as in the API reference's ErrorResponses page.
const NO_SUCH_BUCKET: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error>
  <Code>NoSuchBucket</Code>
  <Message>The specified bucket does not exist</Message>
  <BucketName>ferry-copy</BucketName>
  <RequestId>4442587FB7D0A2F9</RequestId>
  <HostId>Uuag1LuByRx9e6j5Onimru9pO4ZVKnJ2Qz7/C1NPcfTWAtRPfTaOFg==</HostId>
</Error>"#;

#[test]
fn error_of_reads_s3_error_documents_and_hints_at_the_fix() {
    let body = "<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the signature you provided. Check your key and signing method.</Message><AWSAccessKeyId>AKIDFERRYTEST</AWSAccessKeyId></Error>";
    let e = error_of(403, body.as_bytes());
    assert_eq!((e.status, e.code.as_str(), e.retryable), (403, "SignatureDoesNotMatch", false));
    assert_eq!(
        e.to_string(),
        "S3 answered 403 SignatureDoesNotMatch: The request signature we calculated does not match the signature \
         you provided. Check your key and signing method. (check the secret's key pair)"
    );
    let e = error_of(404, NO_SUCH_BUCKET.as_bytes());
    assert_eq!(
        e.to_string(),
        "S3 answered 404 NoSuchBucket: The specified bucket does not exist (check the bucket name and the endpoint)"
    );
    let e = error_of(
        404,
        b"<Error><Code>NoSuchKey</Code><Message>The resource you requested does not exist</Message></Error>",
    );
    assert_eq!(e.to_string(), "S3 answered 404 NoSuchKey: The resource you requested does not exist");
}

#[test]
fn error_of_tells_retryable_from_permanent() {
    let doc = |code: &str| format!("<Error><Code>{code}</Code><Message>m</Message></Error>");
    for (status, code, retryable) in [
        (503, "SlowDown", true),
        (500, "InternalError", true),
        (400, "RequestTimeout", true),
        (503, "ServiceUnavailable", true),
        (409, "OperationAborted", true),
        (429, "TooManyRequests", true),
        (502, "Whatever", true),
        (403, "SignatureDoesNotMatch", false),
        (403, "InvalidAccessKeyId", false),
        (403, "AccessDenied", false),
        (404, "NoSuchBucket", false),
        (404, "NoSuchKey", false),
        (400, "InvalidArgument", false),
        (400, "AuthorizationHeaderMalformed", false),
    ] {
        let e = error_of(status, doc(code).as_bytes());
        assert_eq!((e.code.as_str(), e.retryable), (code, retryable), "{status} {code}");
    }
    assert!(error_of(400, doc("AuthorizationHeaderMalformed").as_bytes()).to_string().ends_with("(check the region)"));
}

#[test]
fn error_of_a_body_that_is_no_s3_document_uses_the_status() {
    let e = error_of(404, b"");
    assert_eq!((e.code.as_str(), e.message.as_str(), e.retryable), ("NotFound", "Not Found", false));
    assert_eq!(e.to_string(), "S3 answered 404 NotFound: Not Found");
    let e = error_of(503, b"<html><body>upstream\n\tconnect error</body></html>");
    assert_eq!((e.code.as_str(), e.retryable), ("ServiceUnavailable", true));
    assert_eq!(e.message, "<html><body>upstream connect error</body></html>");
    let e = error_of(599, &[0xff; 500]);
    assert_eq!(e.code, "Http599");
    assert!(e.retryable && e.message.chars().count() <= 301, "{e}");
    let long = format!("<Error><Code>SlowDown</Code><Message>{}</Message></Error>", "x".repeat(5000));
    assert_eq!(error_of(503, long.as_bytes()).message.chars().count(), 301);
    assert_eq!(error_of(418, b"").message, "HTTP 418");
    // An `<Error>` without a code is not S3's.
    assert_eq!(error_of(400, b"<Error><Message>m</Message></Error>").code, "BadRequest");
}

#[test]
fn check_complete_catches_the_200_that_carries_an_error() {
    // API_CompleteMultipartUpload.html: the success example, and the error that may follow a 200.
    let done = r#"<?xml version="1.0" encoding="UTF-8"?>
<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Location>http://Example-Bucket.s3.eu-central-1.amazonaws.com/Example-Object</Location>
  <Bucket>Example-Bucket</Bucket>
  <Key>Example-Object</Key>
  <ETag>"3858f62230ac3c915f300c664312c11f-9"</ETag>
</CompleteMultipartUploadResult>"#;
    assert_eq!(check_complete(200, done.as_bytes()), Ok(()));
    // S3 sends whitespace to keep the connection open while it works.
    assert_eq!(check_complete(200, format!("\n\n   \n{done}").as_bytes()), Ok(()));
    let failed = r#"<?xml version="1.0" encoding="UTF-8"?>

<Error>
<Code>InternalError</Code>
<Message>We encountered an internal error. Please try again.</Message>
<RequestId>656c76696e6727732072657175657374</RequestId>
<HostId>Uuag1LuByRx9e6j5Onimru9pO4ZVKnJ2Qz7/C1NPcfTWAtRPfTaOFg==</HostId>
</Error>"#;
    let e = check_complete(200, failed.as_bytes()).unwrap_err();
    assert_eq!((e.status, e.code.as_str(), e.retryable), (200, "InternalError", true));
    assert_eq!(e.message, "We encountered an internal error. Please try again.");
    let e = check_complete(404, b"<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>").unwrap_err();
    assert_eq!((e.status, e.code.as_str(), e.retryable), (404, "NoSuchUpload", false));
    for odd in ["", "<Other/>", "<CompleteMultipartUploadResult>"] {
        assert_eq!(check_complete(200, odd.as_bytes()).unwrap_err().code, "MalformedResponse", "{odd:?}");
    }
}

#[test]
fn s3_errors_become_step_errors_of_the_same_class() {
    let transient: StepError = error_of(503, b"").into();
    assert!(transient.is_retryable());
    let permanent: StepError = error_of(403, b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>").into();
    assert!(!permanent.is_retryable());
    assert!(permanent.to_string().contains("AccessDenied"));
}
