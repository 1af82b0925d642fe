//! The internal (mTLS) listener: code packages and temporary credentials
//! for agents, health.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures_util::stream;
use http::{header, Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, RequestId};
use kiln_internal_api::router::{route, Route, Router};
use kiln_internal_api::server::{self, Body, BoxError, ConnInfo};
use tokio::io::AsyncReadExt;

use crate::catalog::Catalog;

const CHUNK: usize = 256 * 1024;

/// Every route of the internal listener.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Api {
    Health,
    /// `digest` is checked by the code store, which answers an unknown
    /// or malformed one as missing.
    Code {
        digest: String,
    },
    Credentials,
}

/// The internal listener's one route table.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(Method::GET, "/v1/health", |_| Ok(Api::Health)),
    route(Method::GET, "/v1/code/{digest}", |p| Ok(Api::Code { digest: p.string("digest")? })),
    route(Method::POST, "/v1/credentials", |_| Ok(Api::Credentials)),
];

static ROUTER: LazyLock<Router<Api>> = LazyLock::new(|| {
    Router::new(ROUTES).expect("the route table is valid (a unit test builds it)")
});

pub async fn handle(
    catalog: Arc<Catalog>,
    ram: Arc<crate::ram::Ram>,
    req: http::Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    let request_id = RequestId::generate();
    let mut resp = match ROUTER.route(req.method(), req.uri().path()) {
        Err(e) => server::error(&e, request_id.as_str()),
        Ok(Api::Health) => server::health(),
        Ok(Api::Code { digest }) => {
            tracing::debug!(peer = %conn.peer, digest, "code package requested");
            code(&catalog, &digest, &request_id).await
        }
        Ok(Api::Credentials) => credentials(&catalog, &ram, req, &request_id).await,
    };
    if let Ok(v) = http::HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert(super::respond::REQUEST_ID, v);
    }
    resp
}

async fn code(catalog: &Catalog, digest: &str, request_id: &RequestId) -> Response<Body> {
    let missing = || {
        server::error(
            &FcError::new(
                FcErrorCode::PathNotSupported,
                format!("code package {digest:?} does not exist"),
            ),
            request_id.as_str(),
        )
    };
    let Some(path) = catalog.code_files().path(digest) else {
        return missing();
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return missing(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot open code package");
            return server::error(
                &FcError::internal("cannot read the code package"),
                request_id.as_str(),
            );
        }
    };
    let len = file.metadata().await.map(|m| m.len()).ok();
    let chunks = stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), Some(file)))
            }
            Err(e) => Some((Err(Box::new(e) as BoxError), None)),
        }
    });
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/zip");
    if let Some(len) = len {
        b = b.header(header::CONTENT_LENGTH, len);
    }
    b.body(StreamBody::new(chunks).boxed())
        .expect("valid response")
}

/// An agent's `CredentialsRequest`: temporary credentials for the role of
/// an instance's function, or FC's error (no such function, role changed
/// or deleted).
async fn credentials(
    catalog: &Catalog,
    ram: &crate::ram::Ram,
    req: http::Request<Incoming>,
    request_id: &RequestId,
) -> Response<Body> {
    let msg: kiln_internal_api::CredentialsRequest =
        match server::read_json(req.into_body(), 16 * 1024).await {
            Ok(m) => m,
            Err(e) => return server::error(&e, request_id.as_str()),
        };
    match ram.issue(catalog, &msg) {
        Ok(c) => server::json(StatusCode::OK, &c),
        Err(e) => {
            tracing::warn!(function = %msg.function_name, instance_id = %msg.instance_id, error = %e, "temporary credentials refused");
            server::error(&e, request_id.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_core::FcErrorCode;

    use super::*;

    #[test]
    fn every_route_of_the_table_matches() {
        let at = |m: Method, p: &str| ROUTER.route(&m, p);
        assert_eq!(
            at(Method::GET, kiln_internal_api::paths::HEALTH).unwrap(),
            Api::Health
        );
        assert_eq!(
            at(Method::GET, "/v1/code/ab12").unwrap(),
            Api::Code {
                digest: "ab12".into()
            }
        );
        assert_eq!(
            at(Method::POST, kiln_internal_api::paths::CREDENTIALS).unwrap(),
            Api::Credentials
        );
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
        assert_eq!(
            at(Method::GET, "/v1/credentials").unwrap_err().code,
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            at(Method::GET, "/v1/code/a/b").unwrap_err().code,
            FcErrorCode::PathNotSupported
        );
        assert_eq!(
            at(Method::GET, "/v1/code/").unwrap_err().code,
            FcErrorCode::PathNotSupported
        );
    }
}
