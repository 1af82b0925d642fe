//! Build signed requests of the public API (ACS3-HMAC-SHA256, as the
//! official SDKs sign them).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use kiln_auth::SigningParams;

use crate::credentials::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Invalid request URI {uri}: {message}")]
    Uri { uri: String, message: String },
    #[error("Invalid header {0}")]
    Header(String),
    #[error("Cannot sign the request")]
    Sign(#[from] kiln_auth::SignError),
}

/// RFC 3986 query encoding (unreserved characters kept), as the SDKs send.
pub fn encode_query(query: &[(&str, &str)]) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const SET: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    query
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, SET),
                utf8_percent_encode(v, SET)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A complete signed request to `endpoint + path_and_query`.
pub fn signed_request(
    creds: &Credentials,
    method: Method,
    path_and_query: &str,
    headers: &[(String, String)],
    body: Bytes,
    action: Option<&str>,
) -> Result<Request<Full<Bytes>>, RequestError> {
    let uri_text = format!("{}{}", creds.endpoint.trim_end_matches('/'), path_and_query);
    let uri: Uri = uri_text
        .parse()
        .map_err(|e: http::uri::InvalidUri| RequestError::Uri {
            uri: uri_text.clone(),
            message: e.to_string(),
        })?;
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| RequestError::Header(k.clone()))?;
        let value = HeaderValue::from_str(v).map_err(|_| RequestError::Header(k.clone()))?;
        map.insert(name, value);
    }
    let nonce = kiln_auth::new_nonce();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut params =
        SigningParams::new(&creds.access_key_id, &creds.access_key_secret, now, &nonce);
    params.security_token = creds.security_token.as_deref();
    if let Some(a) = action {
        params = params.with_action(a);
    }
    kiln_auth::sign(&method, &uri, &mut map, &body, &params)?;
    let mut req = Request::builder().method(method).uri(uri);
    *req.headers_mut().expect("fresh builder") = map;
    req.body(Full::new(body)).map_err(|e| RequestError::Uri {
        uri: uri_text,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_rfc3986_encoded() {
        assert_eq!(
            encode_query(&[("prefix", "a b"), ("nextToken", "x/y~z")]),
            "prefix=a%20b&nextToken=x%2Fy~z"
        );
    }

    #[test]
    fn signed_requests_carry_fc_auth_headers() {
        let creds = Credentials {
            endpoint: "https://127.0.0.1:8443".into(),
            account_id: "1".into(),
            access_key_id: "ak".into(),
            access_key_secret: "sk".into(),
            ca_cert: "/dev/null".into(),
            security_token: None,
        };
        let req = signed_request(
            &creds,
            Method::POST,
            "/2023-03-30/functions",
            &[("content-type".into(), "application/json".into())],
            Bytes::from_static(b"{}"),
            Some("CreateFunction"),
        )
        .unwrap();
        let h = req.headers();
        for k in [
            "authorization",
            "x-acs-date",
            "x-acs-signature-nonce",
            "x-acs-content-sha256",
            "host",
        ] {
            assert!(h.contains_key(k), "{k} missing");
        }
        assert!(h["authorization"]
            .to_str()
            .unwrap()
            .starts_with("ACS3-HMAC-SHA256 Credential=ak,"));
    }
}
