//! The per-instance relay: a loopback HTTP listener that turns the agent's
//! requests to the function (`POST /invoke`, `POST /initialize`,
//! `GET /pre-stop`) into calls of the guest protocol over vsock. Its address
//! is the sandbox's endpoint, so the agent's forward path is the same for
//! containers and microVMs.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use kiln_guest_proto::{CallHead, CallKind, GuestClient};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running relay; dropping it stops listening (calls in flight end when
/// the guest connection closes).
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Headers that describe the hop, not the call. The function's own
/// content-length goes back with its answer (else the answer goes
/// chunked); the request's is set again from the body's exact size.
const HOP_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
];

/// What the relay answers: the function's body as it streams from the
/// guest, or a short message of the relay's own.
pub type RelayBody = BoxBody<Bytes, std::io::Error>;

impl Relay {
    pub async fn start(guest: GuestClient) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let guest = guest.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let guest = guest.clone();
                        async move { Ok::<_, Infallible>(relay(&guest, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Relay { addr, task })
    }
}

fn plain(status: StatusCode, message: String) -> Response<RelayBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from(message))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("response")
}

/// Aborts the task pumping a request body when the answer is done with.
struct AbortOnDrop(JoinHandle<Result<(), String>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Relay one call. Both bodies stream: the request's frames go to the guest
/// as they arrive (the guest's window holds them back while the function
/// reads slowly), and the answer's head is returned as soon as the guest
/// sends it, with its body following chunk by chunk, so a function may
/// answer before it has read all of its request.
async fn relay<B>(guest: &GuestClient, req: Request<B>) -> Response<RelayBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let kind = match (req.method(), req.uri().path()) {
        (&Method::POST, "/invoke") => CallKind::Invoke,
        (&Method::POST, "/initialize") => CallKind::Initialize,
        (&Method::GET, "/pre-stop") => CallKind::PreStop,
        (m, p) => {
            return plain(
                StatusCode::NOT_FOUND,
                format!("{m} {p} is not a function runtime call"),
            )
        }
    };
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(n, _)| *n != http::header::CONTENT_LENGTH && !HOP_HEADERS.contains(&n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut body = req.into_body();
    // The length the guest gives the function: known, or none (chunked);
    // an empty body says 0, except for pre-stop's GET which has none.
    match body.size_hint().exact() {
        Some(0) if kind == CallKind::PreStop => {}
        Some(len) => headers.push(("content-length".into(), len.to_string())),
        None => {}
    }
    let head = CallHead {
        headers,
        timeout_ms: None,
    };
    let (mut sender, pending) = match guest.start_call(kind, head).await {
        Ok(call) => call,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("guest: {e}")),
    };
    let mut pump = AbortOnDrop(tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => frame.into_data(),
                Err(e) => return Err(format!("request body: {e}")),
            };
            if let Ok(data) = data {
                sender.send(data).await.map_err(|e| format!("guest: {e}"))?;
            }
        }
        sender.finish().await.map_err(|e| format!("guest: {e}"))
    }));
    let resp = tokio::select! {
        r = pending.response() => match r {
            Ok(r) => r,
            Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("guest: {e}")),
        },
        // The caller's body broke off (or the guest went away) before the
        // answer: dropping the sender has cancelled the call.
        Ok(Err(message)) = &mut pump.0 => {
            let status = if message.starts_with("request body") {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::BAD_GATEWAY
            };
            return plain(status, message);
        }
    };
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = Response::builder().status(status);
    for (n, v) in &resp.headers {
        if !HOP_HEADERS.contains(&n.to_ascii_lowercase().as_str()) {
            builder = builder.header(n.as_str(), v.as_str());
        }
    }
    // The pump lives as long as the answer: a function that answered early
    // still gets the rest of its request; an answer dropped (the agent gave
    // up) stops it.
    let chunks = futures_util::stream::unfold((resp.body, pump), |(mut body, pump)| async move {
        let chunk = body.chunk().await?;
        Some((
            chunk
                .map(Frame::data)
                .map_err(|e| std::io::Error::other(format!("guest response body: {e}"))),
            (body, pump),
        ))
    });
    builder
        .body(StreamBody::new(chunks).boxed())
        .unwrap_or_else(|e| plain(StatusCode::BAD_GATEWAY, format!("guest response: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::channel::Channel;
    use http_body_util::combinators::BoxBody;
    use kiln_guest_proto::{
        serve, CallRequest, Configured, ErrorBody, ErrorCode, ExecInputs, ExecRequest, ExecWriter,
        GuestConfig, GuestHandler, ResponseHead, ResponseWriter,
    };
    use tokio::sync::Notify;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A function that answers at once, before reading its request, then
    /// waits for the test before reading the request and finishing.
    struct EarlyAnswer {
        release: Arc<Notify>,
    }

    impl GuestHandler for EarlyAnswer {
        fn is_configured(&self) -> bool {
            true
        }

        async fn configure(&self, _config: GuestConfig) -> Result<Configured, ErrorBody> {
            Ok(Configured { start_ms: 0 })
        }

        async fn call(&self, mut request: CallRequest, mut response: ResponseWriter) {
            let length = request
                .head
                .headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or("none".to_owned(), |(_, v)| v.clone());
            let mut headers = vec![("x-request-length".into(), length.clone())];
            if request
                .head
                .headers
                .iter()
                .any(|(n, _)| n == "x-known-answer")
            {
                // "first;" and "read N" (N the declared request length).
                let answer_len = 6 + 5 + length.len();
                headers.push(("Content-Length".into(), answer_len.to_string()));
            }
            response
                .head(ResponseHead {
                    status: 200,
                    headers,
                })
                .await;
            response.body(Bytes::from_static(b"first;")).await;
            self.release.notified().await;
            let mut read = 0;
            while let Some(chunk) = request.body.recv().await {
                read += chunk.len();
            }
            response.body(Bytes::from(format!("read {read}"))).await;
            response.end().await;
        }

        async fn exec(&self, _request: ExecRequest, _input: ExecInputs, output: ExecWriter) {
            output
                .error(ErrorBody::new(ErrorCode::ExecFailed, "no exec here"))
                .await;
        }
    }

    async fn relay_with(handler: EarlyAnswer) -> Relay {
        let (host, guest) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve(guest, Arc::new(handler), "test"));
        Relay::start(GuestClient::connect(host)).await.unwrap()
    }

    async fn client(
        relay: &Relay,
    ) -> hyper::client::conn::http1::SendRequest<BoxBody<Bytes, std::io::Error>> {
        let tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    #[tokio::test]
    async fn both_bodies_stream_and_an_early_answer_is_not_held_back() {
        let release = Arc::new(Notify::new());
        let relay = relay_with(EarlyAnswer {
            release: release.clone(),
        })
        .await;
        let mut send = client(&relay).await;
        let (mut body_tx, body) = Channel::<Bytes, std::io::Error>::new(4);
        body_tx.send_data(Bytes::from_static(b"abc")).await.unwrap();
        let req = Request::post("/invoke").body(body.boxed()).unwrap();

        // The head and the first chunk come while the request is still open.
        let resp = tokio::time::timeout(T, send.send_request(req))
            .await
            .expect("the answer's head waited for the whole request")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-request-length"], "none", "chunked");
        let mut answer = resp.into_body();
        let first = tokio::time::timeout(T, answer.frame())
            .await
            .expect("the first chunk waited for the rest of the answer")
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "first;");

        release.notify_one();
        body_tx
            .send_data(Bytes::from_static(b"defg"))
            .await
            .unwrap();
        drop(body_tx);
        let rest = tokio::time::timeout(T, answer.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert_eq!(rest, "read 7");
    }

    #[tokio::test]
    async fn a_known_length_is_passed_on_and_other_paths_are_refused() {
        let release = Arc::new(Notify::new());
        release.notify_one();
        let relay = relay_with(EarlyAnswer { release }).await;
        let mut send = client(&relay).await;
        let body = Full::new(Bytes::from_static(b"12345"))
            .map_err(|never| match never {})
            .boxed();
        let req = Request::post("/invoke")
            .header("x-known-answer", "1")
            .body(body)
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.headers()["x-request-length"], "5");
        // The function's own length goes back (not chunked).
        assert_eq!(resp.headers()["content-length"], "12");
        assert!(!resp.headers().contains_key("transfer-encoding"));
        let all = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(all, "first;read 5");

        let empty = Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed();
        let resp = send
            .send_request(Request::post("/elsewhere").body(empty).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
}
