use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

use super::*;

const C: usize = CHUNK_SIZE as usize;

fn secret(seed: u8) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8).wrapping_mul(7);
    }
    bytes
}

fn identity(seed: u8) -> Identity {
    Identity::from_secret_bytes(secret(seed))
}

/// The `AGE-SECRET-KEY-1…` text of a test identity (the module itself never prints one).
fn identity_text(seed: u8) -> String {
    bech32::encode_upper::<Bech32>(Hrp::parse(IDENTITY_HRP).unwrap(), &secret(seed)).unwrap()
}

const FILE_KEY: [u8; 16] = *b"ferry file key!!";
const NONCE: [u8; 16] = *b"ferry nonce 0123";

fn envelope_to(recipients: &[Recipient]) -> Envelope {
    let ephemeral: Vec<[u8; 32]> = (0..recipients.len()).map(|i| secret(100 + i as u8)).collect();
    Envelope::new(recipients, &FILE_KEY, &ephemeral, &NONCE).unwrap()
}

fn envelope() -> Envelope {
    envelope_to(&[identity(1).to_recipient(), identity(2).to_recipient()])
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect()
}

fn encrypt_in_pieces(env: &Envelope, plaintext: &[u8], piece: usize) -> Vec<u8> {
    let mut encryptor = Encryptor::new(env);
    let mut out = Vec::new();
    for part in plaintext.chunks(piece.max(1)) {
        out.extend(encryptor.push(part).unwrap());
    }
    out.extend(encryptor.finish().unwrap());
    out
}

fn decrypt_in_pieces(identities: &[Identity], file: &[u8], piece: usize) -> Result<Vec<u8>, AgeError> {
    // The header arrives in pieces too: open is asked again with a longer prefix.
    let mut seen = 0;
    let mut decryptor = loop {
        seen = (seen + piece.max(1)).min(file.len());
        if let Some(d) = Decryptor::open(identities, &file[..seen])? {
            break d;
        }
        if seen == file.len() {
            return Err(AgeError::Truncated("header".into()));
        }
    };
    let mut out = Vec::new();
    for part in file[decryptor.header_len() as usize..].chunks(piece.max(1)) {
        out.extend(decryptor.push(part)?);
    }
    out.extend(decryptor.finish()?);
    Ok(out)
}

#[test]
fn recipients_and_identities_round_trip() {
    let id = identity(1);
    let recipient = id.to_recipient();
    let text = recipient.to_string();
    assert!(text.starts_with("age1") && text.len() == 62, "{text}");
    assert_eq!(text.parse::<Recipient>().unwrap(), recipient);
    let parsed: Identity = identity_text(1).parse().unwrap();
    assert_eq!(parsed.to_recipient(), recipient);
    assert_eq!(format!("{recipient:?}"), format!("Recipient({text})"));
    let json = serde_json::to_string(&recipient).unwrap();
    assert_eq!(json, format!("\"{text}\""));
    assert_eq!(serde_json::from_str::<Recipient>(&json).unwrap(), recipient);
}

#[test]
fn bad_recipients_are_refused_naming_what_is_wrong() {
    let good = identity(1).to_recipient().to_string();
    let mut bad_checksum = good.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'q' { 'p' } else { 'q' });
    let short = bech32::encode_lower::<Bech32>(Hrp::parse("age").unwrap(), &[7u8; 31]).unwrap();
    let other_hrp = bech32::encode_lower::<Bech32>(Hrp::parse("agf").unwrap(), &[7u8; 32]).unwrap();
    let m = bech32::encode_lower::<bech32::Bech32m>(Hrp::parse("age").unwrap(), &[7u8; 32]).unwrap();
    for (text, needle) in [
        ("", "starts with `age1`"),
        ("ssh-ed25519 AAAA", "starts with `age1`"),
        (other_hrp.as_str(), "starts with `age1`"),
        (&good.to_uppercase(), "starts with `age1`"),
        (&format!("age1{}", &good[4..].to_uppercase()), "lowercase"),
        (bad_checksum.as_str(), "bech32"),
        (m.as_str(), "bech32"),
        (&format!("{good} "), "bech32"),
        (short.as_str(), "31 bytes"),
        (&identity_text(1), "secret key"),
    ] {
        let err = text.parse::<Recipient>().unwrap_err();
        let AgeError::InvalidRecipient(why) = &err else { panic!("{text}: {err:?}") };
        assert!(why.contains(needle), "{text}: {why}");
    }
}

