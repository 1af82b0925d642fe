//! Kiln's runtime bootstraps (`runtimes/python/bootstrap.py`,
//! `runtimes/nodejs/bootstrap.js`, embedded in the built-in runtimes'
//! tree) run by the host's own python3 and node against a code folder:
//! FC's custom-runtime HTTP contract on one side, FC's event handler model
//! on the other. The end-to-end tests through `kiln dev` are in
//! services/kiln/tests/builtin_runtimes.rs; these pin each behaviour of
//! the bootstraps themselves, fast and without root.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_test_support::skip::{skip, Category};

const PY_HANDLERS: &str = r#"
import logging
runs = []

def initialize(context):
    runs.append(context.request_id)
    context.logger.info("init %s", context.function.initializer)

def pre_stop(context):
    print("stopping", context.request_id, flush=True)

def handler(event, context):
    logging.getLogger().info("event of %d bytes", len(event))
    c = context.credentials
    return {
        "eventType": type(event).__name__,
        "event": event.decode(),
        "requestId": context.request_id,
        "creds": [c.access_key_id, c.access_key_secret, c.security_token],
        "function": [context.function.name, context.function.handler,
                     context.function.memory, context.function.timeout,
                     context.function.initializer, context.function.initialization_timeout],
        "region": context.region,
        "accountId": context.account_id,
        "runs": len(runs),
    }

def raw(event, context):
    return b"\x00\xffraw"

def text(event, context):
    return "héllo"

def nothing(event, context):
    return None

def fails(event, context):
    raise KeyError("missing-key")
"#;

const JS_HANDLERS: &str = r#"
const runs = [];
exports.initialize = async (context) => {
  runs.push(context.requestId);
  context.logger.info(`init ${context.function.initializer}`);
};
exports.preStop = (context, callback) => {
  console.log('stopping', context.requestId);
  callback(null);
};
exports.handler = async (event, context) => {
  console.log(`event of ${event.length} bytes`);
  const c = context.credentials;
  return {
    eventType: Buffer.isBuffer(event) ? 'Buffer' : typeof event,
    event: event.toString(),
    requestId: context.requestId,
    creds: [c.accessKeyId, c.accessKeySecret, c.securityToken],
    function: [context.function.name, context.function.handler,
               context.function.memory, context.function.timeout,
               context.function.initializer, context.function.initializationTimeout],
    region: context.region,
    accountId: context.accountId,
    runs: runs.length,
  };
};
exports.raw = async () => Buffer.from([0, 255, 0x72, 0x61, 0x77]);
exports.text = (event, context, callback) => callback(null, 'héllo');
exports.nothing = async () => undefined;
exports.fails = async () => { throw new SyntaxError('missing-key'); };
exports.failsByCallback = (event, context, callback) => callback(new Error('told'));
"#;

struct Lang {
    interpreter: &'static str,
    bootstrap: &'static str,
    file: &'static str,
    handlers: &'static str,
    pre_stop: &'static str,
    error_type: &'static str,
}

const PYTHON: Lang = Lang {
    interpreter: "python3",
    bootstrap: "runtimes/python/bootstrap.py",
    file: "index.py",
    handlers: PY_HANDLERS,
    pre_stop: "index.pre_stop",
    error_type: "KeyError",
};

const NODE: Lang = Lang {
    interpreter: "node",
    bootstrap: "runtimes/nodejs/bootstrap.js",
    file: "index.js",
    handlers: JS_HANDLERS,
    pre_stop: "index.preStop",
    error_type: "SyntaxError",
};

