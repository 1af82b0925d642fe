//! The canonical request, fed straight into SHA-256 so that verifying a
//! request allocates nothing unless it has a query string, a multi-valued
//! signed header or a non-ASCII header value.

use std::borrow::Cow;

use http::HeaderMap;
use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// Python's `quote(value, safe='~')` and Node's `encodeURIComponent` plus
/// `!'()*`: everything but RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A signed header that the request does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MissingSignedHeader(pub String);

/// The parts of a request that the canonical request covers.
pub(crate) struct CanonicalInput<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Used for `host` when the request has no Host header (HTTP/2 `:authority`).
    pub authority: Option<&'a str>,
    /// Lower-case names joined by `;`, exactly as they appear in `Authorization`.
    pub signed_headers: &'a str,
    /// Lower-case hex SHA-256 of the body, as sent in `x-acs-content-sha256`.
    pub payload_hex: &'a str,
}

/// SHA-256 of the canonical request.
pub(crate) fn digest(input: &CanonicalInput<'_>) -> Result<[u8; 32], MissingSignedHeader> {
    let mut h = Sha256::new();
    h.update(input.method.as_bytes());
    h.update(b"\n");
    h.update(
        if input.path.is_empty() {
            "/"
        } else {
            input.path
        }
        .as_bytes(),
    );
    h.update(b"\n");
    if let Some(q) = input.query {
        canonical_query(q, &mut h);
    }
    h.update(b"\n");
    for name in input.signed_headers.split(';') {
        h.update(name.as_bytes());
        h.update(b":");
        canonical_header_value(name, input, &mut h)?;
        h.update(b"\n");
    }
    h.update(b"\n");
    h.update(input.signed_headers.as_bytes());
    h.update(b"\n");
    h.update(input.payload_hex.as_bytes());
    Ok(h.finalize().into())
}

/// Query parameters as the SDKs sign them: decoded from the wire (both
/// `application/x-www-form-urlencoded` from Python's `urlencode` and RFC 3986
/// from Node's `querystring`), sorted by key, key verbatim, value re-encoded.
fn canonical_query(query: &str, h: &mut Sha256) {
    for (i, (k, v)) in sorted_pairs(query).iter().enumerate() {
        if i > 0 {
            h.update(b"&");
        }
        h.update(k);
        h.update(b"=");
        for chunk in percent_encode(v, QUERY_VALUE) {
            h.update(chunk.as_bytes());
        }
    }
}

type QueryPair<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

fn sorted_pairs(query: &str) -> Vec<QueryPair<'_>> {
    let mut pairs: Vec<QueryPair<'_>> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect();
    pairs.sort();
    pairs
}

fn form_decode(s: &str) -> Cow<'_, [u8]> {
    if s.contains('+') {
        let plus: Vec<u8> = s
            .bytes()
            .map(|b| if b == b'+' { b' ' } else { b })
            .collect();
        Cow::Owned(percent_decode(&plus).collect())
    } else {
        percent_decode(s.as_bytes()).into()
    }
}

fn canonical_header_value(
    name: &str,
    input: &CanonicalInput<'_>,
    h: &mut Sha256,
) -> Result<(), MissingSignedHeader> {
    let mut values = input.headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => match (name, input.authority) {
            ("host", Some(authority)) => h.update(trim(authority).as_bytes()),
            _ => return Err(MissingSignedHeader(name.to_owned())),
        },
        (Some(one), None) => h.update(trim(&latin1(one.as_bytes())).as_bytes()),
        (Some(first), Some(second)) => {
            let mut all: Vec<String> = [first, second]
                .into_iter()
                .chain(values)
                .map(|v| trim(&latin1(v.as_bytes())).to_owned())
                .collect();
            all.sort();
            h.update(all.join(",").as_bytes());
        }
    }
    Ok(())
}

/// Header bytes as the SDKs' strings: Python's http.client and Node's http
/// both put a header string on the wire as Latin-1, so each byte is one
/// character and the signer hashed its UTF-8 encoding.
fn latin1(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.is_ascii() => Cow::Borrowed(s),
        _ => Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
    }
}

/// Python's `str.strip()` over the characters a Latin-1 header can hold.
fn trim(s: &str) -> &str {
    s.trim_matches(|c: char| {
        matches!(
            c,
            '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | '\u{1c}'
                ..='\u{1f}' | ' ' | '\u{85}' | '\u{a0}'
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_string(q: &str) -> String {
        // The canonical query as a string, for inspection.
        sorted_pairs(q)
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    percent_encode(v, QUERY_VALUE)
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    #[test]
    fn query_is_decoded_sorted_and_reencoded() {
        // Python's urlencode (quote_plus) and Node's querystring give the same canonical form.
        let py = "limit=5&nextToken=tok%3Den%2B%2F%C3%A4&prefix=hello+py%2F~%2A%2B";
        let node = "prefix=hello%20py%2F~*%2B&limit=5&nextToken=tok%3Den%2B%2F%C3%A4";
        let want = "limit=5&nextToken=tok%3Den%2B%2F%C3%A4&prefix=hello%20py%2F~%2A%2B";
        assert_eq!(query_string(py), want);
        assert_eq!(query_string(node), want);
        assert_eq!(query_string("b&a="), "a=&b=");
    }

    #[test]
    fn latin1_and_trim_follow_python() {
        assert_eq!(latin1(b"plain"), "plain");
        assert_eq!(latin1(&[b'h', 0xe9]), "h\u{e9}");
        assert_eq!(trim("\u{a0} a b \t"), "a b");
    }

    #[test]
    fn absent_signed_header_is_reported() {
        let headers = HeaderMap::new();
        let input = CanonicalInput {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            authority: None,
            signed_headers: "host;x-acs-date",
            payload_hex: "",
        };
        assert_eq!(digest(&input), Err(MissingSignedHeader("host".into())));
        let with_authority = CanonicalInput {
            authority: Some("example:1"),
            ..input
        };
        assert_eq!(
            digest(&with_authority),
            Err(MissingSignedHeader("x-acs-date".into()))
        );
    }
}
