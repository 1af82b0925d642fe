//! Host client and guest server talking over an in-memory duplex pipe,
//! with a fake handler standing in for kiln-guest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kiln_guest_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

#[derive(Default)]
struct FakeGuest {
    configured: AtomicBool,
    logs: Mutex<Option<LogSender>>,
}

impl GuestHandler for FakeGuest {
    fn is_configured(&self) -> bool {
        self.configured.load(Ordering::SeqCst)
    }

    fn connected(&self, logs: LogSender) {
        *self.logs.lock().unwrap() = Some(logs);
    }

    async fn configure(&self, config: GuestConfig) -> Result<Configured, ErrorBody> {
        if config.process.command[0] == "/fail" {
            return Err(ErrorBody::new(ErrorCode::StartFailed, "no such command"));
        }
        self.configured.store(true, Ordering::SeqCst);
        let logs = self.logs.lock().unwrap().clone().unwrap();
        logs.send(LogLine {
            stream: LogStream::Stdout,
            line: format!("started {}", config.instance_id),
        });
        Ok(Configured { start_ms: 7 })
    }

    async fn call(&self, mut request: CallRequest, mut response: ResponseWriter) {
        if !self.is_configured() {
            response
                .error(ErrorBody::new(ErrorCode::NotConfigured, "not configured"))
                .await;
            return;
        }
        if request
            .head
            .headers
            .iter()
            .any(|(k, _)| k == "x-stall-body")
        {
            // Never reads its body nor answers; only a cancel ends it.
            std::future::pending::<()>().await;
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = request.body.recv().await {
            body.extend_from_slice(&chunk);
        }
        let header = |n: &str| {
            request
                .head
                .headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        if let Some(ms) = header("x-sleep-ms") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        if header("x-no-answer").is_some() {
            return;
        }
        if header("x-panic").is_some() {
            panic!("the handler broke");
        }
        response
            .head(ResponseHead {
                status: 200,
                headers: vec![
                    ("x-path".into(), request.kind.path().into()),
                    ("x-call".into(), request.call.to_string()),
                ],
            })
            .await;
        // Echo the body back in two pieces to exercise streaming.
        let body = body.freeze();
        let mid = body.len() / 2;
        response.body(body.slice(..mid)).await;
        response.body(body.slice(mid..)).await;
        response.end().await;
    }

    async fn exec(&self, request: ExecRequest, mut input: ExecInputs, output: ExecWriter) {
        if request.command[0] == "panic" {
            panic!("exec handler broke");
        }
        if request.command[0] != "cat" {
            output
                .error(ErrorBody::new(ErrorCode::ExecFailed, "not found"))
                .await;
            return;
        }
        while let Some(i) = input.recv().await {
            match i {
                ExecInput::Stdin(d) => {
                    output.stdout(d).await;
                }
                ExecInput::Resize(s) => {
                    output
                        .stderr(Bytes::from(format!("{}x{}", s.rows, s.cols)))
                        .await;
                }
                ExecInput::CloseStdin => break,
            }
        }
        output
            .exit(ExitStatus {
                code: Some(3),
                signal: None,
            })
            .await;
    }
}

fn pair() -> (
    GuestClient,
    Arc<FakeGuest>,
    tokio::task::JoinHandle<Result<(), ServeError>>,
) {
    let (host, guest) = tokio::io::duplex(1 << 16);
    let handler = Arc::new(FakeGuest::default());
    let server = tokio::spawn(serve(guest, handler.clone(), "test"));
    (GuestClient::connect(host), handler, server)
}

fn config() -> GuestConfig {
    GuestConfig {
        instance_id: "i-1".into(),
        hostname: None,
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            mtu: Some(1500),
            dns: vec!["10.0.2.3".parse().unwrap()],
        }),
        process: ProcessConfig {
            command: vec!["/code/server".into()],
            args: vec![],
            env: BTreeMap::from([("FC_CUSTOM_LISTEN_PORT".into(), "9000".into())]),
            port: 9000,
            working_dir: "/code".into(),
            start_timeout_ms: 1000,
        },
        disks: DiskConfig {
            runtime: Some(Disk {
                device: "/dev/vda".into(),
                fs: FsType::Erofs,
            }),
            code: Some(Disk {
                device: "/dev/vdb".into(),
                fs: FsType::Erofs,
            }),
            scratch: None,
            layers: vec![],
        },
    }
}

async fn configured() -> (GuestClient, Arc<FakeGuest>) {
    let (client, handler, _server) = pair();
    let ready = client.wait_ready(T).await.unwrap();
    assert_eq!(ready.protocol_version, PROTOCOL_VERSION);
    assert!(!ready.configured);
    assert_eq!(client.configure(&config(), T).await.unwrap().start_ms, 7);
    (client, handler)
}