#[test]
fn key_files_as_age_keygen_writes_them_are_read() {
    let file = format!(
        "# created: 2024-01-01T00:00:00Z\n# public key: {}\n{}\n\n# second\r\n{}\r\n",
        identity(1).to_recipient(),
        identity_text(1),
        identity_text(2)
    );
    let ids = Identity::parse_key_file(&file).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].to_recipient(), identity(1).to_recipient());
    assert_eq!(ids[1].to_recipient(), identity(2).to_recipient());

    let key = identity_text(3);
    let mut flipped = key.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'Q' { 'P' } else { 'Q' });
    for (text, needle) in [
        ("# only a comment\n\n", "no AGE-SECRET-KEY-1"),
        (&format!("# c\n\n{flipped}\n"), "line 3: not valid bech32"),
        (&format!("{}\n", key.to_lowercase()), "line 1: an X25519 identity starts"),
        (&format!(" {key}\n"), "line 1: an X25519 identity starts"),
        (&format!("{key} \n"), "line 1"),
        (&identity(3).to_recipient().to_string(), "a recipient"),
    ] {
        let err = Identity::parse_key_file(text).unwrap_err();
        let AgeError::InvalidIdentity(why) = &err else { panic!("{err:?}") };
        assert!(why.contains(needle), "{text:?}: {why}");
        assert!(!why.contains(&key[16..40]), "the error quotes the key: {why}");
    }
}

#[test]
fn key_material_never_prints_and_serializes_only_as_secret_fields() {
    let id = identity(1);
    assert_eq!(format!("{id:?}"), "Identity([redacted])");
    let env = envelope();
    let key_b64 = STANDARD.encode(env.payload_key().0);
    let mut encryptor = Encryptor::new(&env);
    encryptor.push(b"plain secret text").unwrap();
    let file = encrypt(&env, b"x").unwrap();
    let decryptor = Decryptor::open(&[id], &file).unwrap().unwrap();
    for debug in
        [format!("{env:?}"), format!("{:?}", env.payload_key()), format!("{encryptor:?}"), format!("{decryptor:?}")]
    {
        assert!(debug.contains("[redacted"), "{debug}");
        assert!(!debug.contains(&key_b64) && !debug.contains("plain secret"), "{debug}");
    }
    for json in [
        serde_json::to_value(&env).unwrap(),
        serde_json::to_value(&encryptor).unwrap(),
        serde_json::to_value(&decryptor).unwrap(),
    ] {
        let object = json.as_object().unwrap();
        let holding_key: Vec<&String> = object.keys().filter(|k| object[*k] == key_b64.as_str()).collect();
        assert_eq!(holding_key, ["secret_payload_key"], "{json}");
    }
    let plaintext_field = serde_json::to_value(&encryptor).unwrap()["secret_plaintext"].clone();
    assert_eq!(plaintext_field, STANDARD.encode(b"plain secret text").as_str());
}

#[test]
fn the_header_has_one_x25519_stanza_per_recipient_a_mac_line_and_the_nonce() {
    let env = envelope();
    let header = env.header();
    let (text, nonce) = header.split_at(header.len() - 16);
    assert_eq!(nonce, NONCE);
    let text = std::str::from_utf8(text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "age-encryption.org/v1");
    assert!(lines[1].starts_with("-> X25519 ") && lines[1].len() == 10 + 43, "{}", lines[1]);
    assert_eq!(lines[2].len(), 43);
    assert!(lines[3].starts_with("-> X25519 "));
    assert!(lines[5].starts_with("--- ") && lines[5].len() == 4 + 43);
    assert_eq!(lines.len(), 6);
    assert!(text.ends_with('\n'));
    assert_eq!(env.header_len(), header.len() as u64);
    // The free function writes the same bytes.
    let ephemeral = [secret(100), secret(101)];
    let recipients = [identity(1).to_recipient(), identity(2).to_recipient()];
    assert_eq!(super::header(&recipients, &FILE_KEY, &ephemeral, &NONCE).unwrap(), header);
    // A serialized envelope comes back whole.
    let json = serde_json::to_string(&env).unwrap();
    assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), env);
}

#[test]
fn stanza_bodies_wrap_at_64_columns_with_a_short_last_line() {
    for (len, lines) in [(0, vec![0]), (32, vec![43]), (48, vec![64, 0]), (50, vec![64, 3]), (96, vec![64, 64, 0])] {
        let mut out = Vec::new();
        write_body(&mut out, &vec![9u8; len]);
        let got: Vec<usize> = std::str::from_utf8(&out).unwrap().split_terminator('\n').map(str::len).collect();
        assert_eq!(got, lines, "{len} bytes");
    }
}

#[test]
fn headers_cannot_be_made_without_recipients_or_with_a_low_order_one() {
    let r = identity(1).to_recipient();
    let err = Envelope::new(&[], &FILE_KEY, &[], &NONCE).unwrap_err();
    assert_eq!(err, AgeError::InvalidArgument("no recipient".into()));
    let err = Envelope::new(&[r, r], &FILE_KEY, &[secret(1)], &NONCE).unwrap_err();
    assert!(matches!(err, AgeError::InvalidArgument(ref m) if m.contains("1 ephemeral secrets for 2")), "{err}");
    let err = Envelope::new(&[Recipient([0; 32])], &FILE_KEY, &[secret(1)], &NONCE).unwrap_err();
    assert!(matches!(err, AgeError::InvalidRecipient(ref m) if m.contains("low-order")), "{err}");
}

