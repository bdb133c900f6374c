//! Serde helpers for configuration fields, shared by the config and every provider's settings.
//!
//! Each setting type derives `Deserialize` and uses these for what plain serde does not check:
//! trimmed non-empty text, secret *names* (never secrets), http(s) URLs, whole numbers within
//! bounds, and numbers written in a unit (`_mib`, `_ms`, `_seconds`, `_minutes`) that the code
//! holds as bytes or a [`Duration`]. What no field can check alone (one field against another)
//! is a `check` method returning a [`FieldError`]; the config adds the source's name.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serializer};
use serde_path_to_error::Segment;
use url::Url;

/// A problem with one field, before the config names the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path inside the source table (`retry.max_delay_ms`).
    pub field: String,
    /// What is wrong, as a predicate (`is required`, `must be …`).
    pub problem: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }

    /// The same problem, seen from the table that holds `table` (`max_delay_ms` → `retry.max_delay_ms`).
    pub fn within(mut self, table: &str) -> Self {
        self.field = format!("{table}.{}", self.field);
        self
    }
}

/// The field names a derived `Deserialize` struct accepts (read from the derive itself, so a
/// table can be split between several structs without repeating their field lists).
pub fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// A string, trimmed; empty is refused.
pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    match s.trim() {
        "" => Err(de::Error::custom("must not be empty")),
        t => Ok(t.to_string()),
    }
}

/// An optional [`text`].
pub fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Trimmed>::deserialize(d).map(|o| o.map(|t| t.0))
}

/// An array of [`text`]s.
pub fn texts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<Trimmed>::deserialize(d)
        .map(|v| v.into_iter().map(|t| t.0).collect())
        .map_err(|_| de::Error::custom("must be an array of non-empty strings"))
}

struct Trimmed(String);

impl<'de> Deserialize<'de> for Trimmed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d).map(Trimmed)
    }
}

/// The name of a Worker secret: letters, digits and `_`. A value that looks like anything else
/// is most likely the secret itself pasted into the config, and is refused.
pub fn secret_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = text(d)?;
    if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(name)
    } else {
        Err(de::Error::custom("must be the name of a Worker secret (letters, digits, '_'), not the secret itself"))
    }
}

/// An optional [`secret_name`].
pub fn opt_secret_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Name(String);
    impl<'de> Deserialize<'de> for Name {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            secret_name(d).map(Name)
        }
    }
    Option::<Name>::deserialize(d).map(|o| o.map(|n| n.0))
}

/// An `http://` or `https://` URL with a host.
pub fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let s = text(d)?;
    let url = Url::parse(&s).map_err(|e| de::Error::custom(format!("is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(de::Error::custom("must be an http:// or https:// URL"));
    }
    Ok(url)
}

/// An optional [`http_url`].
pub fn opt_http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    struct Http(Url);
    impl<'de> Deserialize<'de> for Http {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            http_url(d).map(Http)
        }
    }
    Option::<Http>::deserialize(d).map(|o| o.map(|h| h.0))
}

/// A URL that is a constant of the code (a provider's public endpoint).
pub fn constant_url(url: &'static str, field: &str) -> Result<Url, FieldError> {
    Url::parse(url).map_err(|e| FieldError::new(field, format!("has no valid default ({e})")))
}

/// A whole number from `MIN` to `MAX`.
fn bounded<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<u64, D::Error> {
    struct Bounded<const MIN: u64, const MAX: u64>(PhantomData<()>);

    impl<const MIN: u64, const MAX: u64> Visitor<'_> for Bounded<MIN, MAX> {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number from {MIN} to {MAX}")
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            if (MIN..=MAX).contains(&n) {
                Ok(n)
            } else {
                Err(E::custom(format!("must be a whole number from {MIN} to {MAX} (got {n})")))
            }
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!("must be a whole number from {MIN} to {MAX} (got {n})"))),
            }
        }
    }

    d.deserialize_u64(Bounded::<MIN, MAX>(PhantomData))
}

/// A count from `MIN` to `MAX` (both within `u32`).
pub fn count<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<u32, D::Error> {
    let n = bounded::<D, MIN, MAX>(d)?;
    u32::try_from(n).map_err(|_| de::Error::custom("is too large"))
}

/// Mebibytes from `MIN` to `MAX`, held as bytes.
pub fn mib<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<u64, D::Error> {
    bounded::<D, MIN, MAX>(d).map(|n| n << 20)
}

/// Bytes written back as mebibytes.
pub fn ser_mib<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(bytes >> 20)
}

/// Milliseconds from `MIN` to `MAX`.
pub fn millis<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<Duration, D::Error> {
    bounded::<D, MIN, MAX>(d).map(Duration::from_millis)
}