/// A bootstrap process serving a code folder on a loopback port; killed
/// (by its pid) when dropped.
struct Runtime {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Runtime {
    fn start(lang: &Lang) -> Option<Runtime> {
        if kiln_test_support::which(lang.interpreter).is_none() {
            skip(
                Category::Tool,
                format!("{} is not installed", lang.interpreter),
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("code");
        std::fs::create_dir(&code).unwrap();
        std::fs::write(code.join(lang.file), lang.handlers).unwrap();
        let out = dir.path().join("out.log");
        let log = std::fs::File::create(&out).unwrap();
        let port = kiln_test_support::free_port();
        let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR")).join(lang.bootstrap);
        let child = Command::new(lang.interpreter)
            .arg(&bootstrap)
            .env("FC_FUNC_CODE_PATH", &code)
            .env("FC_CUSTOM_LISTEN_PORT", port.to_string())
            .env("FC_ACCOUNT_ID", "1234")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let rt = Runtime {
            child,
            port,
            out,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "no port: {}", rt.output());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(rt)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn connect(&self) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            stream: s,
        }
    }
}

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One keep-alive HTTP/1.1 connection, as the agent holds them.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        chunked: bool,
    ) -> Answer {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut bytes = if chunked {
            req.push_str("transfer-encoding: chunked\r\n\r\n");
            let mut b = req.into_bytes();
            for part in body.chunks(3) {
                b.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                b.extend_from_slice(part);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"0\r\n\r\n");
            b
        } else {
            req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            let mut b = req.into_bytes();
            b.extend_from_slice(body);
            b
        };
        self.stream.write_all(&bytes).unwrap();
        bytes.clear();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
        }
        let len: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn invoke(&mut self, handler: &str, rid: &str, body: &[u8]) -> Answer {
        self.send(
            "POST",
            "/invoke",
            &[
                ("x-fc-request-id", rid),
                ("x-fc-function-handler", handler),
                ("x-fc-function-name", "fn"),
                ("x-fc-function-memory", "256"),
                ("x-fc-function-timeout", "7"),
                ("x-fc-access-key-id", "STS.id"),
                ("x-fc-access-key-secret", "secret"),
                ("x-fc-security-token", "token"),
                ("x-fc-region", "cn-test"),
            ],
            body,
            false,
        )
    }
}

fn assert_function_error(a: &Answer, error_type: &str) -> serde_json::Value {
    assert_eq!(a.status, 404, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        a.headers.get("x-fc-status").map(String::as_str),
        Some("404")
    );
    let v = a.json();
    assert_eq!(v["errorType"], error_type, "{v}");
    assert!(v["errorMessage"].is_string(), "{v}");
    v
}