/// A fixed vector (fixed keys, ephemeral secret, file key and nonce): the bytes may never change,
/// since files written today must read the same way in years. `age` itself decrypts it in
/// `age_decrypts_what_ferry_encrypts`.
fn known_answer() -> (Envelope, Vec<u8>, Vec<u8>) {
    let env = envelope_to(&[identity(1).to_recipient()]);
    let plaintext = data(C + 7);
    let file = encrypt(&env, &plaintext).unwrap();
    (env, plaintext, file)
}

#[test]
fn a_fixed_file_keeps_its_exact_bytes() {
    let (env, _, file) = known_answer();
    let header = String::from_utf8_lossy(env.header());
    assert_eq!(
        header,
        "age-encryption.org/v1\n\
         -> X25519 +N5VDHV46uwLGq1T2umf0gsiUWnmr74mAd0PA6qqKGY\n\
         MuKggl/mubgbViwfRQOLxWAc3rp/D85KkVTMJhIk+2o\n\
         --- p9EQKJ21ivY4U5ZRheDOlV8oP2zVduVW4XMM7Fh9IXE\n\
         ferry nonce 0123"
    );
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&file)),
        "60e3f1751a5284aaa699971780fb4a857d58a9bb61ff665eb0b1d5bd56296aad"
    );
}

#[test]
fn lengths_match_what_the_encryptor_writes_and_invert() {
    let env = envelope();
    let h = env.header_len();
    for len in [0, 1, 15, 16, 17, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1, 3 * C + 12_345] {
        let file = encrypt(&env, &data(len)).unwrap();
        assert_eq!(ciphertext_len(h, len as u64), Some(file.len() as u64), "{len}");
        assert_eq!(plaintext_len(h, file.len() as u64), Ok(len as u64), "{len}");
    }
    let e = ENCRYPTED_CHUNK_SIZE;
    for payload in [0, 1, 15, e + 1, e + 15, e + 16, 2 * e + 16, 3 * e + 3] {
        assert!(matches!(plaintext_len(h, h + payload), Err(AgeError::InvalidLength(_))), "{payload}");
    }
    assert!(matches!(plaintext_len(h, h - 1), Err(AgeError::InvalidLength(_))));
    assert_eq!(plaintext_len(h, h + 16), Ok(0));
    assert_eq!(plaintext_len(h, h + e + 17), Ok(CHUNK_SIZE + 1));
    assert_eq!(ciphertext_len(u64::MAX, 1), None);
    assert_eq!(ciphertext_len(0, u64::MAX), None);
}

#[test]
fn files_round_trip_whatever_the_push_sizes() {
    let env = envelope();
    let ids = [identity(3), identity(2)];
    for len in [0, 1, 100, C - 1, C, C + 1, 2 * C, 2 * C + 1, 3 * C + 5] {
        let plaintext = data(len);
        let whole = encrypt(&env, &plaintext).unwrap();
        for piece in [1, 7, 16, 4096, C - 1, C, C + 1, ENCRYPTED_CHUNK_SIZE as usize, 1 << 20] {
            if piece < 16 && len > 2 * C {
                continue; // slow in a debug build, and nothing the sizes around it do not cover
            }
            assert_eq!(encrypt_in_pieces(&env, &plaintext, piece), whole, "len {len} piece {piece}");
            assert_eq!(decrypt_in_pieces(&ids, &whole, piece).unwrap(), plaintext, "len {len} piece {piece}");
        }
    }
}

#[test]
fn the_final_chunk_is_full_when_the_plaintext_fills_it_and_empty_only_for_an_empty_file() {
    let env = envelope();
    let h = env.header_len() as usize;
    let file = encrypt(&env, &data(C)).unwrap();
    assert_eq!(file.len(), h + ENCRYPTED_CHUNK_SIZE as usize);
    assert_eq!(encrypt(&env, &[]).unwrap().len(), h + 16);
    let file = encrypt(&env, &data(2 * C)).unwrap();
    assert_eq!(file.len(), h + 2 * ENCRYPTED_CHUNK_SIZE as usize);
}

/// The resumed encryption's output from `offset` on, re-reading the plaintext from the plaintext
/// offset it names, in pushes of `piece` bytes, through a persisted (serialized) envelope.
fn resumed(env: &Envelope, plaintext: &[u8], offset: u64, piece: usize) -> Vec<u8> {
    let env: Envelope = serde_json::from_str(&serde_json::to_string(env).unwrap()).unwrap();
    let (mut encryptor, point) = Encryptor::resume(&env, offset);
    assert_eq!(point, resume_point(env.header_len(), offset));
    let mut out = Vec::new();
    for part in plaintext[point.plaintext_offset as usize..].chunks(piece) {
        out.extend(encryptor.push(part).unwrap());
    }
    out.extend(encryptor.finish().unwrap());
    out
}