/// Optional [`millis`].
pub fn opt_millis<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    struct Ms<const MIN: u64, const MAX: u64>(Duration);
    impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Ms<MIN, MAX> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            millis::<D, MIN, MAX>(d).map(Ms)
        }
    }
    Option::<Ms<MIN, MAX>>::deserialize(d).map(|o| o.map(|m| m.0))
}

/// A duration written back as milliseconds.
pub fn ser_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds from `MIN` to `MAX`.
pub fn secs<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<Duration, D::Error> {
    bounded::<D, MIN, MAX>(d).map(Duration::from_secs)
}

/// A duration written back as seconds.
pub fn ser_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// Minutes from `MIN` to `MAX`.
pub fn minutes<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(d: D) -> Result<Duration, D::Error> {
    bounded::<D, MIN, MAX>(d).map(|m| Duration::from_secs(60 * m))
}

/// Optional [`minutes`].
pub fn opt_minutes<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    struct Min<const MIN: u64, const MAX: u64>(Duration);
    impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Min<MIN, MAX> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            minutes::<D, MIN, MAX>(d).map(Min)
        }
    }
    Option::<Min<MIN, MAX>>::deserialize(d).map(|o| o.map(|m| m.0))
}

/// An optional duration written back as minutes.
pub fn ser_opt_minutes<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(d.as_secs() / 60),
        None => s.serialize_none(),
    }
}

/// A duration written back as minutes.
pub fn ser_minutes<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs() / 60)
}

/// Whether `name` is a valid name for a source or an alert destination: 1-63 characters of
/// a-z, 0-9, `-`, `_` or `.`, starting with a letter or digit.
pub(crate) fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

/// A serde error as the field it is about and what is wrong with it.
pub(crate) fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let mut path = String::new();
    for segment in e.path().iter() {
        match segment {
            Segment::Map { key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    let message = e.into_inner().to_string();
    let named = |prefix: &str| {
        let rest = message.strip_prefix(prefix)?;
        let name = &rest[..rest.find('`')?];
        let own = path.rsplit('.').next() == Some(name);
        Some(match (own, path.is_empty()) {
            (true, _) => path.clone(),
            (false, true) => name.to_string(),
            (false, false) => format!("{path}.{name}"),
        })
    };
    if let Some(field) = named("unknown field `") {
        return FieldError::new(field, "is not a known field");
    }
    if let Some(field) = named("missing field `") {
        return FieldError::new(field, "is required");
    }
    let problem = if ["must ", "is ", "cannot "].iter().any(|p| message.starts_with(p)) {
        message
    } else if message.starts_with("not ") {
        format!("is {message}")
    } else if message.starts_with("invalid ") || message.starts_with("unknown ") {
        format!("has an {message}")
    } else {
        format!("is invalid: {message}")
    };
    FieldError::new(path, problem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: u32,
        #[serde(rename = "b_ms")]
        b: u32,
    }

    #[test]
    fn struct_fields_reads_the_derives_field_names() {
        assert_eq!(struct_fields::<Two>(), ["a", "b_ms"]);
    }

    #[derive(Debug, Deserialize)]
    struct Knobs {
        #[serde(deserialize_with = "mib::<_, 5, 32>")]
        part: u64,
        #[serde(default, deserialize_with = "opt_secret_name")]
        secret: Option<String>,
        #[serde(default, deserialize_with = "opt_http_url")]
        url: Option<Url>,
    }

    fn knobs(v: serde_json::Value) -> Result<Knobs, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn bounds_units_secret_names_and_urls_are_checked() {
        let k = knobs(json!({"part": 8, "secret": " D1_TOKEN ", "url": "https://x.io/a"})).unwrap();
        assert_eq!(
            (k.part, k.secret.as_deref(), k.url.map(String::from)),
            (8 << 20, Some("D1_TOKEN"), Some("https://x.io/a".into()))
        );
        assert!(knobs(json!({"part": 4})).unwrap_err().contains("from 5 to 32"));
        assert!(knobs(json!({"part": -1})).unwrap_err().contains("from 5 to 32"));
        assert!(knobs(json!({"part": "8"})).unwrap_err().contains("expected a whole number from 5 to 32"));
        assert!(knobs(json!({"part": 8, "secret": "Bearer x.y"})).unwrap_err().contains("not the secret itself"));
        assert!(knobs(json!({"part": 8, "url": "ftp://x"})).unwrap_err().contains("http:// or https://"));
        assert!(knobs(json!({"part": 8, "url": "not a url"})).unwrap_err().contains("not a valid URL"));
    }
}
