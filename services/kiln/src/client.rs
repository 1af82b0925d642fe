//! A signed client of Kiln's public FC API, for the CLI, tests and `kiln
//! bench`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::credentials::Credentials;

pub const API_VERSION: &str = "2023-03-30";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot set up TLS for {endpoint}: {message}")]
    Tls { endpoint: String, message: String },
    #[error("Cannot reach {endpoint}: {message} (is `kiln dev` running?)")]
    Transport { endpoint: String, message: String },
    #[error("{code}: {message} (HTTP {status}, request {request_id})")]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: String,
    },
    #[error("The server answered something unreadable (HTTP {status}): {message}")]
    Decode { status: u16, message: String },
}

/// A raw answer of the API.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            status: self.status.as_u16(),
            message: e.to_string(),
        })
    }

    /// FC's error body turned into an error; success passes through.
    pub fn error_for_status(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        let v: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(ClientError::Api {
            status: self.status.as_u16(),
            code: s("Code"),
            message: s("Message"),
            request_id: self
                .header("x-fc-request-id")
                .map(str::to_owned)
                .unwrap_or_else(|| s("RequestId")),
        })
    }
}

/// Signs every request with the credentials' access key.
#[derive(Clone)]
pub struct FcClient {
    creds: Credentials,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl FcClient {
    pub fn new(creds: Credentials) -> Result<Self, ClientError> {
        let tls_err = |message: String| ClientError::Tls {
            endpoint: creds.endpoint.clone(),
            message,
        };
        let tls =
            kiln_pki::public_client_config(&creds.ca_cert).map_err(|e| tls_err(e.to_string()))?;
        let uri: http::Uri = creds
            .endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| tls_err(e.to_string()))?;
        if uri.authority().is_none() {
            return Err(tls_err("endpoint has no host".into()));
        }
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        // hyper-rustls sets ALPN itself from the enabled protocols.
        let mut tls = (*tls).clone();
        tls.alpn_protocols.clear();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new()).build(https);
        Ok(Self { creds, http })
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Send one signed request.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        extra_headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<ApiResponse, ClientError> {
        let mut headers: Vec<(String, String)> = extra_headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect();
        if !headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type".into(), "application/json".into()));
        }
        let mut path_and_query = path.to_owned();
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&crate::signing::encode_query(query));
        }
        let req = crate::signing::signed_request(
            &self.creds,
            method,
            &path_and_query,
            &headers,
            body,
            None,
        )
        .map_err(|e| ClientError::Tls {
            endpoint: self.creds.endpoint.clone(),
            message: e.to_string(),
        })?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Transport {
                endpoint: self.creds.endpoint.clone(),
                message: kiln_core::error_chain(&e),
            })?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                endpoint: self.creds.endpoint.clone(),
                message: kiln_core::error_chain(&e),
            })?
            .to_bytes();
        Ok(ApiResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn functions_path(name: Option<&str>) -> String {
        match name {
            Some(n) => format!("/{API_VERSION}/functions/{n}"),
            None => format!("/{API_VERSION}/functions"),
        }
    }

    pub async fn create_function(&self, input: &Value) -> Result<Value, ClientError> {
        let body = Bytes::from(serde_json::to_vec(input).expect("json"));
        self.request(Method::POST, &Self::functions_path(None), &[], &[], body)
            .await?
            .error_for_status()?
            .json()
    }

    pub async fn update_function(&self, name: &str, input: &Value) -> Result<Value, ClientError> {
        let body = Bytes::from(serde_json::to_vec(input).expect("json"));
        self.request(
            Method::PUT,
            &Self::functions_path(Some(name)),
            &[],
            &[],
            body,
        )
        .await?
        .error_for_status()?
        .json()
    }

    pub async fn get_function(&self, name: &str) -> Result<Value, ClientError> {
        self.request(
            Method::GET,
            &Self::functions_path(Some(name)),
            &[],
            &[],
            Bytes::new(),
        )
        .await?
        .error_for_status()?
        .json()
    }

    pub async fn delete_function(&self, name: &str) -> Result<(), ClientError> {
        self.request(
            Method::DELETE,
            &Self::functions_path(Some(name)),
            &[],
            &[],
            Bytes::new(),
        )
        .await?
        .error_for_status()?;
        Ok(())
    }

    /// Every function (following nextToken), optionally filtered by prefix.
    pub async fn list_functions(&self, prefix: Option<&str>) -> Result<Vec<Value>, ClientError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query: Vec<(&str, &str)> = vec![("limit", "100")];
            if let Some(p) = prefix {
                query.push(("prefix", p));
            }
            if let Some(t) = token.as_deref() {
                query.push(("nextToken", t));
            }
            let page = self
                .request(
                    Method::GET,
                    &Self::functions_path(None),
                    &query,
                    &[],
                    Bytes::new(),
                )
                .await?
                .error_for_status()?
                .json()?;
            if let Some(items) = page.get("functions").and_then(Value::as_array) {
                all.extend(items.iter().cloned());
            }
            match page.get("nextToken").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(all),
            }
        }
    }

    /// A sync invocation; the raw answer (a function error is not an `Err`).
    pub async fn invoke(
        &self,
        name: &str,
        payload: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<ApiResponse, ClientError> {
        self.invoke_qualified(name, None, payload, headers).await
    }

    /// InvokeFunction on a version or an alias (`None`: LATEST).
    pub async fn invoke_qualified(
        &self,
        name: &str,
        qualifier: Option<&str>,
        payload: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<ApiResponse, ClientError> {
        let path = format!("/{API_VERSION}/functions/{name}/invocations");
        let mut h = vec![("content-type", "application/octet-stream")];
        h.extend_from_slice(headers);
        let query: Vec<(&str, &str)> = qualifier.map(|q| ("qualifier", q)).into_iter().collect();
        self.request(Method::POST, &path, &query, &h, payload).await
    }
}