#[tokio::test]
async fn ready_configure_invoke_logs() {
    let (client, _h) = configured().await;
    let mut logs = client.take_logs().unwrap();
    assert!(client.take_logs().is_none());
    let line = logs.recv().await.unwrap();
    assert_eq!(line.line, "started i-1");
    let head = CallHead {
        headers: vec![("x-fc-request-id".into(), "r1".into())],
        timeout_ms: Some(1000),
    };
    let resp = client
        .invoke(head, Bytes::from_static(b"hello guest"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("X-Path"), Some("/invoke"));
    assert_eq!(
        resp.body.collect().await.unwrap(),
        Bytes::from_static(b"hello guest")
    );
    let resp = client.initialize(CallHead::default()).await.unwrap();
    assert_eq!(resp.header("x-path"), Some("/initialize"));
    let resp = client.pre_stop(CallHead::default()).await.unwrap();
    assert_eq!(resp.header("x-path"), Some("/pre-stop"));
    assert!(resp.body.collect().await.unwrap().is_empty());
}

#[tokio::test]
async fn large_streamed_bodies_round_trip() {
    let (client, _h) = configured().await;
    let big: Vec<u8> = (0..3 * MAX_PAYLOAD + 17).map(|i| (i % 251) as u8).collect();
    let (mut body, pending) = client
        .start_call(CallKind::Invoke, CallHead::default())
        .await
        .unwrap();
    for chunk in big.chunks(100_000) {
        body.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    body.finish().await.unwrap();
    let resp = pending.response().await.unwrap();
    assert_eq!(resp.body.collect().await.unwrap(), Bytes::from(big));
}

#[tokio::test]
async fn interleaved_concurrent_calls() {
    let (client, _h) = configured().await;
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let head = CallHead {
                // Later calls finish first, so responses interleave.
                headers: vec![("x-sleep-ms".into(), ((40 - i) * 2).to_string())],
                timeout_ms: None,
            };
            let payload = Bytes::from(format!("payload-{i}-").repeat(1000 + i as usize));
            let resp = client.invoke(head, payload.clone()).await.unwrap();
            assert_eq!(resp.body.collect().await.unwrap(), payload);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn call_before_configure_is_refused() {
    let (client, _h, _s) = pair();
    client.wait_ready(T).await.unwrap();
    match client.invoke(CallHead::default(), Bytes::new()).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::NotConfigured),
        other => panic!("{:?}", other.map(|r| r.status)),
    }
}

#[tokio::test]
async fn configure_failures() {
    let (client, _h, _s) = pair();
    client.wait_ready(T).await.unwrap();
    let mut bad = config();
    bad.process.port = 0;
    assert!(matches!(
        client.configure(&bad, T).await,
        Err(GuestClientError::InvalidConfig(_))
    ));
    let mut fail = config();
    fail.process.command = vec!["/fail".into()];
    match client.configure(&fail, T).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::StartFailed),
        other => panic!("{other:?}"),
    }
    // Configure is accepted once per connection.
    match client.configure(&config(), T).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::AlreadyConfigured),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn handler_without_answer_is_an_error() {
    let (client, _h) = configured().await;
    let head = CallHead {
        headers: vec![("x-no-answer".into(), "1".into())],
        timeout_ms: None,
    };
    match client.invoke(head, Bytes::new()).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::Internal),
        other => panic!("{:?}", other.map(|r| r.status)),
    }
}

