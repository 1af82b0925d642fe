//! Responses every public handler builds: JSON bodies, empty and whole
//! bodies, and FC's error shape. Handlers import this module (and domain
//! modules), never each other.

use http::{header, Response, StatusCode};
use kiln_core::FcError;
/// Bodies and JSON / 204 answers: the internal API's builders, the same
/// for public handlers.
pub use kiln_internal_api::server::{empty, full, json, no_content, Body};

/// Code zips are streamed in chunks of this size.
const CHUNK: usize = 256 * 1024;

/// A zip file streamed as a 200 answer (its length when known).
pub async fn zip_file(path: &std::path::Path) -> std::io::Result<Response<Body>> {
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncReadExt as _;
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok(http_body::Frame::data(bytes::Bytes::from(buf))),
                    Some(file),
                ))
            }
            Err(e) => Some((
                Err(Box::new(e) as kiln_internal_api::server::BoxError),
                None,
            )),
        }
    });
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/zip");
    if let Some(len) = len {
        b = b.header(header::CONTENT_LENGTH, len);
    }
    Ok(b.body(http_body_util::StreamBody::new(chunks).boxed())
        .expect("valid response"))
}

/// FC's request id header, on every public answer.
pub const REQUEST_ID: &str = "x-fc-request-id";

/// FC's public error answer, `{"Code","Message","RequestId"}` with FC's
/// status. Internal detail ([`kiln_core::FcErrorKind`]) is not shown.
pub fn fc_error(err: &FcError, request_id: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY))
        .header(header::CONTENT_TYPE, "application/json")
        .header(REQUEST_ID, request_id)
        .body(full(err.to_body(request_id)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kiln_core::{FcErrorCode, FcErrorKind};

    #[tokio::test]
    async fn public_errors_have_fcs_shape_and_no_kind() {
        let e = FcError::new(FcErrorCode::FunctionNotStarted, "init")
            .with_kind(FcErrorKind::Initialization);
        let resp = fc_error(&e, "r-1");
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[REQUEST_ID], "r-1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"Code": "FunctionNotStarted", "Message": "init", "RequestId": "r-1"})
        );
    }

    #[tokio::test]
    async fn json_answers_say_so() {
        let resp = json(StatusCode::CREATED, &serde_json::json!({"a": 1}));
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"a":1}"#);
        assert_eq!(no_content().status(), StatusCode::NO_CONTENT);
    }
}
