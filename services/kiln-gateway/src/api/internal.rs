//! The internal (mTLS) listener: code packages and temporary credentials
//! for agents, the access key lifecycle for operators
//! ([`crate::access_keys`]; operator-only), health.

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
    ListKeys,
    CreateKey,
    DisableKey {
        id: String,
    },
    EnableKey {
        id: String,
    },
    DeleteKey {
        id: String,
    },
}

/// The internal listener's one route table.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(Method::GET, "/v1/health", |_| Ok(Api::Health)),
    route(Method::GET, "/v1/code/{digest}", |p| Ok(Api::Code { digest: p.string("digest")? })),
    route(Method::POST, "/v1/credentials", |_| Ok(Api::Credentials)),
    route(Method::GET, "/v1/keys", |_| Ok(Api::ListKeys)),
    route(Method::POST, "/v1/keys", |_| Ok(Api::CreateKey)),
    route(Method::POST, "/v1/keys/{id}/disable", |p| Ok(Api::DisableKey { id: p.string("id")? })),
    route(Method::POST, "/v1/keys/{id}/enable", |p| Ok(Api::EnableKey { id: p.string("id")? })),
    route(Method::DELETE, "/v1/keys/{id}", |p| Ok(Api::DeleteKey { id: p.string("id")? })),
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
        Ok(Api::ListKeys) => keys::list(&catalog, &request_id).await,
        Ok(Api::CreateKey) => keys::create(&catalog, req, &request_id).await,
        Ok(Api::DisableKey { id }) => keys::set_enabled(&catalog, &id, false, &request_id).await,
        Ok(Api::EnableKey { id }) => keys::set_enabled(&catalog, &id, true, &request_id).await,
        Ok(Api::DeleteKey { id }) => keys::delete(&catalog, &id, &request_id).await,
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

/// The operator's access key routes.
mod keys {
    use kiln_core::{Clock, FcError, FcErrorCode, RequestId, SystemClock};
    use kiln_internal_api::keys::{AccessKeyList, CreateAccessKey};
    use kiln_internal_api::server::{self, Body};

    use super::*;

    fn failed(e: crate::catalog::CatalogError, request_id: &RequestId) -> Response<Body> {
        tracing::error!(error = %e, "access key change failed");
        server::error(
            &FcError::internal("the access key store failed"),
            request_id.as_str(),
        )
    }

    fn unknown(id: &str, request_id: &RequestId) -> Response<Body> {
        let shown: String = id.chars().take(128).collect();
        server::error(
            &FcError::new(
                FcErrorCode::EntityNotExistAccessKey,
                format!("access key {shown:?} does not exist"),
            ),
            request_id.as_str(),
        )
    }

    pub(super) async fn list(catalog: &Catalog, request_id: &RequestId) -> Response<Body> {
        match catalog.list_keys().await {
            Ok(access_keys) => server::json(StatusCode::OK, &AccessKeyList { access_keys }),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn create(
        catalog: &Catalog,
        req: http::Request<Incoming>,
        request_id: &RequestId,
    ) -> Response<Body> {
        let msg: CreateAccessKey = match server::read_json(req.into_body(), 4 * 1024).await {
            Ok(m) => m,
            Err(e) => return server::error(&e, request_id.as_str()),
        };
        match catalog
            .create_key(msg.account_id, SystemClock.now_ms())
            .await
        {
            Ok(k) => server::json(StatusCode::OK, &k),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn set_enabled(
        catalog: &Catalog,
        id: &str,
        enabled: bool,
        request_id: &RequestId,
    ) -> Response<Body> {
        match catalog.set_key_enabled(id, enabled).await {
            Ok(Some(info)) => server::json(StatusCode::OK, &info),
            Ok(None) => unknown(id, request_id),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn delete(
        catalog: &Catalog,
        id: &str,
        request_id: &RequestId,
    ) -> Response<Body> {
        match catalog.delete_key(id).await {
            Ok(true) => server::no_content(),
            Ok(false) => unknown(id, request_id),
            Err(e) => failed(e, request_id),
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
        assert_eq!(at(Method::GET, "/v1/keys").unwrap(), Api::ListKeys);
        assert_eq!(at(Method::POST, "/v1/keys").unwrap(), Api::CreateKey);
        assert_eq!(
            at(
                Method::POST,
                &kiln_internal_api::keys::paths::disable("LTAI1")
            )
            .unwrap(),
            Api::DisableKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(
                Method::POST,
                &kiln_internal_api::keys::paths::enable("LTAI1")
            )
            .unwrap(),
            Api::EnableKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(
                Method::DELETE,
                &kiln_internal_api::keys::paths::access_key("LTAI1")
            )
            .unwrap(),
            Api::DeleteKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(Method::GET, "/v1/keys/LTAI1/disable").unwrap_err().code,
            FcErrorCode::MethodNotAllowed
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
