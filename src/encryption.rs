//! Client-side encryption in the standard age v1 format (<https://age-encryption.org/v1>), for
//! X25519 recipients: backups the storage provider cannot read, written in the format whose own
//! tools open them, so `age -d -i key.txt backup.age` decrypts any file Ferry encrypted.
//!
//! A file is a text header (one `-> X25519` stanza per recipient, each wrapping the random file
//! key, then a `---` line with the header's HMAC), a 16-byte nonce, and the STREAM payload:
//! 64 KiB plaintext chunks, each sealed with ChaCha20-Poly1305 under a key derived from the file
//! key and that nonce, the last chunk flagged. Every primitive comes from RustCrypto / dalek
//! crates; this module only lays the bytes out.
//!
//! The module is pure: randomness (file key, nonce, one ephemeral secret per recipient) comes in
//! as arguments. [`Envelope::new`] makes the header and the payload key; an [`Encryptor`] turns
//! plaintext pushed in any sizes into ciphertext; [`Decryptor::open`] reads a header with an
//! [`Identity`] and a [`Decryptor`] authenticates and opens the payload.
//!
//! Resuming: the whole state a copy must keep to pick up an encryption where it stopped is its
//! [`Envelope`] (the header, a few hundred bytes, and the 32-byte payload key). From a
//! ciphertext offset the copy reached, [`resume_point`] says which chunk to restart at and from
//! which plaintext offset to re-read, and [`Encryptor::resume`] continues the exact same bytes.
//! A decryption resumes likewise at a chunk boundary ([`Decryptor::resume`]). The payload key in
//! that state decrypts the whole file: it must live only in the source's own storage (its Durable
//! Object) while the copy runs, and be dropped when the copy ends; it never goes into a manifest,
//! a log line or the bucket. Every value holding key material prints `[redacted]` and names its
//! serialized key fields `secret_…`.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use bech32::primitives::decode::CheckedHrpstring;
use bech32::{Bech32, Hrp};
use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Plaintext bytes in one payload chunk (the last may be shorter).
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Bytes of the Poly1305 tag that ends every sealed chunk.
pub const TAG_SIZE: u64 = 16;
/// Ciphertext bytes of one full chunk.
pub const ENCRYPTED_CHUNK_SIZE: u64 = CHUNK_SIZE + TAG_SIZE;
/// Bytes of the nonce between the header and the payload.
pub const NONCE_SIZE: usize = 16;
/// The longest header [`Decryptor::open`] reads (far more than any real recipient list).
pub const MAX_HEADER_LEN: usize = 64 * 1024;

const CHUNK: usize = CHUNK_SIZE as usize;
const SEALED_CHUNK: usize = ENCRYPTED_CHUNK_SIZE as usize;
const VERSION_LINE: &[u8] = b"age-encryption.org/v1\n";
const X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const RECIPIENT_HRP: &str = "age";
const IDENTITY_HRP: &str = "AGE-SECRET-KEY-";
/// Columns of a stanza body line; the last line is shorter (possibly empty).
const BODY_COLUMNS: usize = 64;

/// What went wrong reading keys, writing a header or opening a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgeError {
    /// An `age1…` recipient that does not parse.
    #[error("invalid age recipient: {0}")]
    InvalidRecipient(String),
    /// An `AGE-SECRET-KEY-1…` identity that does not parse (the message never quotes the key).
    #[error("invalid age identity: {0}")]
    InvalidIdentity(String),
    /// Arguments that cannot make a file (no recipient, one ephemeral secret short...).
    #[error("cannot encrypt: {0}")]
    InvalidArgument(String),
    /// A header that breaks the age v1 grammar.
    #[error("malformed age header: {0}")]
    MalformedHeader(String),
    /// No X25519 stanza of the file opens with the identities given.
    #[error("the file is not encrypted to any of the given identities")]
    NoMatchingIdentity,
    /// The file's stanzas are all of types Ferry cannot open (passphrase, SSH, plugins).
    #[error("the file is encrypted only to recipient types Ferry cannot open: {0}")]
    UnsupportedStanza(String),
    /// The header's MAC does not verify: the header was altered.
    #[error("the age header's MAC does not verify: the header was altered")]
    BadHeaderMac,
    /// A payload chunk failed authentication: the ciphertext was altered or corrupted.
    #[error("payload chunk {0} failed authentication: the ciphertext was altered or corrupted")]
    ChunkAuthentication(u64),
    /// A payload that breaks the STREAM rules in a way no truncation explains.
    #[error("malformed age payload: {0}")]
    MalformedPayload(String),
    /// The file ends before its last chunk.
    #[error("the encrypted file is truncated: {0}")]
    Truncated(String),
    /// Bytes follow the last chunk.
    #[error("the encrypted file has data after its last chunk")]
    TrailingData,
    /// A ciphertext length no age file of that header length has.
    #[error("invalid age file length: {0}")]
    InvalidLength(String),
    /// `push` or `finish` after `finish`, or after an error.
    #[error("the stream already ended")]
    Ended,
}

/// An X25519 recipient, `age1…`: the public key a file is encrypted to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Recipient([u8; 32]);