/// A handler that panics (kiln-guest's once did when std's spawn lost a
/// race with the reaper) still answers: the host gets an error on that
/// stream instead of waiting forever, and the connection keeps serving.
#[tokio::test]
async fn a_panicking_handler_answers_with_an_error() {
    let (client, _h) = configured().await;
    let head = CallHead {
        headers: vec![("x-panic".into(), "1".into())],
        timeout_ms: None,
    };
    match tokio::time::timeout(T, client.invoke(head, Bytes::new())).await {
        Ok(Err(GuestClientError::Guest(e))) => {
            assert_eq!(e.code, ErrorCode::Internal);
            assert!(e.message.contains("the handler broke"), "{}", e.message);
        }
        Ok(other) => panic!("{:?}", other.map(|r| r.status)),
        Err(_) => panic!("no answer to a call whose handler panicked"),
    }
    let mut session = client
        .exec(ExecRequest {
            command: vec!["panic".into()],
            env: BTreeMap::new(),
            tty: false,
            size: None,
            working_dir: None,
        })
        .await
        .unwrap();
    match tokio::time::timeout(T, session.output.next()).await {
        Ok(Some(ExecEvent::Error(e))) => {
            assert_eq!(e.code, ErrorCode::ExecFailed);
            assert!(e.message.contains("exec handler broke"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let resp = tokio::time::timeout(
        T,
        client.invoke(CallHead::default(), Bytes::from_static(b"x")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.body.collect().await.unwrap(), Bytes::from_static(b"x"));
}

#[tokio::test]
async fn cancelled_call_does_not_disturb_others() {
    let (client, _h) = configured().await;
    let slow = CallHead {
        headers: vec![("x-sleep-ms".into(), "10000".into())],
        timeout_ms: None,
    };
    let c2 = client.clone();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(50), c2.invoke(slow, Bytes::new())).await;
    assert!(cancelled.is_err());
    let resp = client
        .invoke(CallHead::default(), Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(resp.body.collect().await.unwrap(), Bytes::from_static(b"x"));
}

#[tokio::test]
async fn exec_session() {
    let (client, _h) = configured().await;
    let ExecSession { input, mut output } = client
        .exec(ExecRequest {
            command: vec!["cat".into()],
            env: BTreeMap::new(),
            tty: true,
            size: Some(TtySize { rows: 24, cols: 80 }),
            working_dir: None,
        })
        .await
        .unwrap();
    input.stdin(Bytes::from_static(b"abc")).await.unwrap();
    assert_eq!(
        output.next().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"abc")))
    );
    input
        .resize(TtySize {
            rows: 50,
            cols: 132,
        })
        .await
        .unwrap();
    assert_eq!(
        output.next().await,
        Some(ExecEvent::Stderr(Bytes::from_static(b"50x132")))
    );
    input.close_stdin().await.unwrap();
    assert_eq!(
        output.next().await,
        Some(ExecEvent::Exit(ExitStatus {
            code: Some(3),
            signal: None
        }))
    );
    assert_eq!(output.next().await, None);

    let mut failing = client
        .exec(ExecRequest {
            command: vec!["nope".into()],
            env: BTreeMap::new(),
            tty: false,
            size: None,
            working_dir: None,
        })
        .await
        .unwrap();
    assert!(
        matches!(failing.output.next().await, Some(ExecEvent::Error(e)) if e.code == ErrorCode::ExecFailed)
    );
}

#[tokio::test]
async fn guest_going_away_fails_pending_calls() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let client = GuestClient::connect(host);
    let mut ready = Ready::current("raw");
    ready.configured = true;
    guest
        .write_all(&Message::Ready(ready).encode().unwrap())
        .await
        .unwrap();
    assert!(client.wait_ready(T).await.unwrap().configured);
    let c2 = client.clone();
    let pending = tokio::spawn(async move {
        c2.invoke(CallHead::default(), Bytes::new())
            .await
            .map(|r| r.status)
    });
    // The guest sees the call start, then dies.
    let frame = frame::read_frame(&mut guest).await.unwrap().unwrap();
    assert_eq!(frame.kind, FrameType::Invoke);
    drop(guest);
    let result = tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(GuestClientError::Closed(_))),
        "{result:?}"
    );
    assert!(client.wait_closed().await.contains("closed"));
    assert!(matches!(
        client.invoke(CallHead::default(), Bytes::new()).await,
        Err(GuestClientError::Closed(_))
    ));
}

#[tokio::test]
async fn wait_ready_times_out_and_sees_close() {
    let (host, guest) = tokio::io::duplex(1024);
    let client = GuestClient::connect(host);
    assert!(matches!(
        client.wait_ready(Duration::from_millis(30)).await,
        Err(GuestClientError::Timeout(_))
    ));
    drop(guest);
    assert!(matches!(
        client.wait_ready(T).await,
        Err(GuestClientError::Closed(_))
    ));
}