#[test]
fn an_encryption_resumed_at_any_part_boundary_writes_the_same_bytes() {
    let env = envelope();
    let h = env.header_len();
    let e = ENCRYPTED_CHUNK_SIZE;
    let lengths = [0, 1, 100, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1, 3 * C + 12_345];
    let mut checked = 0;
    for len in lengths {
        let plaintext = data(len);
        let whole = encrypt(&env, &plaintext).unwrap();
        let total = whole.len() as u64;
        let mut offsets = std::collections::BTreeSet::new();
        // Every part boundary for many part sizes (5 MiB parts included: only 0 fits in these).
        for part in [7, 64, 200, h, h + 1, 4096, e - 1, e, e + 1, 100_000, 2 * e, 5 << 20] {
            if total / part <= 100 {
                offsets.extend((0..=total).step_by(part as usize));
            }
        }
        // Every offset around the edges: the header's end, each chunk's end, the file's end.
        let edges = [0, h].into_iter().chain((1..=total / e).map(|k| h + k * e)).chain([total]);
        for edge in edges {
            offsets.extend(edge.saturating_sub(17)..=(edge + 17).min(total));
        }
        if total < 2_000 {
            offsets.extend(0..=total); // small files: every offset
        }
        for offset in offsets {
            let piece = [1 + (offset % 5000) as usize, C, 1 << 20][(offset % 3) as usize];
            let got = resumed(&env, &plaintext, offset, piece);
            assert!(got == whole[offset as usize..], "len {len}, resumed at {offset} (header {h})");
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked}");
}

#[test]
fn resume_points_name_the_chunk_its_plaintext_offset_and_the_bytes_to_skip() {
    let e = ENCRYPTED_CHUNK_SIZE;
    assert_eq!(resume_point(200, 0), ResumePoint { chunk: 0, plaintext_offset: 0, skip: 0 });
    assert_eq!(resume_point(200, 150), ResumePoint { chunk: 0, plaintext_offset: 0, skip: 150 });
    assert_eq!(resume_point(200, 200), ResumePoint { chunk: 0, plaintext_offset: 0, skip: 0 });
    assert_eq!(resume_point(200, 201), ResumePoint { chunk: 0, plaintext_offset: 0, skip: 1 });
    assert_eq!(resume_point(200, 200 + e), ResumePoint { chunk: 1, plaintext_offset: CHUNK_SIZE, skip: 0 });
    assert_eq!(
        resume_point(200, 5 << 20),
        ResumePoint { chunk: 79, plaintext_offset: 79 * CHUNK_SIZE, skip: (5 << 20) - 200 - 79 * e }
    );
    assert_eq!(resume_point(0, u64::MAX).chunk, u64::MAX / e);
}

#[test]
fn an_encryptor_serialized_mid_stream_carries_on() {
    let env = envelope();
    let plaintext = data(2 * C + 99);
    let whole = encrypt(&env, &plaintext).unwrap();
    for cut in [0, 1, 500, C, C + 1, 2 * C + 98] {
        let mut encryptor = Encryptor::new(&env);
        let mut out = encryptor.push(&plaintext[..cut]).unwrap();
        let json = serde_json::to_string(&encryptor).unwrap();
        let mut encryptor: Encryptor = serde_json::from_str(&json).unwrap();
        out.extend(encryptor.push(&plaintext[cut..]).unwrap());
        out.extend(encryptor.finish().unwrap());
        assert!(out == whole, "cut at {cut}");
        assert_eq!(encryptor.push(b"x"), Err(AgeError::Ended));
        assert_eq!(encryptor.finish(), Err(AgeError::Ended));
    }
}

#[test]
fn a_decryption_resumes_at_any_chunk_boundary_and_from_its_serialized_state() {
    let env = envelope();
    let ids = [identity(1)];
    let plaintext = data(3 * C + 10);
    let file = encrypt(&env, &plaintext).unwrap();
    let first = Decryptor::open(&ids, &file).unwrap().unwrap();
    assert_eq!(first.header_len(), env.header_len());
    assert_eq!(first.payload_key(), env.payload_key());
    for chunk in 0..4u64 {
        let mut d = Decryptor::resume(env.payload_key().clone(), env.header_len(), chunk);
        assert_eq!(d.chunk(), chunk);
        let mut out = d.push(&file[d.ciphertext_offset() as usize..]).unwrap();
        out.extend(d.finish().unwrap());
        assert!(out == plaintext[d_plain(chunk)..], "chunk {chunk}");
    }
    for cut in [0, 1, C, ENCRYPTED_CHUNK_SIZE as usize, ENCRYPTED_CHUNK_SIZE as usize + 1, 3 * C] {
        let mut d = first.clone();
        let payload = &file[d.header_len() as usize..];
        let mut out = d.push(&payload[..cut]).unwrap();
        let mut d: Decryptor = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(d.plaintext_offset(), out.len() as u64);
        out.extend(d.push(&payload[cut..]).unwrap());
        out.extend(d.finish().unwrap());
        assert!(out == plaintext, "cut {cut}");
        assert_eq!(d.push(b"x"), Err(AgeError::Ended));
    }
}

fn d_plain(chunk: u64) -> usize {
    (chunk * CHUNK_SIZE) as usize
}

#[test]
fn every_flipped_byte_is_refused() {
    let env = envelope();
    let ids = [identity(2)];
    let file = encrypt(&env, &data(100)).unwrap();
    let h = env.header_len() as usize;
    for at in 0..file.len() {
        let mut bad = file.clone();
        bad[at] ^= 0x01;
        let err = decrypt(&ids, &bad).unwrap_err();
        if at >= h - 16 {
            // The nonce changes the payload key, the payload its own chunk.
            assert_eq!(err, AgeError::ChunkAuthentication(0), "byte {at}");
        } else {
            assert!(
                matches!(err, AgeError::MalformedHeader(_) | AgeError::BadHeaderMac | AgeError::NoMatchingIdentity),
                "byte {at}: {err:?}"
            );
        }
    }
    // A flipped byte in a later chunk names that chunk, even when pushed whole.
    let file = encrypt(&env, &data(3 * C)).unwrap();
    let mut bad = file.clone();
    bad[h + 2 * ENCRYPTED_CHUNK_SIZE as usize + 5] ^= 0x80;
    assert_eq!(decrypt(&ids, &bad), Err(AgeError::ChunkAuthentication(2)));
    bad = file.clone();
    bad[h + ENCRYPTED_CHUNK_SIZE as usize - 1] ^= 0x80;
    assert_eq!(decrypt(&ids, &bad), Err(AgeError::ChunkAuthentication(0)));
}

#[test]
fn a_truncated_file_is_refused_wherever_it_is_cut() {
    let env = envelope();
    let ids = [identity(1)];
    let file = encrypt(&env, &data(2 * C + 40)).unwrap();
    let h = env.header_len() as usize;
    let e = ENCRYPTED_CHUNK_SIZE as usize;
    let mut cuts: Vec<usize> = (0..h + 20).collect();
    for boundary in [h + e, h + 2 * e] {
        cuts.extend(boundary - 20..boundary + 20);
    }
    cuts.extend(file.len() - 20..file.len());
    for cut in cuts {
        let err = decrypt(&ids, &file[..cut]).unwrap_err();
        assert!(matches!(err, AgeError::Truncated(_) | AgeError::ChunkAuthentication(_)), "cut {cut}: {err:?}");
        if cut <= h + 15 || cut == h + e || cut == h + 2 * e {
            assert!(matches!(err, AgeError::Truncated(_)), "cut {cut}: {err:?}");
        }
    }
    assert!(matches!(decrypt(&ids, &file[..h + e]), Err(AgeError::Truncated(m)) if m.contains("after chunk 0")));
    // A file whose last chunk is full, cut at a chunk boundary.
    let file = encrypt(&env, &data(2 * C)).unwrap();
    assert!(matches!(decrypt(&ids, &file[..h + e]), Err(AgeError::Truncated(_))));
    assert_eq!(decrypt(&ids, &file).unwrap(), data(2 * C));
}

#[test]
fn data_after_the_last_chunk_is_refused() {
    let env = envelope();
    let ids = [identity(1)];
    for len in [0, 5, C, 2 * C] {
        let mut file = encrypt(&env, &data(len)).unwrap();
        file.extend_from_slice(b"more");
        let err = decrypt(&ids, &file).unwrap_err();
        assert!(matches!(err, AgeError::TrailingData | AgeError::ChunkAuthentication(_)), "{len}: {err:?}");
        if len % C == 0 && len > 0 {
            assert_eq!(err, AgeError::TrailingData, "{len}");
        }
    }
    // A second file appended to a full-chunk one.
    let mut file = encrypt(&env, &data(C)).unwrap();
    file.extend(encrypt(&env, &data(C)).unwrap());
    assert_eq!(decrypt(&ids, &file), Err(AgeError::TrailingData));
}

#[test]
fn an_empty_last_chunk_after_a_full_one_is_refused() {
    let env = envelope();
    let mut encryptor = Encryptor::new(&env);
    let mut file = encryptor.push(&data(C)).unwrap();
    encryptor.seal(&mut file, false).unwrap();
    encryptor.seal(&mut file, true).unwrap();
    let err = decrypt(&[identity(1)], &file).unwrap_err();
    assert!(matches!(err, AgeError::MalformedPayload(ref m) if m.contains("empty last chunk")), "{err:?}");
}

#[test]
fn a_resume_at_the_end_of_a_file_writes_nothing_more() {
    let env = envelope();
    for len in [0, 1, C, 2 * C] {
        let plaintext = data(len);
        let whole = encrypt(&env, &plaintext).unwrap();
        assert!(resumed(&env, &plaintext, whole.len() as u64, 7).is_empty(), "{len}");
    }
}

/// A header with these lines between the version line and the MAC line, MAC'd with FILE_KEY.
fn header_with(lines: &str) -> Vec<u8> {
    let mut text = format!("age-encryption.org/v1\n{lines}---").into_bytes();
    let mac = header_mac(&FILE_KEY, &text).unwrap().finalize().into_bytes();
    text.extend_from_slice(format!(" {}\n", STANDARD_NO_PAD.encode(mac)).as_bytes());
    text.extend_from_slice(&NONCE);
    let env = envelope();
    let (mut payload, _) = Encryptor::resume(&env, env.header_len());
    text.extend(payload.finish().unwrap());
    text
}

#[test]
fn malformed_headers_are_refused_with_the_reason() {
    let ids = [identity(1)];
    let env = envelope();
    let real = String::from_utf8_lossy(&env.header()[..env.header().len() - 16]).into_owned();
    let stanza = real.lines().skip(1).take(2).collect::<Vec<_>>().join("\n") + "\n";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello world, this is no age file at all".to_vec(), "not an age file"),
        (b"-----BEGIN AGE ENCRYPTED FILE-----\n".to_vec(), "ASCII-armored"),
        (b"age-encryption.org/v2\n".to_vec(), "version other than v1"),
        (header_with(""), "no recipient stanza"),
        (header_with("-> \nAAAA\n"), "empty or not printable"),
        (header_with("-> X25519  AAAA\nAAAA\n"), "empty or not printable"),
        (header_with("-> X25519\tA\nAAAA\n"), "printable"),
        (header_with("-> X25519 é\nAAAA\n"), "printable"),
        (header_with("-> X25519 AAAA\r\nAAAA\n"), "printable"),
        (header_with("junk\n"), "neither a stanza"),
        (header_with(&format!("-> x\n{}\n", "A".repeat(65))), "longer than 64"),
        (header_with("-> x\nAA==\n"), "not canonical unpadded base64"),
        (header_with("-> x\nAB\n"), "not canonical unpadded base64"),
        (header_with("-> x\nAAAA\r\n"), "not canonical unpadded base64"),
        (header_with("-> X25519\nAAAA\n"), "one argument"),
        (header_with("-> X25519 AAAA AAAA\nAAAA\n"), "one argument"),
        (header_with("-> X25519 AAAA\nAAAA\n"), "share is not 32 bytes"),
        (header_with(&format!("-> X25519 {}\nAAAA\n", STANDARD_NO_PAD.encode([9u8; 32]))), "body is not 32 bytes"),
        (header_with(&format!("-> X25519 {}\n{}\n", STANDARD_NO_PAD.encode([0u8; 32]), "A".repeat(43))), "low-order"),
        (header_with(&format!("{stanza}-> scrypt c2FsdA 18\nAAAA\n")), "scrypt stanza must be the only one"),
        (format!("{}---\n", &real[..real.len() - 48]).into_bytes(), "not `--- <mac>`"),
        (format!("{}--- AAAA\n", &real[..real.len() - 48]).into_bytes(), "not 32 bytes"),
        (
            format!("{}--- {}=\n", &real[..real.len() - 48], &real[real.len() - 44..real.len() - 1]).into_bytes(),
            "base64",
        ),
    ];
    for (file, needle) in cases {
        let err = decrypt(&ids, &file).unwrap_err();
        let AgeError::MalformedHeader(why) = &err else { panic!("{:?}: {err:?}", String::from_utf8_lossy(&file)) };
        assert!(why.contains(needle), "{:?}: {why}", String::from_utf8_lossy(&file));
    }
}

