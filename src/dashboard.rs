//! The dashboard page served at `/`, and the headers that lock it down.
//!
//! One static HTML document with its CSS and JavaScript inline (`dashboard.html`): it holds no
//! data and needs no auth; it asks for the API token, keeps it in the tab's session storage and
//! reads the JSON API with `fetch`. The Content-Security-Policy allows exactly the page's own
//! inline `<script>` and `<style>` (by their SHA-256, computed here from the embedded text, so the
//! hashes can never drift from the page) and `fetch` to the Worker's own origin; nothing else
//! loads, and the page cannot be framed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The page.
pub const HTML: &str = include_str!("dashboard.html");

/// The response headers of the page, Content-Security-Policy first.
pub fn headers() -> Vec<(&'static str, String)> {
    vec![
        ("content-security-policy", content_security_policy(HTML)),
        ("content-type", "text/html; charset=utf-8".into()),
        ("x-content-type-options", "nosniff".into()),
        ("referrer-policy", "no-referrer".into()),
        ("x-frame-options", "DENY".into()),
        ("cache-control", "no-cache".into()),
        ("cross-origin-opener-policy", "same-origin".into()),
        ("permissions-policy", "camera=(), microphone=(), geolocation=(), payment=()".into()),
    ]
}

/// The policy for `html`: its inline script and style blocks by hash, the API on the same
/// origin, data: images (the empty favicon), and nothing else.
pub fn content_security_policy(html: &str) -> String {
    let hashes = |tag: &str| {
        inline_blocks(html, tag)
            .iter()
            .map(|b| format!("'sha256-{}'", STANDARD.encode(Sha256::digest(b))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The text inside each `<tag>…</tag>` of `html`, exactly as the browser hashes it.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut blocks = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        blocks.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str) -> String {
        headers().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).unwrap()
    }

    #[test]
    fn the_policy_allows_exactly_the_pages_own_script_and_style() {
        let scripts = inline_blocks(HTML, "script");
        let styles = inline_blocks(HTML, "style");
        assert_eq!((scripts.len(), styles.len()), (1, 1), "one inline script and one inline style");
        let csp = header("content-security-policy");
        let digest = |s: &str| format!("'sha256-{}'", STANDARD.encode(Sha256::digest(s)));
        assert!(csp.contains(&format!("script-src {};", digest(scripts[0]))), "{csp}");
        assert!(csp.contains(&format!("style-src {};", digest(styles[0]))), "{csp}");
        assert!(csp.starts_with("default-src 'none';") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        // A tag with attributes would not be hashed above, and would be blocked in the browser.
        assert_eq!(HTML.matches("<script").count(), 1);
        assert_eq!(HTML.matches("<style").count(), 1);
    }

    #[test]
    fn the_page_is_served_with_strict_headers() {
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("x-frame-options"), "DENY");
        assert!(header("content-type").starts_with("text/html"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_never_parses_data_as_html() {
        let loads = ["src=", "href=\"http", "href=\"//", "url(", "@import", "<iframe", "<object", "<embed"];
        let parses = ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"];
        for needle in loads.iter().chain(&parses) {
            assert!(!HTML.contains(needle), "the page contains {needle:?}");
        }
        // The token lives in session storage and travels only in the Authorization header.
        assert!(HTML.contains("sessionStorage") && !HTML.contains("localStorage"));
        assert!(HTML.contains("Authorization") && !HTML.contains("token="), "never in a URL");
    }

    #[test]
    fn inline_blocks_are_found_in_order_and_an_unclosed_one_is_ignored() {
        assert_eq!(inline_blocks("<p><style>a</style><style>b</style><style>c", "style"), ["a", "b"]);
        assert!(inline_blocks("", "script").is_empty());
    }
}