/// Raw bytes from a misbehaving host: the server answers BadFrame and closes.
async fn server_rejects(bytes: Vec<u8>, expect: fn(&ServeError) -> bool) {
    let (mut host, guest) = tokio::io::duplex(1 << 16);
    let handler = Arc::new(FakeGuest::default());
    let server = tokio::spawn(serve(guest, handler, "test"));
    host.write_all(&bytes).await.unwrap();
    host.shutdown().await.unwrap();
    let err = tokio::time::timeout(T, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(expect(&err), "{err:?}");
    let mut out = Vec::new();
    host.read_to_end(&mut out).await.unwrap();
    let (first, used) = Message::decode(&out).unwrap();
    assert!(matches!(first, Message::Ready(_)));
    let (last, _) = Message::decode(&out[used..]).unwrap();
    match last {
        Message::Error { stream: 0, error } => {
            assert!(matches!(
                error.code,
                ErrorCode::BadFrame | ErrorCode::Protocol
            ))
        }
        other => panic!("{other:?}"),
    }
}

const V: u8 = PROTOCOL_VERSION;

fn header(version: u8, kind: u8, stream: u32, len: u32) -> Vec<u8> {
    let mut v = b"KG".to_vec();
    v.push(version);
    v.push(kind);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[tokio::test]
async fn server_rejects_every_malformed_frame() {
    use FrameError as F;
    server_rejects(b"GET / HTTP/1.1\r\n\r\n".to_vec(), |e| {
        matches!(e, ServeError::Frame(F::BadMagic(_)))
    })
    .await;
    server_rejects(header(9, 0x02, 0, 0), |e| {
        matches!(e, ServeError::Frame(F::UnsupportedVersion(9)))
    })
    .await;
    server_rejects(header(V, 0x77, 0, 0), |e| {
        matches!(e, ServeError::Frame(F::UnknownType(0x77)))
    })
    .await;
    server_rejects(header(V, 0x13, 1, u32::MAX), |e| {
        matches!(e, ServeError::Frame(F::Oversize { .. }))
    })
    .await;
    let mut t = header(V, 0x13, 1, 10);
    t.extend_from_slice(b"abc");
    server_rejects(t, |e| matches!(e, ServeError::Frame(F::Truncated { .. }))).await;
    server_rejects(header(V, 0x02, 0, 0)[..7].to_vec(), |e| {
        matches!(e, ServeError::Frame(F::Truncated { .. }))
    })
    .await;
    let mut u = header(V, 0x02, 0, 2);
    u.extend_from_slice(&[0xff, 0xfe]);
    server_rejects(u, |e| matches!(e, ServeError::Frame(F::BadUtf8 { .. }))).await;
    let mut j = header(V, 0x02, 0, 5);
    j.extend_from_slice(b"{nope");
    server_rejects(j, |e| matches!(e, ServeError::Frame(F::BadJson { .. }))).await;
    // Valid JSON, wrong shape (unknown field).
    let body = br#"{"instanceId":"i","bogus":1}"#;
    let mut j = header(V, 0x02, 0, body.len() as u32);
    j.extend_from_slice(body);
    server_rejects(j, |e| matches!(e, ServeError::Frame(F::BadJson { .. }))).await;
    // Connection frame on a call stream, call frame on stream 0.
    let mut s = header(V, 0x40, 5, 0);
    s.extend_from_slice(&[]);
    server_rejects(s, |e| matches!(e, ServeError::Frame(F::BadStream { .. }))).await;
    server_rejects(header(V, 0x14, 0, 0), |e| {
        matches!(e, ServeError::Frame(F::BadStream { .. }))
    })
    .await;
    let mut p = header(V, 0x14, 3, 1);
    p.push(0);
    server_rejects(p, |e| {
        matches!(e, ServeError::Frame(F::UnexpectedPayload { .. }))
    })
    .await;
    // A guest-only message from the host.
    let r = Message::Log(LogLine {
        stream: LogStream::Stdout,
        line: "x".into(),
    })
    .encode()
    .unwrap();
    server_rejects(r.to_vec(), |e| matches!(e, ServeError::Protocol(_))).await;
}

#[tokio::test]
async fn client_closes_on_malformed_guest_frames() {
    for bytes in [
        b"garbage!garbage!".to_vec(),
        header(V, 0xEE, 0, 0),
        header(V, 0x01, 0, u32::MAX),
        {
            let mut v = header(V, 0x01, 0, 3);
            v.extend_from_slice(b"{\"x");
            v
        },
    ] {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let client = GuestClient::connect(host);
        guest.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(T, client.wait_closed()).await.unwrap();
        assert!(reason.starts_with("bad frame"), "{reason}");
        assert!(matches!(
            client.wait_ready(T).await,
            Err(GuestClientError::Closed(_))
        ));
    }
}

/// The whole server loop on random input: valid frames mixed with junk,
/// thousands of times. It must end (error or clean close), never panic.
#[tokio::test]
async fn server_survives_random_input() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let valid = [
        Message::Configure(Box::new(config())).encode().unwrap(),
        Message::Call {
            call: 1,
            kind: CallKind::Invoke,
            head: CallHead::default(),
        }
        .encode()
        .unwrap(),
        Message::RequestBody {
            call: 1,
            data: Bytes::from_static(b"x"),
        }
        .encode()
        .unwrap(),
        Message::RequestEnd { call: 1 }.encode().unwrap(),
        Message::Cancel { call: 1 }.encode().unwrap(),
        Message::Ping(Bytes::from_static(b"p")).encode().unwrap(),
    ];
    for _ in 0..2000 {
        let mut input = Vec::new();
        for _ in 0..rng.gen_range(0..6) {
            if rng.gen_bool(0.7) {
                input.extend_from_slice(&valid[rng.gen_range(0..valid.len())]);
            } else {
                let n = rng.gen_range(0..40);
                input.extend((0..n).map(|_| rng.gen::<u8>()));
            }
        }
        let (mut host, guest) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve(guest, Arc::new(FakeGuest::default()), "fuzz"));
        host.write_all(&input).await.unwrap();
        host.shutdown().await.unwrap();
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = host.read_to_end(&mut sink).await;
        });
        let result = tokio::time::timeout(T, server).await.expect("server hung");
        assert!(result.is_ok(), "server panicked on {input:?}");
        drain.abort();
    }
}