#[test]
fn headers_for_other_identities_or_types_and_altered_macs_are_refused() {
    let env = envelope();
    let file = encrypt(&env, b"hello").unwrap();
    assert_eq!(decrypt(&[identity(9)], &file), Err(AgeError::NoMatchingIdentity));
    assert_eq!(decrypt(&[], &file), Err(AgeError::NoMatchingIdentity));
    assert_eq!(decrypt(&[identity(9), identity(2)], &file).unwrap(), b"hello");
    let unsupported = header_with("-> scrypt c2FsdHNhbHRzYWx0c2FsdA 18\nAAAA\n");
    assert_eq!(decrypt(&[identity(1)], &unsupported), Err(AgeError::UnsupportedStanza("scrypt".into())));
    let two = header_with("-> ssh-ed25519 AAAA BBBB\nAAAA\n-> piv-p256 AAAA\nAAAA\n");
    assert_eq!(decrypt(&[identity(1)], &two), Err(AgeError::UnsupportedStanza("ssh-ed25519, piv-p256".into())));
    // A grease stanza beside a real one is ignored.
    let real = String::from_utf8_lossy(&env.header()[..env.header().len() - 16]).into_owned();
    let stanzas: String = real.lines().skip(1).take(4).map(|l| format!("{l}\n")).collect();
    let greased = header_with(&format!("-> grease-x (ok) !\n{}\n{stanzas}", "A".repeat(10)));
    assert_eq!(decrypt(&[identity(2)], &greased).unwrap(), b"");
    // The MAC covers every header byte: a stanza swapped for another wrapping the same key fails.
    let mut altered = file.clone();
    let other = envelope_to(&[identity(2).to_recipient(), identity(1).to_recipient()]);
    altered.splice(..env.header().len(), other.header().iter().copied());
    assert!(decrypt(&[identity(1)], &altered).is_ok()); // a header of its own is fine
    let swapped =
        String::from_utf8_lossy(env.header()).replacen("age-encryption.org/v1\n", "age-encryption.org/v1\n-> x\n\n", 1);
    let mut bad = swapped.into_bytes();
    bad.extend_from_slice(&file[env.header().len()..]);
    assert_eq!(decrypt(&[identity(1)], &bad), Err(AgeError::BadHeaderMac));
}