impl Recipient {
    /// The 32-byte X25519 public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Recipient {
    type Err = AgeError;

    /// Parses the lowercase bech32 `age1…` form `age-keygen` prints.
    fn from_str(s: &str) -> Result<Self, AgeError> {
        let bad = |why: String| AgeError::InvalidRecipient(why);
        if s.starts_with("AGE-SECRET-KEY-") {
            return Err(bad("this is a secret key (AGE-SECRET-KEY-1...), not a recipient (age1...)".into()));
        }
        if !s.starts_with("age1") {
            return Err(bad("an X25519 recipient starts with `age1`".into()));
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("an age recipient is lowercase".into()));
        }
        let checked = CheckedHrpstring::new::<Bech32>(s).map_err(|e| bad(format!("not valid bech32: {e}")))?;
        if checked.hrp().as_str() != RECIPIENT_HRP {
            return Err(bad("an X25519 recipient starts with `age1`".into()));
        }
        let bytes: Vec<u8> = checked.byte_iter().collect();
        let key: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| bad(format!("holds {} bytes, an X25519 key is 32", b.len())))?;
        let recipient = Recipient(key);
        if recipient.to_string() != s {
            return Err(bad("not the canonical bech32 encoding of its key".into()));
        }
        Ok(recipient)
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hrp = Hrp::parse(RECIPIENT_HRP).map_err(|_| fmt::Error)?;
        bech32::encode_lower_to_fmt::<Bech32, _>(f, hrp, &self.0).map_err(|_| fmt::Error)
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({self})")
    }
}

impl Serialize for Recipient {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An X25519 identity, `AGE-SECRET-KEY-1…`: the secret key that opens files encrypted to its
/// [`Recipient`]. It never prints (its `Debug` is `[redacted]`), has no `Display` and no serde.
#[derive(Clone)]
pub struct Identity(StaticSecret);

impl Identity {
    /// The identity with these 32 secret bytes (random bytes the caller drew).
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        Identity(StaticSecret::from(bytes))
    }

    /// The recipient files for this identity are encrypted to.
    pub fn to_recipient(&self) -> Recipient {
        Recipient(PublicKey::from(&self.0).to_bytes())
    }

    /// The identities of a key file as `age-keygen` writes it: one `AGE-SECRET-KEY-1…` a line,
    /// `#` comment lines and blank lines skipped. At least one is required; an error names the
    /// line, never its text.
    pub fn parse_key_file(text: &str) -> Result<Vec<Identity>, AgeError> {
        let mut identities = Vec::new();
        for (number, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let identity = line.parse::<Identity>().map_err(|e| match e {
                AgeError::InvalidIdentity(why) => AgeError::InvalidIdentity(format!("line {}: {why}", number + 1)),
                other => other,
            })?;
            identities.push(identity);
        }
        if identities.is_empty() {
            return Err(AgeError::InvalidIdentity("the key file holds no AGE-SECRET-KEY-1... line".into()));
        }
        Ok(identities)
    }
}

impl FromStr for Identity {
    type Err = AgeError;

    /// Parses one uppercase bech32 `AGE-SECRET-KEY-1…` line.
    fn from_str(s: &str) -> Result<Self, AgeError> {
        let bad = |why: &str| AgeError::InvalidIdentity(why.to_string());
        if s.starts_with("age1") {
            return Err(bad("this is a recipient (age1...), not a secret key (AGE-SECRET-KEY-1...)"));
        }
        if !s.starts_with("AGE-SECRET-KEY-1") {
            return Err(bad("an X25519 identity starts with `AGE-SECRET-KEY-1`"));
        }
        if s.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(bad("an age identity is uppercase"));
        }
        // The bech32 error text could quote a character of the key: it is not passed on.
        let checked = CheckedHrpstring::new::<Bech32>(s).map_err(|_| bad("not valid bech32 (bad checksum?)"))?;
        if !checked.hrp().as_str().eq_ignore_ascii_case(IDENTITY_HRP) {
            return Err(bad("an X25519 identity starts with `AGE-SECRET-KEY-1`"));
        }
        let bytes: Vec<u8> = checked.byte_iter().collect();
        let key: [u8; 32] = bytes.try_into().map_err(|_| bad("does not hold 32 bytes"))?;
        let hrp = Hrp::parse(IDENTITY_HRP).map_err(|_| bad("internal: bad prefix"))?;
        let canonical = bech32::encode_upper::<Bech32>(hrp, &key).map_err(|_| bad("internal: cannot encode"))?;
        if canonical != s {
            return Err(bad("not the canonical bech32 encoding of its key"));
        }
        Ok(Identity::from_secret_bytes(key))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity([redacted])")
    }
}

/// The key that seals a file's payload chunks, derived from the file key and the nonce. Anyone
/// holding it reads the whole payload: it prints `[redacted]` and is persisted only as a
/// `secret_…` field of the copy's state.
#[derive(Clone, PartialEq, Eq)]
pub struct PayloadKey([u8; 32]);

impl PayloadKey {
    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&self.0.into())
    }
}

impl fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PayloadKey([redacted])")
    }
}