// ---- Per-stream flow control (protocol version 2) ----

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

fn call_head(extra: &[(&str, &str)]) -> CallHead {
    CallHead {
        headers: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_ms: None,
    }
}

/// The case that deadlocked with bounded per-call queues: both responses
/// in hand, the small one read first while the big one (24 windows, 6 MiB:
/// more than version 1's 64-event per-call queue held, which then stopped
/// the shared reader) is not read at all.
#[tokio::test]
async fn join_big_and_small_reading_small_first_does_not_stall() {
    let (client, _) = configured().await;
    let big_body = pattern(24 * INITIAL_WINDOW as usize, 1);
    let small_body = Bytes::from_static(b"small");
    let both = async {
        let (big, small) = tokio::join!(
            client.invoke(CallHead::default(), big_body.clone()),
            client.invoke(CallHead::default(), small_body.clone()),
        );
        let (big, small) = (big.unwrap(), small.unwrap());
        assert_eq!(small.body.collect().await.unwrap(), small_body);
        assert_eq!(big.body.collect().await.unwrap(), big_body);
    };
    tokio::time::timeout(T, both)
        .await
        .expect("join!(big, small) reading small first stalled");
}

/// A response nobody reads holds up neither other calls nor exec sessions;
/// its data still arrives intact once it is read.
#[tokio::test]
async fn an_unread_response_does_not_delay_other_calls() {
    let (client, _) = configured().await;
    let big_body = pattern(24 * INITIAL_WINDOW as usize, 2);
    let big = tokio::time::timeout(T, client.invoke(CallHead::default(), big_body.clone()))
        .await
        .unwrap()
        .unwrap();
    for i in 0..20 {
        let body = Bytes::from(format!("call {i}"));
        let small = async {
            let r = client.invoke(CallHead::default(), body.clone()).await?;
            r.body.collect().await
        };
        let echoed = tokio::time::timeout(T, small)
            .await
            .unwrap_or_else(|_| panic!("call {i} waited behind the unread response"))
            .unwrap();
        assert_eq!(echoed, body);
    }
    let exec = async {
        let mut s = client
            .exec(ExecRequest {
                command: vec!["cat".into()],
                env: BTreeMap::new(),
                tty: false,
                size: None,
                working_dir: None,
            })
            .await
            .unwrap();
        s.input.stdin(Bytes::from_static(b"hi")).await.unwrap();
        s.input.close_stdin().await.unwrap();
        let mut events = Vec::new();
        while let Some(e) = s.output.next().await {
            events.push(e);
        }
        events
    };
    let events = tokio::time::timeout(T, exec)
        .await
        .expect("exec waited behind the unread response");
    assert_eq!(events[0], ExecEvent::Stdout(Bytes::from_static(b"hi")));
    let body = tokio::time::timeout(T, big.body.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, big_body);
}

/// The other direction: a handler that does not read its request body
/// stops only that body's sender, not the guest's read loop.
#[tokio::test]
async fn an_unread_request_body_does_not_delay_other_calls() {
    let (client, _) = configured().await;
    let (mut sender, pending) = client
        .start_call(CallKind::Invoke, call_head(&[("x-stall-body", "1")]))
        .await
        .unwrap();
    let stuck = tokio::spawn(async move {
        // Far more than a window: this waits for grants that never come.
        let r = sender.send(pattern(24 * INITIAL_WINDOW as usize, 3)).await;
        (r, sender)
    });
    for i in 0..10 {
        let body = Bytes::from(format!("call {i}"));
        let small = async {
            let r = client.invoke(CallHead::default(), body.clone()).await?;
            r.body.collect().await
        };
        let echoed = tokio::time::timeout(T, small)
            .await
            .unwrap_or_else(|_| panic!("call {i} waited behind the unread request body"))
            .unwrap();
        assert_eq!(echoed, body);
    }
    assert!(!stuck.is_finished(), "the body sender ignored the window");
    // Giving up on the stuck call (dropping it cancels it at the guest)
    // wakes its sender.
    drop(pending);
    let (result, _sender) = tokio::time::timeout(T, stuck).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// A guest that is only frames on a pipe, for checking the host's reader.
struct RawGuest {
    io: tokio::io::DuplexStream,
    buf: Vec<u8>,
}

impl RawGuest {
    async fn connect() -> (GuestClient, RawGuest) {
        let (host, guest) = tokio::io::duplex(1 << 22);
        let client = GuestClient::connect(host);
        let mut raw = RawGuest {
            io: guest,
            buf: Vec::new(),
        };
        raw.send(Message::Ready(Ready::current("raw"))).await;
        client.wait_ready(T).await.unwrap();
        (client, raw)
    }

    async fn send(&mut self, m: Message) {
        self.io.write_all(&m.encode().unwrap()).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        let read = async {
            loop {
                match Message::decode(&self.buf) {
                    Ok((m, used)) => {
                        self.buf.drain(..used);
                        return m;
                    }
                    Err(FrameError::Truncated { .. }) => {
                        let mut chunk = [0u8; 4096];
                        let n = self.io.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "host closed");
                        self.buf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) => panic!("host sent a bad frame: {e}"),
                }
            }
        };
        tokio::time::timeout(T, read).await.expect("host frame")
    }

    /// Skip what the host sends until `pick` accepts a message.
    async fn recv_until<R>(&mut self, mut pick: impl FnMut(&Message) -> Option<R>) -> R {
        loop {
            let m = self.recv().await;
            if let Some(r) = pick(&m) {
                return r;
            }
        }
    }
}