#[test]
fn a_header_arriving_in_pieces_is_read_once_whole_and_an_endless_one_is_refused() {
    let env = envelope();
    let file = encrypt(&env, b"abc").unwrap();
    let h = env.header().len();
    for n in 0..h {
        assert!(Decryptor::open(&[identity(1)], &file[..n]).unwrap().is_none(), "{n}");
    }
    assert_eq!(Decryptor::open(&[identity(1)], &file[..h]).unwrap().unwrap().header_len(), h as u64);
    let mut endless = b"age-encryption.org/v1\n-> x\n".to_vec();
    while endless.len() < MAX_HEADER_LEN {
        endless.extend_from_slice(&[b'A'; 64]);
        endless.push(b'\n');
    }
    assert!(
        matches!(Decryptor::open(&[identity(1)], &endless), Err(AgeError::MalformedHeader(m)) if m.contains("no end"))
    );
    assert_eq!(decrypt(&[identity(1)], &file[..h - 1]), Err(AgeError::Truncated("the header is cut short".into())));
}

// ---- Interop with the real `age` (Debian's age 1.1.1, installed by scripts/setup.sh) ----

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("ferry-age-{name}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `age`/`age-keygen`, failing (never skipping) when they are not installed.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{program}` ({e}): the encryption interop tests need the real age; \
             run `bash scripts/setup.sh` (it installs Debian's age)"
        )
    });
    assert!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// An identity made by `age-keygen`: its key file and the identities Ferry reads from it.