impl Serialize for PayloadKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for PayloadKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = STANDARD.decode(text).map_err(|_| serde::de::Error::custom("a payload key is base64"))?;
        let key: [u8; 32] =
            bytes.try_into().map_err(|_| serde::de::Error::custom("a payload key is 32 bytes of base64"))?;
        Ok(PayloadKey(key))
    }
}

/// Bytes as a base64 string in serde (state stays compact in JSON).
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(|_| serde::de::Error::custom("expected base64"))
    }
}

/// One file's header and payload key: everything an encryption needs, and all a copy persists to
/// resume one (see the module doc for where it may live).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The header: text, MAC line and the 16-byte payload nonce (not secret).
    #[serde(with = "base64_bytes")]
    header: Vec<u8>,
    /// The payload key.
    secret_payload_key: PayloadKey,
}

impl Envelope {
    /// Encrypts `file_key` to each recipient and writes the header. `ephemeral` holds one random
    /// 32-byte X25519 secret per recipient, in order; `nonce` is the random payload nonce. All
    /// must be fresh for every file.
    pub fn new(
        recipients: &[Recipient],
        file_key: &[u8; 16],
        ephemeral: &[[u8; 32]],
        nonce: &[u8; NONCE_SIZE],
    ) -> Result<Self, AgeError> {
        let header = header(recipients, file_key, ephemeral, nonce)?;
        Ok(Envelope { header, secret_payload_key: payload_key(file_key, nonce) })
    }

    /// The header bytes, nonce included: the first bytes of the file.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// The header's length, nonce included: where the payload starts.
    pub fn header_len(&self) -> u64 {
        self.header.len() as u64
    }

    /// The payload key.
    pub fn payload_key(&self) -> &PayloadKey {
        &self.secret_payload_key
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("header_len", &self.header.len())
            .field("secret_payload_key", &"[redacted]")
            .finish()
    }
}

/// The complete age header for these recipients: the version line, one `-> X25519` stanza per
/// recipient, the `---` MAC line and the 16-byte payload nonce.
pub fn header(
    recipients: &[Recipient],
    file_key: &[u8; 16],
    ephemeral: &[[u8; 32]],
    nonce: &[u8; NONCE_SIZE],
) -> Result<Vec<u8>, AgeError> {
    if recipients.is_empty() {
        return Err(AgeError::InvalidArgument("no recipient".into()));
    }
    if ephemeral.len() != recipients.len() {
        return Err(AgeError::InvalidArgument(format!(
            "{} ephemeral secrets for {} recipients: one per recipient",
            ephemeral.len(),
            recipients.len()
        )));
    }
    let mut out = VERSION_LINE.to_vec();
    for (recipient, secret) in recipients.iter().zip(ephemeral) {
        let secret = StaticSecret::from(*secret);
        let share = PublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&PublicKey::from(recipient.0));
        if !shared.was_contributory() {
            return Err(AgeError::InvalidRecipient(format!("{recipient} is a low-order point")));
        }
        let wrap_key = wrap_key(shared.as_bytes(), &share, &recipient.0)?;
        let mut body = file_key.to_vec();
        let tag = ChaCha20Poly1305::new(&wrap_key.into())
            .encrypt_inout_detached(&Nonce::default(), &[], InOutBuf::from(&mut body[..]))
            .map_err(|_| AgeError::InvalidArgument("ChaCha20-Poly1305 refused the file key".into()))?;
        body.extend_from_slice(&tag);
        out.extend_from_slice(b"-> X25519 ");
        out.extend_from_slice(STANDARD_NO_PAD.encode(share).as_bytes());
        out.push(b'\n');
        write_body(&mut out, &body);
    }
    out.extend_from_slice(b"---");
    let mac = header_mac(file_key, &out)?.finalize().into_bytes();
    out.push(b' ');
    out.extend_from_slice(STANDARD_NO_PAD.encode(mac).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(nonce);
    Ok(out)
}

/// The payload key: HKDF-SHA256(salt = nonce, ikm = file key, info = "payload").
pub fn payload_key(file_key: &[u8; 16], nonce: &[u8; NONCE_SIZE]) -> PayloadKey {
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(nonce), file_key).expand(b"payload", &mut key);
    PayloadKey(key)
}

fn wrap_key(shared: &[u8; 32], share: &[u8; 32], recipient: &[u8; 32]) -> Result<[u8; 32], AgeError> {
    let mut salt = [0u8; 64];
    let (first, second) = salt.split_at_mut(32);
    first.copy_from_slice(share);
    second.copy_from_slice(recipient);
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(X25519_LABEL, &mut key)
        .map_err(|_| AgeError::InvalidArgument("HKDF refused the wrap key length".into()))?;
    Ok(key)
}

/// HMAC-SHA256 keyed with HKDF(salt = empty, ikm = file key, info = "header"), fed `header`.
fn header_mac(file_key: &[u8; 16], header: &[u8]) -> Result<Hmac<Sha256>, AgeError> {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&[]), file_key)
        .expand(b"header", &mut key)
        .map_err(|_| AgeError::InvalidArgument("HKDF refused the MAC key length".into()))?;
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&key)
        .map_err(|_| AgeError::InvalidArgument("HMAC refused its key".into()))?;
    mac.update(header);
    Ok(mac)
}

