//! Typed messages and their mapping onto frames.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::flow::MAX_WINDOW;
use crate::frame::{Frame, FrameError, FrameType, PROTOCOL_VERSION};

/// The guest is up and listening; first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ready {
    pub protocol_version: u8,
    pub guest_version: String,
    /// The guest was configured on an earlier connection (the host
    /// reconnected): skip Configure.
    #[serde(default)]
    pub configured: bool,
}

impl Ready {
    pub fn current(guest_version: impl Into<String>) -> Ready {
        Ready {
            protocol_version: PROTOCOL_VERSION,
            guest_version: guest_version.into(),
            configured: false,
        }
    }
}

/// Everything the guest needs to start the function, sent once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestConfig {
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// None: loopback only (egress mode `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    pub process: ProcessConfig,
    pub disks: DiskConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfig {
    /// Guest interface name, normally `eth0`.
    #[serde(default = "default_interface")]
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
}

fn default_interface() -> String {
    "eth0".into()
}

/// The function's process (FC's customRuntimeConfig).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessConfig {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub port: u16,
    #[serde(default = "default_working_dir")]
    pub working_dir: String,
    /// How long to wait for the port to accept connections.
    #[serde(default = "default_start_timeout_ms")]
    pub start_timeout_ms: u64,
}

fn default_working_dir() -> String {
    "/code".into()
}

fn default_start_timeout_ms() -> u64 {
    30_000
}

/// Which block devices hold what. Disk order is fixed by the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskConfig {
    /// The runtime root filesystem (read-only); None: an empty root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Disk>,
    /// The code package, mounted read-only at /code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Disk>,
    /// Writable disk for the overlay's upper layer; None: tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<Disk>,
    /// Layers, merged under /opt in this order (first is topmost).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Disk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// e.g. `/dev/vdb`.
    pub device: String,
    pub fs: FsType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Erofs,
    Squashfs,
    Ext4,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Squashfs => "squashfs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// Why a [`GuestConfig`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid guest config: {0}")]
pub struct ConfigError(pub String);

impl GuestConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.instance_id.is_empty() || self.instance_id.len() > 128 {
            return bad("instanceId must be 1..=128 characters".into());
        }
        if let Some(h) = &self.hostname {
            if h.is_empty()
                || h.len() > 64
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return bad(format!("hostname {h:?} is not a valid host name"));
            }
        }
        if let Some(net) = &self.network {
            if net.prefix_len > 32 {
                return bad(format!("prefixLen {} is over 32", net.prefix_len));
            }
            if net.interface.is_empty() || net.interface.len() > 15 || net.interface.contains('/') {
                return bad(format!(
                    "interface {:?} is not an interface name",
                    net.interface
                ));
            }
            if let Some(mtu) = net.mtu {
                if !(68..=65535).contains(&mtu) {
                    return bad(format!("mtu {mtu} is outside 68..=65535"));
                }
            }
            if net.dns.len() > 3 {
                return bad("at most 3 dns servers".into());
            }
        }
        let p = &self.process;
        if p.command.is_empty() || p.command[0].is_empty() {
            return bad("process.command is empty".into());
        }
        if p.port == 0 {
            return bad("process.port must not be 0".into());
        }
        if !p.working_dir.starts_with('/') {
            return bad(format!("workingDir {:?} is not absolute", p.working_dir));
        }
        for (name, value) in &p.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                return bad(format!("environment variable {name:?} is not valid"));
            }
        }
        if p.command.iter().chain(&p.args).any(|a| a.contains('\0')) {
            return bad("process arguments must not contain NUL".into());
        }
        let disks = self
            .disks
            .runtime
            .iter()
            .chain(&self.disks.code)
            .chain(&self.disks.scratch)
            .chain(&self.disks.layers);
        for d in disks {
            let name = d.device.strip_prefix("/dev/").unwrap_or("");
            if name.is_empty() || name.contains('/') || name.contains("..") {
                return bad(format!("disk {:?} is not a /dev block device", d.device));
            }
        }
        if self.disks.layers.len() > 5 {
            return bad("at most 5 layers".into());
        }
        Ok(())
    }
}

/// Guest's answer to Configure: the function's port accepts connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Configured {
    /// Milliseconds from Configure to the port accepting connections.
    pub start_ms: u64,
}

/// Which runtime hook a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// `POST /invoke`
    Invoke,
    /// `POST /initialize`
    Initialize,
    /// `GET /pre-stop`
    PreStop,
}

impl CallKind {
    pub fn method(self) -> &'static str {
        match self {
            CallKind::Invoke | CallKind::Initialize => "POST",
            CallKind::PreStop => "GET",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            CallKind::Invoke => "/invoke",
            CallKind::Initialize => "/initialize",
            CallKind::PreStop => "/pre-stop",
        }
    }

    fn frame_type(self) -> FrameType {
        match self {
            CallKind::Invoke => FrameType::Invoke,
            CallKind::Initialize => FrameType::Initialize,
            CallKind::PreStop => FrameType::PreStop,
        }
    }
}