async fn raw_call(client: &GuestClient, raw: &mut RawGuest) -> (u32, PendingResponse) {
    let (sender, pending) = client
        .start_call(CallKind::Invoke, CallHead::default())
        .await
        .unwrap();
    sender.finish().await.unwrap();
    let call = raw
        .recv_until(|m| match m {
            Message::Call { call, .. } => Some(*call),
            _ => None,
        })
        .await;
    (call, pending)
}

fn head(status: u16) -> ResponseHead {
    ResponseHead {
        status,
        headers: vec![],
    }
}

#[tokio::test]
async fn host_fails_only_the_stream_a_guest_floods_past_its_window() {
    let (client, mut raw) = RawGuest::connect().await;
    let (flooded, flooded_pending) = raw_call(&client, &mut raw).await;
    let (other, other_pending) = raw_call(&client, &mut raw).await;
    raw.send(Message::ResponseHead {
        call: flooded,
        head: head(200),
    })
    .await;
    // Exactly the window is allowed without any grant...
    let chunk = MAX_DATA_CHUNK;
    let per_frame = (chunk + HEADER_LEN) as u32;
    let fit = INITIAL_WINDOW / per_frame;
    for _ in 0..fit {
        raw.send(Message::ResponseBody {
            call: flooded,
            data: pattern(chunk, 0),
        })
        .await;
    }
    let left = (INITIAL_WINDOW - fit * per_frame) as usize - HEADER_LEN;
    raw.send(Message::ResponseBody {
        call: flooded,
        data: pattern(left, 0),
    })
    .await;
    // ...one byte more is not.
    raw.send(Message::ResponseBody {
        call: flooded,
        data: Bytes::from_static(b"!"),
    })
    .await;
    let cancelled = raw
        .recv_until(|m| match m {
            Message::Cancel { call } => Some(*call),
            _ => None,
        })
        .await;
    assert_eq!(cancelled, flooded);
    let response = flooded_pending.response().await.unwrap();
    let err = tokio::time::timeout(T, response.body.collect())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, GuestClientError::Protocol(m) if m.contains("window")),
        "{err:?}"
    );
    // The connection and the other call carry on.
    raw.send(Message::ResponseHead {
        call: other,
        head: head(201),
    })
    .await;
    raw.send(Message::ResponseBody {
        call: other,
        data: Bytes::from_static(b"fine"),
    })
    .await;
    raw.send(Message::ResponseEnd { call: other }).await;
    let r = tokio::time::timeout(T, other_pending.response())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.body.collect().await.unwrap(), "fine");
    assert!(client.closed().is_none());
}

#[tokio::test]
async fn host_grants_window_as_the_body_is_read() {
    let (client, mut raw) = RawGuest::connect().await;
    let (call, pending) = raw_call(&client, &mut raw).await;
    raw.send(Message::ResponseHead {
        call,
        head: head(200),
    })
    .await;
    let mut response = pending.response().await.unwrap();
    // Send what fits in the window without a grant, and read it all.
    let mut sent = 0u32;
    while sent + (MAX_DATA_CHUNK + HEADER_LEN) as u32 <= INITIAL_WINDOW {
        raw.send(Message::ResponseBody {
            call,
            data: pattern(MAX_DATA_CHUNK, 5),
        })
        .await;
        sent += (MAX_DATA_CHUNK + HEADER_LEN) as u32;
    }
    let mut read = 0;
    while read < sent as usize - 3 * HEADER_LEN {
        read += response.body.chunk().await.unwrap().unwrap().len();
    }
    // Grants come in batches of at least half a window, never for more
    // than was read.
    let granted = raw
        .recv_until(|m| match m {
            Message::WindowUpdate { stream, increment } if *stream == call => Some(*increment),
            _ => None,
        })
        .await;
    assert!(
        granted >= INITIAL_WINDOW / 2 && granted <= sent,
        "{granted}"
    );
    // The grant is honoured: exactly what is left of the window now fits.
    let mut credit = INITIAL_WINDOW - sent + granted;
    let mut more = 0;
    while credit > HEADER_LEN as u32 {
        let len = (credit as usize - HEADER_LEN).min(MAX_DATA_CHUNK);
        raw.send(Message::ResponseBody {
            call,
            data: pattern(len, 6),
        })
        .await;
        credit -= (len + HEADER_LEN) as u32;
        more += len;
    }
    raw.send(Message::ResponseEnd { call }).await;
    let rest = tokio::time::timeout(T, response.body.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.len(), sent as usize - 3 * HEADER_LEN - read + more);
    assert!(client.closed().is_none());
}