/// A stanza body: unpadded base64 in 64-column lines, the last one shorter (empty if need be).
fn write_body(out: &mut Vec<u8>, body: &[u8]) {
    let text = STANDARD_NO_PAD.encode(body);
    let mut rest = text.as_bytes();
    loop {
        let (line, tail) = rest.split_at(rest.len().min(BODY_COLUMNS));
        out.extend_from_slice(line);
        out.push(b'\n');
        if line.len() < BODY_COLUMNS {
            break;
        }
        rest = tail;
    }
}

/// The nonce of payload chunk `counter`: an 11-byte big-endian counter, then 1 on the last chunk.
fn chunk_nonce(counter: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; 12];
    let (_, tail) = nonce.split_at_mut(3);
    let (count, flag) = tail.split_at_mut(8);
    count.copy_from_slice(&counter.to_be_bytes());
    flag.copy_from_slice(&[u8::from(last)]);
    nonce.into()
}

/// Where a resumed encryption starts: which chunk to seal first, the plaintext offset where that
/// chunk starts (re-read the plaintext from there), and how many of the resumed output's first
/// bytes were already written (the header's, or that chunk's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Index of the first chunk sealed again.
    pub chunk: u64,
    /// Plaintext offset of that chunk's first byte.
    pub plaintext_offset: u64,
    /// Bytes of the regenerated output (header included when `chunk` is 0 and the offset falls
    /// inside the header) that come before the ciphertext offset asked for.
    pub skip: u64,
}

/// Maps a ciphertext offset (bytes of the file already stored, a part boundary) to the chunk a
/// resumed [`Encryptor`] starts at. For an offset inside the header the answer is chunk 0 with
/// the header bytes already stored to skip.
pub fn resume_point(header_len: u64, ciphertext_offset: u64) -> ResumePoint {
    match ciphertext_offset.checked_sub(header_len) {
        None => ResumePoint { chunk: 0, plaintext_offset: 0, skip: ciphertext_offset },
        Some(payload) => {
            let chunk = payload / ENCRYPTED_CHUNK_SIZE;
            ResumePoint {
                chunk,
                plaintext_offset: chunk.saturating_mul(CHUNK_SIZE),
                skip: payload % ENCRYPTED_CHUNK_SIZE,
            }
        }
    }
}

/// The length of the age file for a plaintext of `plaintext_len` bytes behind a header of
/// `header_len` bytes (nonce included); `None` past `u64`.
pub fn ciphertext_len(header_len: u64, plaintext_len: u64) -> Option<u64> {
    let chunks = plaintext_len.div_ceil(CHUNK_SIZE).max(1);
    header_len.checked_add(plaintext_len)?.checked_add(chunks.checked_mul(TAG_SIZE)?)
}

/// The plaintext length of an age file of `ciphertext_len` bytes behind a header of `header_len`
/// bytes (nonce included), or why no file has that length.
pub fn plaintext_len(header_len: u64, ciphertext_len: u64) -> Result<u64, AgeError> {
    let payload = ciphertext_len.checked_sub(header_len).ok_or_else(|| {
        AgeError::InvalidLength(format!("{ciphertext_len} bytes is shorter than the {header_len}-byte header"))
    })?;
    let chunks = payload.div_ceil(ENCRYPTED_CHUNK_SIZE);
    let last = payload - (chunks.saturating_sub(1)) * ENCRYPTED_CHUNK_SIZE;
    if chunks == 0 || last < TAG_SIZE || (last == TAG_SIZE && chunks > 1) {
        return Err(AgeError::InvalidLength(format!(
            "a {payload}-byte payload does not end with a whole chunk (chunks are 16 to {ENCRYPTED_CHUNK_SIZE} bytes)"
        )));
    }
    Ok(payload - chunks * TAG_SIZE)
}

/// What of an age file to read for a range of its plaintext (random access, chunk by chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The file offset to read from: the start of the first chunk needed.
    pub cipher_from: u64,
    /// Bytes to read from there: the chunks needed, and one byte more when the last of them is
    /// not the file's last chunk (that byte says it is not, so it opens as a middle chunk).
    pub cipher_len: u64,
    /// Index of the first chunk read.
    pub first_chunk: u64,
    /// Whether the read reaches the file's end (its last chunk is the file's last).
    pub reaches_end: bool,
    /// Plaintext bytes of the first chunk before the range.
    pub skip: u64,
    /// Plaintext bytes of the range (less than asked when the file ends first).
    pub take: u64,
}

