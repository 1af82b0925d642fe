//! Randomised garbage in the signature headers, date, path and query never
//! panics and never authenticates.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};
use kiln_auth::{sign, AccessKey, InMemoryKeys, RequestView, SigningParams, Verifier};
use kiln_core::ManualClock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NOW: u64 = 1_764_000_000_000;

const FRAGMENTS: &[&str] = &[
    "ACS3-HMAC-SHA256",
    "ACS3-HMAC-SM3",
    " ",
    ",",
    ";",
    "=",
    "Credential=",
    "LTAIgarbage",
    "SignedHeaders=",
    "host",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
    "content-type",
    "Signature=",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "zz",
    "%",
    "\t",
    "\u{e9}",
    "2024-02-29T12:34:56Z",
    "9999-99-99T99:99:99Z",
    "T",
    "Z",
    ".",
    "0",
];

fn garbage(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(0..12) {
        if rng.gen_bool(0.8) {
            out.extend_from_slice(FRAGMENTS[rng.gen_range(0..FRAGMENTS.len())].as_bytes());
        } else {
            for _ in 0..rng.gen_range(1..6) {
                out.push(rng.gen());
            }
        }
    }
    out
}

fn header_value(rng: &mut StdRng) -> Option<HeaderValue> {
    HeaderValue::from_bytes(&garbage(rng)).ok()
}

#[test]
fn garbage_never_panics_or_authenticates() {
    let keys = InMemoryKeys::new();
    keys.insert(AccessKey {
        account_id: "1".parse().unwrap(),
        access_key_id: "LTAIgarbage".into(),
        secret: "secret".into(),
    });
    let clock = ManualClock::new(NOW);
    let v = Verifier::new(Arc::new(keys), Arc::new(clock.clone()));
    let mut rng = StdRng::seed_from_u64(0x6b696c6e);

    // Start from a valid request and corrupt parts of it.
    let method = Method::POST;
    let base_uri: Uri = "http://h:1/2023-03-30/functions/f/invocations?a=1"
        .parse()
        .unwrap();
    let mut base = HeaderMap::new();
    sign(
        &method,
        &base_uri,
        &mut base,
        b"x",
        &SigningParams::new("LTAIgarbage", "secret", NOW, "n"),
    )
    .unwrap();

    let mut rejected = 0;
    for _ in 0..5000 {
        let mut headers = base.clone();
        let mut uri = base_uri.clone();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..8) {
                0 => {
                    if let Some(v) = header_value(&mut rng) {
                        headers.insert("authorization", v);
                    }
                }
                1 => {
                    if let Some(v) = header_value(&mut rng) {
                        headers.insert("x-acs-date", v);
                    }
                }
                2 => {
                    if let Some(v) = header_value(&mut rng) {
                        headers.append("x-acs-signature-nonce", v);
                    }
                }
                3 => {
                    if let Some(v) = header_value(&mut rng) {
                        headers.insert("x-acs-content-sha256", v);
                    }
                }
                4 => {
                    let name = [
                        "authorization",
                        "x-acs-date",
                        "host",
                        "x-acs-signature-nonce",
                    ][rng.gen_range(0..4)];
                    headers.remove(name);
                }
                5 => {
                    let raw = garbage(&mut rng);
                    let q: String = raw
                        .iter()
                        .map(|&b| {
                            if b.is_ascii_graphic() && b != b'#' {
                                b as char
                            } else {
                                '%'
                            }
                        })
                        .collect();
                    if let Ok(u) = format!("/p?{q}").parse() {
                        uri = u;
                    }
                }
                6 => {
                    if let Some(v) = header_value(&mut rng) {
                        headers.append("host", v);
                    }
                }
                _ => clock.set(rng.gen()),
            }
        }
        let result = v.verify(RequestView::new(&method, &uri, &headers), b"x");
        // Only an untouched request (after a clock move back into range) may pass, once.
        if result.is_err() {
            rejected += 1;
        }
        clock.set(NOW);
    }
    // The base nonce can be accepted at most once across all iterations.
    assert!(rejected >= 4999, "rejected {rejected}");
}