#[tokio::test]
async fn host_rejects_malformed_and_oversized_window_updates() {
    // Malformed: the connection closes, like any bad frame.
    for (stream, payload) in [
        (1u32, vec![0u8, 0, 1]),
        (1, vec![0, 0, 0, 0, 1]),
        (1, 0u32.to_be_bytes().to_vec()),
        (1, (MAX_WINDOW + 1).to_be_bytes().to_vec()),
        (0, 100u32.to_be_bytes().to_vec()),
    ] {
        let (client, mut raw) = RawGuest::connect().await;
        let mut bytes = header(
            V,
            FrameType::WindowUpdate as u8,
            stream,
            payload.len() as u32,
        );
        bytes.extend_from_slice(&payload);
        raw.io.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(T, client.wait_closed()).await.unwrap();
        assert!(reason.starts_with("bad frame"), "{reason}");
        assert!(
            reason.contains("WindowUpdate") || reason.contains("stream"),
            "{reason}"
        );
    }
    // Well-formed but taking the window over the maximum: that stream fails
    // and is cancelled, the connection stays.
    let (client, mut raw) = RawGuest::connect().await;
    let (call, pending) = raw_call(&client, &mut raw).await;
    raw.send(Message::WindowUpdate {
        stream: call,
        increment: MAX_WINDOW,
    })
    .await;
    let cancelled = raw
        .recv_until(|m| match m {
            Message::Cancel { call } => Some(*call),
            _ => None,
        })
        .await;
    assert_eq!(cancelled, call);
    let err = tokio::time::timeout(T, pending.response())
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(
        matches!(&err, GuestClientError::Protocol(m) if m.contains("over the maximum")),
        "{err:?}"
    );
    assert!(client.closed().is_none());
    // A second response head is refused the same way.
    let (call, pending) = raw_call(&client, &mut raw).await;
    raw.send(Message::ResponseHead {
        call,
        head: head(200),
    })
    .await;
    raw.send(Message::ResponseHead {
        call,
        head: head(500),
    })
    .await;
    let response = pending.response().await.unwrap();
    assert!(matches!(
        response.body.collect().await,
        Err(GuestClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn a_version_1_guest_is_a_version_mismatch() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let client = GuestClient::connect(host);
    let mut ready = Message::Ready(Ready {
        protocol_version: 1,
        guest_version: "old".into(),
        configured: false,
    })
    .encode()
    .unwrap()
    .to_vec();
    ready[2] = 1;
    guest.write_all(&ready).await.unwrap();
    assert!(matches!(
        client.wait_ready(T).await,
        Err(GuestClientError::VersionMismatch(1))
    ));
    let reason = client.wait_closed().await;
    assert!(reason.contains("version 1"), "{reason}");
}

/// A host that is only frames on a pipe, for checking the guest's reader.
async fn raw_host() -> (tokio::io::DuplexStream, RawGuest) {
    let (host, guest) = tokio::io::duplex(1 << 22);
    let handler = Arc::new(FakeGuest::default());
    handler.configured.store(true, Ordering::SeqCst);
    tokio::spawn(serve(guest, handler, "test"));
    // RawGuest's framing helpers work the same from the host's end.
    let mut raw = RawGuest {
        io: host,
        buf: Vec::new(),
    };
    assert!(matches!(raw.recv().await, Message::Ready(_)));
    let (a, _b) = tokio::io::duplex(1);
    (a, raw)
}

#[tokio::test]
async fn guest_fails_only_the_stream_a_host_floods_past_its_window() {
    let (_keep, mut raw) = raw_host().await;
    raw.send(Message::Call {
        call: 1,
        kind: CallKind::Invoke,
        head: call_head(&[("x-stall-body", "1")]),
    })
    .await;
    let per_frame = (MAX_DATA_CHUNK + HEADER_LEN) as u32;
    for _ in 0..INITIAL_WINDOW / per_frame + 1 {
        raw.send(Message::RequestBody {
            call: 1,
            data: pattern(MAX_DATA_CHUNK, 7),
        })
        .await;
    }
    let error = raw
        .recv_until(|m| match m {
            Message::Error { stream: 1, error } => Some(error.clone()),
            _ => None,
        })
        .await;
    assert_eq!(error.code, ErrorCode::Protocol);
    assert!(error.message.contains("window"), "{error:?}");
    // The connection still serves: another call is answered.
    raw.send(Message::Call {
        call: 2,
        kind: CallKind::Invoke,
        head: CallHead::default(),
    })
    .await;
    raw.send(Message::RequestBody {
        call: 2,
        data: Bytes::from_static(b"ok"),
    })
    .await;
    raw.send(Message::RequestEnd { call: 2 }).await;
    raw.recv_until(|m| matches!(m, Message::ResponseEnd { call: 2 }).then_some(()))
        .await;
}

#[tokio::test]
async fn guest_waits_for_window_before_sending_more_response() {
    let (_keep, mut raw) = raw_host().await;
    let body = pattern(4 * INITIAL_WINDOW as usize, 9);
    raw.send(Message::Call {
        call: 1,
        kind: CallKind::Invoke,
        head: CallHead::default(),
    })
    .await;
    // The request body within the guest's window, as a host must send it.
    let mut credit = INITIAL_WINDOW;
    for chunk in body.chunks(MAX_DATA_CHUNK) {
        let cost = (chunk.len() + HEADER_LEN) as u32;
        while credit < cost {
            credit += raw
                .recv_until(|m| match m {
                    Message::WindowUpdate {
                        stream: 1,
                        increment,
                    } => Some(*increment),
                    _ => None,
                })
                .await;
        }
        credit -= cost;
        raw.send(Message::RequestBody {
            call: 1,
            data: Bytes::copy_from_slice(chunk),
        })
        .await;
    }
    raw.send(Message::RequestEnd { call: 1 }).await;
    // Without grants the guest stops at the window: a Ping sent after it
    // stopped is answered, and no more body than the window came first.
    let mut received = 0u32;
    let mut got = BytesMut::new();
    let mut pinged = false;
    loop {
        match raw.recv().await {
            Message::ResponseBody { data, .. } => {
                received += (data.len() + HEADER_LEN) as u32;
                got.extend_from_slice(&data);
                assert!(received <= INITIAL_WINDOW, "guest sent past the window");
                if received + (MAX_DATA_CHUNK + HEADER_LEN) as u32 > INITIAL_WINDOW && !pinged {
                    raw.send(Message::Ping(Bytes::from_static(b"p"))).await;
                    pinged = true;
                }
            }
            Message::Pong(_) => break,
            Message::WindowUpdate { .. } | Message::ResponseHead { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // Grant the rest; the whole body arrives and ends.
    raw.send(Message::WindowUpdate {
        stream: 1,
        increment: 4 * INITIAL_WINDOW,
    })
    .await;
    loop {
        match raw.recv().await {
            Message::ResponseBody { data, .. } => got.extend_from_slice(&data),
            Message::ResponseEnd { call: 1 } => break,
            Message::WindowUpdate { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got.freeze(), body);
}

#[tokio::test]
async fn guest_rejects_malformed_and_oversized_window_updates() {
    use FrameError as F;
    for payload in [
        vec![1u8],
        vec![0, 0, 0, 0, 0],
        0u32.to_be_bytes().to_vec(),
        (MAX_WINDOW + 1).to_be_bytes().to_vec(),
    ] {
        let mut bytes = header(V, FrameType::WindowUpdate as u8, 1, payload.len() as u32);
        bytes.extend_from_slice(&payload);
        server_rejects(bytes, |e| {
            matches!(e, ServeError::Frame(F::BadWindowUpdate(_)))
        })
        .await;
    }
    let mut conn = header(V, FrameType::WindowUpdate as u8, 0, 4);
    conn.extend_from_slice(&100u32.to_be_bytes());
    server_rejects(conn, |e| {
        matches!(e, ServeError::Frame(F::BadStream { .. }))
    })
    .await;
    // Over the maximum on a live stream: that stream fails, not the guest.
    let (_keep, mut raw) = raw_host().await;
    raw.send(Message::Call {
        call: 4,
        kind: CallKind::Invoke,
        head: call_head(&[("x-stall-body", "1")]),
    })
    .await;
    raw.send(Message::WindowUpdate {
        stream: 4,
        increment: MAX_WINDOW,
    })
    .await;
    let error = raw
        .recv_until(|m| match m {
            Message::Error { stream: 4, error } => Some(error.clone()),
            _ => None,
        })
        .await;
    assert_eq!(error.code, ErrorCode::Protocol);
    assert!(error.message.contains("over the maximum"), "{error:?}");
    raw.send(Message::Ping(Bytes::from_static(b"still"))).await;
    raw.recv_until(|m| matches!(m, Message::Pong(_)).then_some(()))
        .await;
}