/// The [`Window`] of plaintext `[from, from + len)` in an age file of `cipher_size` bytes whose
/// header is `header_len` bytes long.
pub fn window(header_len: u64, cipher_size: u64, from: u64, len: u64) -> Result<Window, AgeError> {
    let total = plaintext_len(header_len, cipher_size)?;
    let end = from.saturating_add(len).min(total);
    if end <= from {
        // Nothing to read: at or past the end.
        return Ok(Window { cipher_from: 0, cipher_len: 0, first_chunk: 0, reaches_end: false, skip: 0, take: 0 });
    }
    let last_of_file = total.saturating_sub(1) / CHUNK_SIZE;
    let first = from / CHUNK_SIZE;
    let last = (end - 1) / CHUNK_SIZE;
    let reaches_end = last >= last_of_file;
    let cipher_from = header_len + first * ENCRYPTED_CHUNK_SIZE;
    let cipher_to =
        if reaches_end { cipher_size } else { (header_len + (last + 1) * ENCRYPTED_CHUNK_SIZE + 1).min(cipher_size) };
    Ok(Window {
        cipher_from,
        cipher_len: cipher_to.saturating_sub(cipher_from),
        first_chunk: first,
        reaches_end,
        skip: from - first * CHUNK_SIZE,
        take: end - from,
    })
}

/// The plaintext range a [`Window`] was made for, from the `bytes` it names (read from the file),
/// each chunk authenticated as it opens.
pub fn read_window(key: &PayloadKey, header_len: u64, window: &Window, bytes: &[u8]) -> Result<Vec<u8>, AgeError> {
    if window.take == 0 {
        return Ok(Vec::new());
    }
    if bytes.len() as u64 != window.cipher_len {
        return Err(AgeError::Truncated(format!("read {} bytes of {}", bytes.len(), window.cipher_len)));
    }
    let mut decryptor = Decryptor::resume(key.clone(), header_len, window.first_chunk);
    let mut plain = decryptor.push(bytes)?;
    if window.reaches_end {
        plain.extend(decryptor.finish()?);
    }
    let skip = usize::try_from(window.skip).map_err(|_| AgeError::InvalidLength("skip".into()))?;
    let take = usize::try_from(window.take).map_err(|_| AgeError::InvalidLength("take".into()))?;
    plain
        .get(skip..skip.saturating_add(take))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| AgeError::Truncated(format!("the chunks read hold {} bytes, not {}", plain.len(), skip + take)))
}

/// Drops up to `skip` bytes from the front of `out[start..]`, counting them off `skip`.
fn drop_skipped(out: &mut Vec<u8>, start: usize, skip: &mut u64) {
    if *skip == 0 {
        return;
    }
    let available = out.len().saturating_sub(start);
    let dropped = usize::try_from(*skip).unwrap_or(usize::MAX).min(available);
    out.drain(start..start + dropped);
    *skip -= dropped as u64;
}

/// Streaming encryption of one file's payload (and header). Push plaintext in any sizes and get
/// ciphertext back; the last full chunk is held until more plaintext or [`Encryptor::finish`]
/// says whether it is the last. The whole state is this value: it serializes (the buffered
/// plaintext, at most 64 KiB, and the key as `secret_…` fields) and prints redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryptor {
    secret_payload_key: PayloadKey,
    /// Header bytes not yet emitted.
    #[serde(with = "base64_bytes")]
    header: Vec<u8>,
    /// Index of the next chunk to seal.
    chunk: u64,
    /// Plaintext of the next chunk, not yet sealed (at most one chunk): backup data in the clear.
    #[serde(with = "base64_bytes")]
    secret_plaintext: Vec<u8>,
    /// Output bytes still to drop (a resumed encryption's already-stored bytes).
    skip: u64,
    ended: bool,
}

impl Encryptor {
    /// An encryption from the start: its output begins with the header.
    pub fn new(envelope: &Envelope) -> Self {
        Encryptor {
            secret_payload_key: envelope.secret_payload_key.clone(),
            header: envelope.header.clone(),
            chunk: 0,
            secret_plaintext: Vec::new(),
            skip: 0,
            ended: false,
        }
    }

    /// An encryption resumed at `ciphertext_offset` (the bytes of the file already stored): push
    /// the plaintext from the returned [`ResumePoint::plaintext_offset`] on, and the output is
    /// exactly the file's bytes from `ciphertext_offset` on. The `skip` bytes are dropped here,
    /// not by the caller.
    pub fn resume(envelope: &Envelope, ciphertext_offset: u64) -> (Self, ResumePoint) {
        let point = resume_point(envelope.header_len(), ciphertext_offset);
        let mut encryptor = Encryptor::new(envelope);
        if ciphertext_offset >= envelope.header_len() {
            encryptor.header.clear();
        }
        encryptor.chunk = point.chunk;
        encryptor.skip = point.skip;
        (encryptor, point)
    }