fn keygen(dir: &TempDir) -> (PathBuf, Vec<Identity>, Recipient) {
    let key = dir.path("key.txt");
    run("age-keygen", &["-o".as_ref(), key.as_os_str()]);
    let text = std::fs::read_to_string(&key).unwrap();
    let recipient = text.lines().find_map(|l| l.strip_prefix("# public key: ")).unwrap().parse().unwrap();
    let identities = Identity::parse_key_file(&text).unwrap();
    assert_eq!(identities.len(), 1);
    assert_eq!(identities[0].to_recipient(), recipient);
    (key, identities, recipient)
}

fn age_decrypt(key: &Path, file: &[u8], dir: &TempDir) -> Vec<u8> {
    let input = dir.path("in.age");
    std::fs::write(&input, file).unwrap();
    // To standard output: `-o` creates no file for an empty plaintext.
    run("age", &["-d".as_ref(), "-i".as_ref(), key.as_os_str(), input.as_os_str()]).stdout
}

fn age_encrypt(recipient: &Recipient, plaintext: &[u8], dir: &TempDir) -> Vec<u8> {
    let input = dir.path("plain");
    let output = dir.path("out.age");
    std::fs::write(&input, plaintext).unwrap();
    let r = recipient.to_string();
    run("age", &["-r".as_ref(), r.as_ref(), "-o".as_ref(), output.as_os_str(), input.as_os_str()]);
    std::fs::read(output).unwrap()
}

const INTEROP_SIZES: [usize; 6] = [0, 1, C - 1, C, C + 1, 1_000_003];