/// Request head of a call: FC's `x-fc-*` headers and any others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallHead {
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The guest gives up on the runtime after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseHead {
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// An instance-login session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<TtySize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// kiln-guest's own messages.
    Guest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogLine {
    pub stream: LogStream,
    pub line: String,
}

/// What went wrong, in an Error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The peer sent a frame that does not decode; the connection closes.
    BadFrame,
    /// A frame that is valid but not allowed now (e.g. a call before Configure).
    Protocol,
    NotConfigured,
    AlreadyConfigured,
    InvalidConfig,
    /// Mounting, networking or starting the process failed.
    StartFailed,
    /// The runtime's port refused or dropped the connection.
    RuntimeUnavailable,
    Timeout,
    ExecFailed,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[error("{code:?}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Every message of the protocol. `call`/`session` ids are non-zero and
/// chosen by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready(Ready),
    Configure(Box<GuestConfig>),
    Configured(Configured),
    Call {
        call: u32,
        kind: CallKind,
        head: CallHead,
    },
    RequestBody {
        call: u32,
        data: Bytes,
    },
    RequestEnd {
        call: u32,
    },
    ResponseHead {
        call: u32,
        head: ResponseHead,
    },
    ResponseBody {
        call: u32,
        data: Bytes,
    },
    ResponseEnd {
        call: u32,
    },
    /// The host gave up on a call or exec session (the guest stops it).
    Cancel {
        call: u32,
    },
    /// Either way: the peer may send `increment` more bytes on `stream`.
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    ExecStart {
        session: u32,
        request: ExecRequest,
    },
    ExecStdin {
        session: u32,
        data: Bytes,
    },
    ExecStdinClose {
        session: u32,
    },
    ExecStdout {
        session: u32,
        data: Bytes,
    },
    ExecStderr {
        session: u32,
        data: Bytes,
    },
    ExecResize {
        session: u32,
        size: TtySize,
    },
    ExecExit {
        session: u32,
        status: ExitStatus,
    },
    Log(LogLine),
    /// `stream` 0: about the connection; otherwise about that call/session.
    Error {
        stream: u32,
        error: ErrorBody,
    },
    Ping(Bytes),
    Pong(Bytes),
}

fn json<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs cannot fail (no maps with non-string keys).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn parse<T: DeserializeOwned>(frame: &Frame) -> Result<T, FrameError> {
    let text = std::str::from_utf8(&frame.payload)
        .map_err(|_| FrameError::BadUtf8 { kind: frame.kind })?;
    serde_json::from_str(text).map_err(|source| FrameError::BadJson {
        kind: frame.kind,
        source,
    })
}

fn conn(frame: &Frame) -> Result<(), FrameError> {
    if frame.stream != 0 {
        return Err(FrameError::BadStream {
            kind: frame.kind,
            stream: frame.stream,
            expected: "connection frames use stream 0",
        });
    }
    Ok(())
}

fn stream(frame: &Frame) -> Result<u32, FrameError> {
    if frame.stream == 0 {
        return Err(FrameError::BadStream {
            kind: frame.kind,
            stream: 0,
            expected: "call and exec frames need a non-zero stream",
        });
    }
    Ok(frame.stream)
}

fn empty(frame: &Frame) -> Result<u32, FrameError> {
    if !frame.payload.is_empty() {
        return Err(FrameError::UnexpectedPayload { kind: frame.kind });
    }
    stream(frame)
}

fn window_update(frame: &Frame) -> Result<Message, FrameError> {
    let stream = stream(frame)?;
    let bytes: [u8; 4] = frame.payload[..].try_into().map_err(|_| {
        FrameError::BadWindowUpdate(format!(
            "payload of {} bytes, expected 4",
            frame.payload.len()
        ))
    })?;
    let increment = u32::from_be_bytes(bytes);
    if increment == 0 || increment > MAX_WINDOW {
        return Err(FrameError::BadWindowUpdate(format!(
            "increment {increment} is outside 1..={MAX_WINDOW}"
        )));
    }
    Ok(Message::WindowUpdate { stream, increment })
}

impl Message {
    pub fn to_frame(&self) -> Frame {
        use FrameType as T;
        match self {
            Message::Ready(r) => Frame::new(T::Ready, 0, json(r)),
            Message::Configure(c) => Frame::new(T::Configure, 0, json(c)),
            Message::Configured(c) => Frame::new(T::Configured, 0, json(c)),
            Message::Call { call, kind, head } => Frame::new(kind.frame_type(), *call, json(head)),
            Message::RequestBody { call, data } => Frame::new(T::RequestBody, *call, data.clone()),
            Message::RequestEnd { call } => Frame::new(T::RequestEnd, *call, Bytes::new()),
            Message::ResponseHead { call, head } => Frame::new(T::ResponseHead, *call, json(head)),
            Message::ResponseBody { call, data } => {
                Frame::new(T::ResponseBody, *call, data.clone())
            }
            Message::ResponseEnd { call } => Frame::new(T::ResponseEnd, *call, Bytes::new()),
            Message::Cancel { call } => Frame::new(T::Cancel, *call, Bytes::new()),
            Message::WindowUpdate { stream, increment } => Frame::new(
                T::WindowUpdate,
                *stream,
                Bytes::copy_from_slice(&increment.to_be_bytes()),
            ),
            Message::ExecStart { session, request } => {
                Frame::new(T::ExecStart, *session, json(request))
            }
            Message::ExecStdin { session, data } => {
                Frame::new(T::ExecStdin, *session, data.clone())
            }
            Message::ExecStdinClose { session } => {
                Frame::new(T::ExecStdinClose, *session, Bytes::new())
            }
            Message::ExecStdout { session, data } => {
                Frame::new(T::ExecStdout, *session, data.clone())
            }
            Message::ExecStderr { session, data } => {
                Frame::new(T::ExecStderr, *session, data.clone())
            }
            Message::ExecResize { session, size } => {
                Frame::new(T::ExecResize, *session, json(size))
            }
            Message::ExecExit { session, status } => {
                Frame::new(T::ExecExit, *session, json(status))
            }
            Message::Log(l) => Frame::new(T::Log, 0, json(l)),
            Message::Error { stream, error } => Frame::new(T::Error, *stream, json(error)),
            Message::Ping(d) => Frame::new(T::Ping, 0, d.clone()),
            Message::Pong(d) => Frame::new(T::Pong, 0, d.clone()),
        }
    }

    /// Decode and validate a frame's payload; never panics.
    pub fn from_frame(frame: Frame) -> Result<Message, FrameError> {
        use FrameType as T;
        let call = |kind| -> Result<Message, FrameError> {
            Ok(Message::Call {
                call: stream(&frame)?,
                kind,
                head: parse(&frame)?,
            })
        };
        Ok(match frame.kind {
            T::Ready => {
                conn(&frame)?;
                Message::Ready(parse(&frame)?)
            }
            T::Configure => {
                conn(&frame)?;
                Message::Configure(Box::new(parse(&frame)?))
            }
            T::Configured => {
                conn(&frame)?;
                Message::Configured(parse(&frame)?)
            }
            T::Invoke => call(CallKind::Invoke)?,
            T::Initialize => call(CallKind::Initialize)?,
            T::PreStop => call(CallKind::PreStop)?,
            T::RequestBody => Message::RequestBody {
                call: stream(&frame)?,
                data: frame.payload,
            },
            T::RequestEnd => Message::RequestEnd {
                call: empty(&frame)?,
            },
            T::ResponseHead => Message::ResponseHead {
                call: stream(&frame)?,
                head: parse(&frame)?,
            },
            T::ResponseBody => Message::ResponseBody {
                call: stream(&frame)?,
                data: frame.payload,
            },
            T::ResponseEnd => Message::ResponseEnd {
                call: empty(&frame)?,
            },
            T::Cancel => Message::Cancel {
                call: empty(&frame)?,
            },
            T::WindowUpdate => window_update(&frame)?,
            T::ExecStart => Message::ExecStart {
                session: stream(&frame)?,
                request: parse(&frame)?,
            },
            T::ExecStdin => Message::ExecStdin {
                session: stream(&frame)?,
                data: frame.payload,
            },
            T::ExecStdinClose => Message::ExecStdinClose {
                session: empty(&frame)?,
            },
            T::ExecStdout => Message::ExecStdout {
                session: stream(&frame)?,
                data: frame.payload,
            },
            T::ExecStderr => Message::ExecStderr {
                session: stream(&frame)?,
                data: frame.payload,
            },
            T::ExecResize => Message::ExecResize {
                session: stream(&frame)?,
                size: parse(&frame)?,
            },
            T::ExecExit => Message::ExecExit {
                session: stream(&frame)?,
                status: parse(&frame)?,
            },
            T::Log => {
                conn(&frame)?;
                Message::Log(parse(&frame)?)
            }
            T::Error => Message::Error {
                stream: frame.stream,
                error: parse(&frame)?,
            },
            T::Ping => {
                conn(&frame)?;
                Message::Ping(frame.payload)
            }
            T::Pong => {
                conn(&frame)?;
                Message::Pong(frame.payload)
            }
        })
    }

    /// Encode to wire bytes.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        self.to_frame().to_bytes()
    }

    /// Decode one message from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<(Message, usize), FrameError> {
        let (frame, used) = Frame::decode(buf)?;
        Ok((Message::from_frame(frame)?, used))
    }
}