    /// Index of the next chunk to seal.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Encrypts `plaintext`, returning the ciphertext it completes (possibly none).
    pub fn push(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, AgeError> {
        if self.ended {
            return Err(AgeError::Ended);
        }
        let mut out = Vec::with_capacity(plaintext.len() + self.header.len() + TAG_SIZE as usize);
        self.emit_header(&mut out);
        let mut input = plaintext;
        while !input.is_empty() {
            if self.secret_plaintext.len() == CHUNK {
                self.seal(&mut out, false)?;
            }
            let room = CHUNK - self.secret_plaintext.len().min(CHUNK);
            let (now, later) = input.split_at(room.min(input.len()));
            self.secret_plaintext.extend_from_slice(now);
            input = later;
        }
        Ok(out)
    }

    /// Seals the last chunk and ends the stream. After a resume at the very end of a file whose
    /// last chunk was full and stored, there is nothing left and the answer is empty.
    pub fn finish(&mut self) -> Result<Vec<u8>, AgeError> {
        if self.ended {
            return Err(AgeError::Ended);
        }
        let mut out = Vec::new();
        self.emit_header(&mut out);
        if self.chunk == 0 || !self.secret_plaintext.is_empty() {
            self.seal(&mut out, true)?;
        }
        self.ended = true;
        Ok(out)
    }

    fn emit_header(&mut self, out: &mut Vec<u8>) {
        if !self.header.is_empty() {
            let start = out.len();
            out.append(&mut self.header);
            drop_skipped(out, start, &mut self.skip);
        }
    }

    fn seal(&mut self, out: &mut Vec<u8>, last: bool) -> Result<(), AgeError> {
        let start = out.len();
        out.extend_from_slice(&self.secret_plaintext);
        let sealed = out.get_mut(start..).unwrap_or_default();
        let tag = self
            .secret_payload_key
            .cipher()
            .encrypt_inout_detached(&chunk_nonce(self.chunk, last), &[], InOutBuf::from(sealed))
            .map_err(|_| AgeError::InvalidArgument("ChaCha20-Poly1305 refused a chunk".into()))?;
        out.extend_from_slice(&tag);
        drop_skipped(out, start, &mut self.skip);
        self.secret_plaintext.clear();
        self.chunk = self.chunk.checked_add(1).ok_or(AgeError::InvalidArgument("too many chunks".into()))?;
        Ok(())
    }
}

impl fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encryptor")
            .field("secret_payload_key", &"[redacted]")
            .field("header_pending", &self.header.len())
            .field("chunk", &self.chunk)
            .field("secret_plaintext", &format_args!("[redacted; {} bytes]", self.secret_plaintext.len()))
            .field("skip", &self.skip)
            .field("ended", &self.ended)
            .finish()
    }
}

/// Encrypts a whole plaintext in one go (small files and tests).
pub fn encrypt(envelope: &Envelope, plaintext: &[u8]) -> Result<Vec<u8>, AgeError> {
    let mut encryptor = Encryptor::new(envelope);
    let mut out = encryptor.push(plaintext)?;
    out.extend(encryptor.finish()?);
    Ok(out)
}

/// One stanza of a parsed header.
struct Stanza<'a> {
    kind: &'a str,
    args: Vec<&'a str>,
    body: Vec<u8>,
}

/// A complete header, as read.
struct ParsedHeader<'a> {
    stanzas: Vec<Stanza<'a>>,
    /// The bytes the MAC covers: up to and including `---`.
    mac_input: &'a [u8],
    mac: Vec<u8>,
    nonce: [u8; NONCE_SIZE],
    /// Header length, nonce included.
    len: usize,
}

fn malformed(why: impl Into<String>) -> AgeError {
    AgeError::MalformedHeader(why.into())
}

/// The line starting at `at` (without its `\n`) and where the next starts, if it is complete.
fn line_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(at..)?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    Some((rest.get(..end)?, at + end + 1))
}

fn decode_b64(text: &[u8], what: &str) -> Result<Vec<u8>, AgeError> {
    STANDARD_NO_PAD.decode(text).map_err(|_| malformed(format!("{what} is not canonical unpadded base64")))
}

/// Reads a header from the start of a file: `Ok(None)` while `bytes` ends before the header
/// (nonce included) does.
fn parse_header(bytes: &[u8]) -> Result<Option<ParsedHeader<'_>>, AgeError> {
    let seen = bytes.len().min(VERSION_LINE.len());
    if bytes.get(..seen) != VERSION_LINE.get(..seen) {
        return Err(if bytes.starts_with(b"-----BEGIN") {
            malformed("an ASCII-armored (PEM) age file; Ferry reads the binary format only")
        } else if bytes.starts_with(b"age-encryption.org/") {
            malformed("an age format version other than v1")
        } else {
            malformed("not an age file (no age-encryption.org/v1 line)")
        });
    }
    let incomplete = || {
        if bytes.len() >= MAX_HEADER_LEN {
            Err(malformed(format!("no end of header in the first {MAX_HEADER_LEN} bytes")))
        } else {
            Ok(None)
        }
    };
    let mut at = VERSION_LINE.len();
    let mut stanzas = Vec::new();
    loop {
        let Some((line, next)) = line_at(bytes, at) else { return incomplete() };
        if let Some(mac_text) = line.strip_prefix(b"---") {
            if stanzas.is_empty() {
                return Err(malformed("no recipient stanza"));
            }
            let mac_text = mac_text.strip_prefix(b" ").ok_or_else(|| malformed("the MAC line is not `--- <mac>`"))?;
            let mac = decode_b64(mac_text, "the header MAC")?;
            if mac.len() != 32 {
                return Err(malformed("the header MAC is not 32 bytes"));
            }
            let Some(nonce) = bytes.get(next..next + NONCE_SIZE) else {
                return incomplete();
            };
            let nonce: [u8; NONCE_SIZE] = nonce.try_into().map_err(|_| malformed("short nonce"))?;
            let mac_input = bytes.get(..at + 3).ok_or_else(|| malformed("internal: MAC input"))?;
            return Ok(Some(ParsedHeader { stanzas, mac_input, mac, nonce, len: next + NONCE_SIZE }));
        }
        let Some(args) = line.strip_prefix(b"-> ") else {
            return Err(malformed("a line that is neither a stanza (`-> `) nor the MAC line (`--- `)"));
        };
        let args = std::str::from_utf8(args).map_err(|_| malformed("a stanza argument is not ASCII"))?;
        let args: Vec<&str> = args.split(' ').collect();
        if args.iter().any(|a| a.is_empty() || !a.bytes().all(|b| (0x21..=0x7e).contains(&b))) {
            return Err(malformed("a stanza argument is empty or not printable ASCII"));
        }
        let Some((&kind, args)) = args.split_first() else { return Err(malformed("a stanza with no type")) };
        at = next;
        let mut text = Vec::new();
        loop {
            let Some((line, next)) = line_at(bytes, at) else { return incomplete() };
            if line.len() > BODY_COLUMNS {
                return Err(malformed("a stanza body line is longer than 64 columns"));
            }
            text.extend_from_slice(line);
            at = next;
            if line.len() < BODY_COLUMNS {
                break;
            }
        }
        let body = decode_b64(&text, "a stanza body")?;
        stanzas.push(Stanza { kind, args: args.to_vec(), body });
    }
}