#[test]
fn age_decrypts_what_ferry_encrypts() {
    let dir = TempDir::new("decrypts");
    let (key, _, recipient) = keygen(&dir);
    let others = identity(5).to_recipient();
    for (i, len) in INTEROP_SIZES.into_iter().enumerate() {
        let plaintext = data(len);
        let ephemeral = [secret(40 + i as u8), secret(60 + i as u8)];
        let nonce = [i as u8; 16];
        let env = Envelope::new(&[others, recipient], &[i as u8 + 1; 16], &ephemeral, &nonce).unwrap();
        let file = encrypt_in_pieces(&env, &plaintext, 10_000);
        assert!(age_decrypt(&key, &file, &dir) == plaintext, "{len} bytes");
        // The same file resumed part-way: stored parts, then the resumed encryption's output.
        if len > 2 * C {
            let part = 300_000u64;
            let mut resumed_file = file[..2 * part as usize].to_vec();
            resumed_file.extend(resumed(&env, &plaintext, 2 * part, 8191));
            assert!(resumed_file == file);
            assert!(age_decrypt(&key, &resumed_file, &dir) == plaintext, "{len} bytes resumed");
        }
    }
    // The fixed vector, to Ferry's test identity 1.
    let (_, plaintext, file) = known_answer();
    let key = dir.path("known.txt");
    std::fs::write(&key, format!("# test identity\n{}\n", identity_text(1))).unwrap();
    assert!(age_decrypt(&key, &file, &dir) == plaintext);
}

#[test]
fn ferry_decrypts_what_age_encrypts() {
    let dir = TempDir::new("encrypts");
    let (_, identities, recipient) = keygen(&dir);
    for len in INTEROP_SIZES {
        let plaintext = data(len);
        let file = age_encrypt(&recipient, &plaintext, &dir);
        assert_eq!(
            plaintext_len(Decryptor::open(&identities, &file).unwrap().unwrap().header_len(), file.len() as u64),
            Ok(len as u64)
        );
        assert!(decrypt_in_pieces(&identities, &file, 4099).unwrap() == plaintext, "{len} bytes");
        assert!(decrypt(&identities, &file).unwrap() == plaintext, "{len} bytes");
    }
}

#[test]
fn ferry_refuses_altered_truncated_and_foreign_age_files() {
    let dir = TempDir::new("refuses");
    let (_, identities, recipient) = keygen(&dir);
    let plaintext = data(2 * C + 1000);
    let file = age_encrypt(&recipient, &plaintext, &dir);
    let h = Decryptor::open(&identities, &file).unwrap().unwrap().header_len() as usize;
    let e = ENCRYPTED_CHUNK_SIZE as usize;

    let mut flipped = file.clone();
    flipped[h + e + 100] ^= 0x20;
    assert_eq!(decrypt(&identities, &flipped), Err(AgeError::ChunkAuthentication(1)));
    let mut flipped = file.clone();
    flipped[h - 30] ^= 0x01; // in the MAC line's base64 or the nonce: refused either way
    assert!(decrypt(&identities, &flipped).is_err());

    assert!(matches!(decrypt(&identities, &file[..h + 2 * e]), Err(AgeError::Truncated(_))));
    assert!(matches!(decrypt(&identities, &file[..h + e]), Err(AgeError::Truncated(_))));
    assert!(matches!(decrypt(&identities, &file[..h + 2 * e + 10]), Err(AgeError::Truncated(_))));
    assert_eq!(decrypt(&identities, &file[..file.len() - 1]), Err(AgeError::ChunkAuthentication(2)));

    let (_, strangers, _) = keygen(&TempDir::new("stranger"));
    assert_eq!(decrypt(&strangers, &file), Err(AgeError::NoMatchingIdentity));
}

#[test]
fn any_plaintext_range_reads_back_from_its_window_of_the_file() {
    let identity = Identity::from_secret_bytes([9u8; 32]);
    let recipient = identity.to_recipient();
    for len in [0usize, 1, 65_535, 65_536, 65_537, 200_000, 262_144] {
        let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let envelope = Envelope::new(&[recipient], &[1u8; 16], &[[2u8; 32]], &[3u8; 16]).unwrap();
        let file = encrypt(&envelope, &plain).unwrap();
        let opened = Decryptor::open(std::slice::from_ref(&identity), &file).unwrap().unwrap();
        let header_len = opened.header_len();
        for (from, want) in [
            (0u64, 10u64),
            (0, 1 << 30),
            (5, 65_536),
            (65_535, 2),
            (65_536, 65_536),
            (131_000, 70_000),
            (len as u64, 5),
        ] {
            let w = window(header_len, file.len() as u64, from, want).unwrap();
            let bytes = &file[w.cipher_from as usize..(w.cipher_from + w.cipher_len) as usize];
            let got = read_window(opened.payload_key(), header_len, &w, bytes).unwrap();
            let start = (from as usize).min(len);
            let end = (from + want).min(len as u64) as usize;
            assert_eq!(got, plain[start..end.max(start)], "len {len}, from {from}, want {want}");
            // A byte flipped inside the window is refused.
            if w.cipher_len > 20 && !got.is_empty() {
                let mut bad = bytes.to_vec();
                bad[10] ^= 1;
                assert!(read_window(opened.payload_key(), header_len, &w, &bad).is_err());
            }
        }
    }
}