fn event_handler_model(lang: &Lang) {
    let Some(rt) = Runtime::start(lang) else {
        return;
    };
    let mut conn = rt.connect();

    // The initializer runs once; a second /initialize does not run it again.
    for rid in ["init-1", "init-2"] {
        let a = conn.send(
            "POST",
            "/initialize",
            &[
                ("x-fc-request-id", rid),
                ("x-fc-function-initializer", "index.initialize"),
                ("x-fc-initialization-timeout", "9"),
            ],
            b"",
            false,
        );
        assert_eq!(a.status, 200, "{}", rt.output());
    }

    // The event as bytes and the context from the agent's headers, on one
    // keep-alive connection, chunked or not.
    for (i, chunked) in [(0, false), (1, true)] {
        let rid = format!("req-{i}");
        let event = br#"{"hello": "world"}"#;
        let a = if chunked {
            conn.send(
                "POST",
                "/invoke",
                &[
                    ("x-fc-request-id", &rid),
                    ("x-fc-function-handler", "index.handler"),
                ],
                event,
                true,
            )
        } else {
            conn.invoke("index.handler", &rid, event)
        };
        assert_eq!(a.status, 200, "{}", rt.output());
        assert!(!a.headers.contains_key("x-fc-status"));
        let v = a.json();
        assert_eq!(v["event"], r#"{"hello": "world"}"#);
        assert_eq!(
            v["eventType"],
            if lang.interpreter == "node" {
                "Buffer"
            } else {
                "bytes"
            }
        );
        assert_eq!(v["requestId"], rid.as_str());
        assert_eq!(v["runs"], 1, "the initializer ran once: {v}");
        assert_eq!(v["accountId"], "1234", "from FC_ACCOUNT_ID: {v}");
        if !chunked {
            assert_eq!(v["creds"], serde_json::json!(["STS.id", "secret", "token"]));
            assert_eq!(
                v["function"],
                serde_json::json!(["fn", "index.handler", 256, 7, "index.initialize", 9]),
                "the initializer from /initialize is in every call's context"
            );
            assert_eq!(v["region"], "cn-test");
        }
    }

    // Return values: bytes as they are, text as UTF-8, nothing as empty.
    assert_eq!(conn.invoke("index.raw", "r1", b"").body, b"\x00\xffraw");
    assert_eq!(
        conn.invoke("index.text", "r2", b"").body,
        "héllo".as_bytes()
    );
    let a = conn.invoke("index.nothing", "r3", b"");
    assert_eq!((a.status, a.body.len()), (200, 0));

    // An exception: FC's error body, the function's frames only.
    let v = assert_function_error(&conn.invoke("index.fails", "r4", b""), lang.error_type);
    assert!(
        v["errorMessage"].as_str().unwrap().contains("missing-key"),
        "{v}"
    );
    let stack: Vec<&str> = v["stackTrace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(stack.iter().any(|f| f.contains(lang.file)), "{v}");
    assert!(!stack.iter().any(|f| f.contains("bootstrap")), "{v}");

    // Handler strings that name nothing.
    let v = assert_function_error(&conn.invoke("nope.handler", "r5", b""), "ImportModuleError");
    assert!(v["errorMessage"].as_str().unwrap().contains("nope"), "{v}");
    let v = assert_function_error(&conn.invoke("index.absent", "r6", b""), "HandlerNotFound");
    assert!(
        v["errorMessage"].as_str().unwrap().contains("absent"),
        "{v}"
    );
    assert_function_error(&conn.invoke("nodot", "r7", b""), "InvalidHandler");

    // The instance carries on after errors.
    assert_eq!(conn.invoke("index.handler", "r8", b"x").status, 200);

    // PreStop.
    let a = conn.send(
        "GET",
        "/pre-stop",
        &[
            ("x-fc-request-id", "stop-1"),
            ("x-fc-instance-lifecycle-pre-stop-handler", lang.pre_stop),
        ],
        b"",
        false,
    );
    assert_eq!(a.status, 200, "{}", rt.output());

    // Logs: the hooks' FC framing lines, the logger's lines with the
    // request id, the error with its request id.
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = rt.output();
        if out.contains("FC PreStop End RequestId: stop-1") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = out.lines().collect();
    for want in [
        "FC Initialize Start RequestId: init-1",
        "FC Initialize End RequestId: init-1",
        "FC PreStop Start RequestId: stop-1",
        "FC PreStop End RequestId: stop-1",
    ] {
        assert!(lines.contains(&want), "{want} in:\n{out}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" init-1 [INFO] init index.initialize")
                || l.contains(" init-1 [INFO] init ")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" req-0 [") && l.contains("event of 18 bytes")),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.contains(" r4 [ERROR]")), "{out}");
    assert!(out.contains("stopping stop-1"), "{out}");
    // Invocations are framed by the agent, not twice by the bootstrap.
    assert!(!out.contains("FC Invoke Start"), "{out}");
}

#[test]
fn python_bootstrap_follows_fcs_event_handler_model() {
    event_handler_model(&PYTHON);
}

#[test]
fn nodejs_bootstrap_follows_fcs_event_handler_model() {
    event_handler_model(&NODE);
}

#[test]
fn nodejs_callback_errors_are_function_errors() {
    let Some(rt) = Runtime::start(&NODE) else {
        return;
    };
    let mut conn = rt.connect();
    let v = assert_function_error(&conn.invoke("index.failsByCallback", "c1", b""), "Error");
    assert_eq!(v["errorMessage"], "told");
}