/// Streaming decryption of one file's payload. [`Decryptor::open`] reads the header; then push
/// the ciphertext that follows it in any sizes and get the authenticated plaintext back; the
/// last chunk is known at [`Decryptor::finish`]. The state serializes (key as a `secret_…`
/// field, at most one chunk of ciphertext buffered) and prints redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decryptor {
    secret_payload_key: PayloadKey,
    header_len: u64,
    /// Index of the next chunk to open.
    chunk: u64,
    /// Ciphertext of the next chunk (at most one sealed chunk).
    #[serde(with = "base64_bytes")]
    ciphertext: Vec<u8>,
    ended: bool,
}

impl Decryptor {
    /// Reads the header at the start of `file_start` with these identities: `Ok(None)` while
    /// more bytes are needed (call again with a longer prefix; refused past
    /// [`MAX_HEADER_LEN`]). The payload starts at [`Decryptor::header_len`]: push
    /// `file_start[header_len..]` next.
    pub fn open(identities: &[Identity], file_start: &[u8]) -> Result<Option<Self>, AgeError> {
        let Some(header) = parse_header(file_start)? else { return Ok(None) };
        if header.stanzas.len() > 1 && header.stanzas.iter().any(|s| s.kind == "scrypt") {
            return Err(malformed("an scrypt stanza must be the only one"));
        }
        let mut file_key = None;
        let mut x25519_seen = false;
        for stanza in header.stanzas.iter().filter(|s| s.kind == "X25519") {
            x25519_seen = true;
            let [share] = stanza.args.as_slice() else {
                return Err(malformed("an X25519 stanza has one argument"));
            };
            let share: [u8; 32] = decode_b64(share.as_bytes(), "an X25519 share")?
                .try_into()
                .map_err(|_| malformed("an X25519 share is not 32 bytes"))?;
            if stanza.body.len() != 32 {
                return Err(malformed("an X25519 stanza body is not 32 bytes"));
            }
            if file_key.is_some() {
                continue;
            }
            for identity in identities {
                let shared = identity.0.diffie_hellman(&PublicKey::from(share));
                if !shared.was_contributory() {
                    return Err(malformed("an X25519 share is a low-order point"));
                }
                let key = wrap_key(shared.as_bytes(), &share, identity.to_recipient().as_bytes())?;
                let mut body = stanza.body.clone();
                let (wrapped, tag) = body.split_at_mut(16);
                let tag = Tag::try_from(&*tag).map_err(|_| malformed("internal: tag"))?;
                let opened = ChaCha20Poly1305::new(&key.into()).decrypt_inout_detached(
                    &Nonce::default(),
                    &[],
                    InOutBuf::from(&mut *wrapped),
                    &tag,
                );
                if opened.is_ok() {
                    let key: [u8; 16] = wrapped.try_into().map_err(|_| malformed("internal: file key"))?;
                    file_key = Some(key);
                    break;
                }
            }
        }
        let Some(file_key) = file_key else {
            if x25519_seen {
                return Err(AgeError::NoMatchingIdentity);
            }
            let mut kinds: Vec<&str> = header.stanzas.iter().map(|s| s.kind).collect();
            kinds.dedup();
            return Err(AgeError::UnsupportedStanza(kinds.join(", ")));
        };
        header_mac(&file_key, header.mac_input)?.verify_slice(&header.mac).map_err(|_| AgeError::BadHeaderMac)?;
        Ok(Some(Decryptor::resume(payload_key(&file_key, &header.nonce), header.len as u64, 0)))
    }

    /// A decryption resumed at the start of chunk `chunk`: push the file's bytes from
    /// [`Decryptor::ciphertext_offset`] on; the plaintext continues at
    /// [`Decryptor::plaintext_offset`].
    pub fn resume(payload_key: PayloadKey, header_len: u64, chunk: u64) -> Self {
        Decryptor { secret_payload_key: payload_key, header_len, chunk, ciphertext: Vec::new(), ended: false }
    }

    /// The header's length, nonce included: where the payload starts.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// The payload key, to persist for [`Decryptor::resume`].
    pub fn payload_key(&self) -> &PayloadKey {
        &self.secret_payload_key
    }

    /// Index of the next chunk to open: a resume point.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The file offset where chunk [`Decryptor::chunk`] starts.
    pub fn ciphertext_offset(&self) -> u64 {
        self.header_len.saturating_add(self.chunk.saturating_mul(ENCRYPTED_CHUNK_SIZE))
    }

    /// The plaintext offset where chunk [`Decryptor::chunk`] starts.
    pub fn plaintext_offset(&self) -> u64 {
        self.chunk.saturating_mul(CHUNK_SIZE)
    }

    /// Opens the chunks `ciphertext` completes, returning their plaintext (possibly none).
    pub fn push(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, AgeError> {
        if self.ended {
            return Err(AgeError::Ended);
        }
        let mut out = Vec::with_capacity(ciphertext.len());
        let mut input = ciphertext;
        while !input.is_empty() {
            if self.ciphertext.len() == SEALED_CHUNK {
                // More follows a full chunk, so it is not the last.
                if let Err(e) = self.open_chunk(&mut out, false) {
                    let error = if self.open_chunk(&mut Vec::new(), true).is_ok() { AgeError::TrailingData } else { e };
                    self.ended = true;
                    return Err(error);
                }
            }
            let room = SEALED_CHUNK - self.ciphertext.len().min(SEALED_CHUNK);
            let (now, later) = input.split_at(room.min(input.len()));
            self.ciphertext.extend_from_slice(now);
            input = later;
        }
        Ok(out)
    }

    /// Opens the last chunk and ends the stream; refuses a file cut short.
    pub fn finish(&mut self) -> Result<Vec<u8>, AgeError> {
        if self.ended {
            return Err(AgeError::Ended);
        }
        self.ended = true;
        let mut out = Vec::new();
        let len = self.ciphertext.len() as u64;
        if len < TAG_SIZE {
            return Err(AgeError::Truncated(if len == 0 && self.chunk == 0 {
                "no payload".into()
            } else if len == 0 {
                format!("it ends after chunk {} without its last chunk", self.chunk - 1)
            } else {
                format!("chunk {} is shorter than its tag", self.chunk)
            }));
        }
        let chunk = self.chunk;
        if let Err(e) = self.open_chunk(&mut out, true) {
            if len == ENCRYPTED_CHUNK_SIZE && self.open_chunk(&mut Vec::new(), false).is_ok() {
                return Err(AgeError::Truncated(format!("it ends after chunk {chunk} without its last chunk")));
            }
            return Err(e);
        }
        if out.is_empty() && self.chunk > 1 {
            return Err(AgeError::MalformedPayload("an empty last chunk after a full one".into()));
        }
        Ok(out)
    }

    /// Opens the buffered chunk into `out` (advancing the counter), or leaves all as it was.
    fn open_chunk(&mut self, out: &mut Vec<u8>, last: bool) -> Result<(), AgeError> {
        let split = self.ciphertext.len().saturating_sub(TAG_SIZE as usize);
        let (sealed, tag) = self.ciphertext.split_at(split);
        let tag = Tag::try_from(tag).map_err(|_| AgeError::ChunkAuthentication(self.chunk))?;
        let start = out.len();
        out.extend_from_slice(sealed);
        let opened = out.get_mut(start..).unwrap_or_default();
        let result = self.secret_payload_key.cipher().decrypt_inout_detached(
            &chunk_nonce(self.chunk, last),
            &[],
            InOutBuf::from(opened),
            &tag,
        );
        if result.is_err() {
            out.truncate(start);
            return Err(AgeError::ChunkAuthentication(self.chunk));
        }
        self.ciphertext.clear();
        self.chunk = self.chunk.checked_add(1).ok_or(AgeError::MalformedPayload("too many chunks".into()))?;
        Ok(())
    }
}

impl fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decryptor")
            .field("secret_payload_key", &"[redacted]")
            .field("header_len", &self.header_len)
            .field("chunk", &self.chunk)
            .field("ciphertext", &self.ciphertext.len())
            .field("ended", &self.ended)
            .finish()
    }
}

/// Decrypts a whole file in one go (small files and tests).
pub fn decrypt(identities: &[Identity], file: &[u8]) -> Result<Vec<u8>, AgeError> {
    let Some(mut decryptor) = Decryptor::open(identities, file)? else {
        return Err(AgeError::Truncated("the header is cut short".into()));
    };
    let payload = file.get(usize::try_from(decryptor.header_len()).unwrap_or(usize::MAX)..).unwrap_or_default();
    let mut out = decryptor.push(payload)?;
    out.extend(decryptor.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests;
