//! The wire format: a fixed 12-byte header and a payload.
//!
//! ```text
//! 0      2        3     4           8            12
//! | "KG" | version | type | stream u32 | length u32 | payload (length bytes)
//! ```
//!
//! All integers are big-endian. `stream` is 0 for connection-level frames
//! and the call or exec-session id otherwise. Control frames carry JSON,
//! data frames raw bytes. A payload is at most [`MAX_PAYLOAD`] bytes, so a
//! peer can never make the other side allocate more than that per frame.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"KG";
/// The protocol version this crate speaks (and the only one it accepts:
/// every frame header carries it, so a peer of another version is refused
/// at its first frame; the host reports that as a version mismatch).
///
/// 1: the first protocol. 2: per-stream flow control ([`crate::flow`],
/// WindowUpdate frames); a version-1 peer would never grant window, so the
/// two cannot be mixed.
pub const PROTOCOL_VERSION: u8 = 2;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted in one frame (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bodies and exec output are sent in chunks of at most this size, so that
/// concurrent calls interleave fairly on one connection.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// What a frame carries. The numbering is part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// guest -> host, stream 0, JSON [`crate::Ready`].
    Ready = 0x01,
    /// host -> guest, stream 0, JSON [`crate::GuestConfig`].
    Configure = 0x02,
    /// guest -> host, stream 0, JSON [`crate::Configured`].
    Configured = 0x03,
    /// host -> guest, JSON [`crate::CallHead`]: start a `POST /invoke`.
    Invoke = 0x10,
    /// host -> guest, JSON [`crate::CallHead`]: start a `POST /initialize`.
    Initialize = 0x11,
    /// host -> guest, JSON [`crate::CallHead`]: start a `GET /pre-stop`.
    PreStop = 0x12,
    /// host -> guest, data: a chunk of the request body.
    RequestBody = 0x13,
    /// host -> guest, empty: the request body is complete.
    RequestEnd = 0x14,
    /// guest -> host, JSON [`crate::ResponseHead`].
    ResponseHead = 0x15,
    /// guest -> host, data: a chunk of the response body.
    ResponseBody = 0x16,
    /// guest -> host, empty: the response is complete.
    ResponseEnd = 0x17,
    /// host -> guest, empty: the host gave up on this call or exec session.
    Cancel = 0x18,
    /// either way, 4 bytes (u32 increment, 1..=[`crate::flow::MAX_WINDOW`]):
    /// the sender of this frame lets its peer send that many more bytes on
    /// the stream (see [`crate::flow`]). Since protocol version 2.
    WindowUpdate = 0x19,
    /// host -> guest, JSON [`crate::ExecRequest`]: start an instance-login session.
    ExecStart = 0x20,
    /// host -> guest, data: bytes for the session's stdin.
    ExecStdin = 0x21,
    /// host -> guest, empty: close the session's stdin.
    ExecStdinClose = 0x22,
    /// guest -> host, data.
    ExecStdout = 0x23,
    /// guest -> host, data.
    ExecStderr = 0x24,
    /// host -> guest, JSON [`crate::TtySize`].
    ExecResize = 0x25,
    /// guest -> host, JSON [`crate::ExitStatus`]: the session ended.
    ExecExit = 0x26,
    /// guest -> host, stream 0, JSON [`crate::LogLine`]: output of the function.
    Log = 0x30,
    /// either way, JSON [`crate::ErrorBody`]; stream 0 for the connection.
    Error = 0x3f,
    /// either way, stream 0, data echoed back in a Pong.
    Ping = 0x40,
    /// either way, stream 0, the Ping's data.
    Pong = 0x41,
}

impl FrameType {
    /// Every frame type, for tests and fuzzers.
    pub const ALL: [FrameType; 24] = [
        FrameType::Ready,
        FrameType::Configure,
        FrameType::Configured,
        FrameType::Invoke,
        FrameType::Initialize,
        FrameType::PreStop,
        FrameType::RequestBody,
        FrameType::RequestEnd,
        FrameType::ResponseHead,
        FrameType::ResponseBody,
        FrameType::ResponseEnd,
        FrameType::Cancel,
        FrameType::WindowUpdate,
        FrameType::ExecStart,
        FrameType::ExecStdin,
        FrameType::ExecStdinClose,
        FrameType::ExecStdout,
        FrameType::ExecStderr,
        FrameType::ExecResize,
        FrameType::ExecExit,
        FrameType::Log,
        FrameType::Error,
        FrameType::Ping,
        FrameType::Pong,
    ];

    /// Decode a type byte.
    pub fn from_u8(value: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == value)
    }
}

/// One frame, undecoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub stream: u32,
    pub payload: Bytes,
}

/// Why bytes are not a valid frame or message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("Bad frame magic {0:02x?}")]
    BadMagic([u8; 2]),
    #[error("Unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("Unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("Frame payload of {len} bytes exceeds the maximum of {max}")]
    Oversize { len: usize, max: usize },
    #[error("Frame truncated: {needed} bytes needed, {have} available")]
    Truncated { needed: usize, have: usize },
    #[error("{kind:?} frame is not UTF-8")]
    BadUtf8 { kind: FrameType },
    #[error("{kind:?} frame has invalid JSON")]
    BadJson {
        kind: FrameType,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind:?} frame on stream {stream}: {expected}")]
    BadStream {
        kind: FrameType,
        stream: u32,
        expected: &'static str,
    },
    #[error("WindowUpdate frame: {0}")]
    BadWindowUpdate(String),
    #[error("{kind:?} frame must be empty")]
    UnexpectedPayload { kind: FrameType },
    #[error("I/O on the guest channel")]
    Io(#[from] std::io::Error),
}

impl Frame {
    pub fn new(kind: FrameType, stream: u32, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.into(),
        }
    }

    /// Encode into `out`. Panics never; refuses an oversize payload.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::Oversize {
                len: self.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        out.reserve(HEADER_LEN + self.payload.len());
        out.put_slice(&MAGIC);
        out.put_u8(PROTOCOL_VERSION);
        out.put_u8(self.kind as u8);
        out.put_u32(self.stream);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
        Ok(())
    }

    /// Encode into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// Decode one frame from the front of `buf`, returning it and the number
    /// of bytes it used. An incomplete frame is [`FrameError::Truncated`].
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
        if buf.len() < HEADER_LEN {
            // Check what we have so garbage is refused early.
            if !buf.is_empty() && buf[0] != MAGIC[0] || buf.len() >= 2 && buf[1] != MAGIC[1] {
                let mut magic = [0u8; 2];
                magic[..buf.len().min(2)].copy_from_slice(&buf[..buf.len().min(2)]);
                return Err(FrameError::BadMagic(magic));
            }
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                have: buf.len(),
            });
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&buf[..HEADER_LEN]);
        let (kind, stream, len) = parse_header(&header)?;
        let total = HEADER_LEN + len;
        if buf.len() < total {
            return Err(FrameError::Truncated {
                needed: total,
                have: buf.len(),
            });
        }
        let payload = Bytes::copy_from_slice(&buf[HEADER_LEN..total]);
        Ok((
            Frame {
                kind,
                stream,
                payload,
            },
            total,
        ))
    }
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(FrameType, u32, usize), FrameError> {
    if header[..2] != MAGIC {
        return Err(FrameError::BadMagic([header[0], header[1]]));
    }
    if header[2] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(header[2]));
    }
    let kind = FrameType::from_u8(header[3]).ok_or(FrameError::UnknownType(header[3]))?;
    let stream = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversize {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((kind, stream, len))
}

/// Read one frame. `Ok(None)` is a clean end of stream between frames; an
/// end of stream inside a frame is [`FrameError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut have = 0;
    while have < HEADER_LEN {
        let n = reader.read(&mut header[have..]).await?;
        if n == 0 {
            if have == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                have,
            });
        }
        have += n;
        // Refuse garbage as soon as the magic is wrong, without waiting for
        // a whole header that may never come.
        if have >= 2 && header[..2] != MAGIC {
            return Err(FrameError::BadMagic([header[0], header[1]]));
        }
    }
    let (kind, stream, len) = parse_header(&header)?;
    let mut payload = BytesMut::zeroed(len);
    let mut have = 0;
    while have < len {
        let n = reader.read(&mut payload[have..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN + len,
                have: HEADER_LEN + have,
            });
        }
        have += n;
    }
    Ok(Some(Frame {
        kind,
        stream,
        payload: payload.freeze(),
    }))
}

/// Write one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let bytes = frame.to_bytes()?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Frame {
        Frame::new(FrameType::RequestBody, 7, Bytes::from_static(b"hello"))
    }

    #[test]
    fn round_trip() {
        let bytes = frame().to_bytes().unwrap();
        assert_eq!(&bytes[..4], &[b'K', b'G', PROTOCOL_VERSION, 0x13]);
        let (decoded, used) = Frame::decode(&bytes).unwrap();
        assert_eq!(decoded, frame());
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn every_type_round_trips() {
        for kind in FrameType::ALL {
            assert_eq!(FrameType::from_u8(kind as u8), Some(kind));
            let f = Frame::new(kind, 3, vec![1u8, 2, 3]);
            assert_eq!(Frame::decode(&f.to_bytes().unwrap()).unwrap().0, f);
        }
    }

    #[test]
    fn bad_magic() {
        let mut bytes = frame().to_bytes().unwrap().to_vec();
        bytes[0] = b'X';
        assert!(matches!(
            Frame::decode(&bytes),
            Err(FrameError::BadMagic([b'X', b'G']))
        ));
        assert!(matches!(Frame::decode(b"X"), Err(FrameError::BadMagic(_))));
        assert!(matches!(Frame::decode(b"KX"), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn unknown_version() {
        let mut bytes = frame().to_bytes().unwrap().to_vec();
        // Version 1 (no flow control) and any future version.
        for v in [1, 3, 9] {
            bytes[2] = v;
            assert!(matches!(
                Frame::decode(&bytes),
                Err(FrameError::UnsupportedVersion(x)) if x == v
            ));
        }
    }

    #[test]
    fn unknown_type() {
        let mut bytes = frame().to_bytes().unwrap().to_vec();
        bytes[3] = 0x99;
        assert!(matches!(
            Frame::decode(&bytes),
            Err(FrameError::UnknownType(0x99))
        ));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut bytes = frame().to_bytes().unwrap()[..HEADER_LEN].to_vec();
        bytes[8..12].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
        assert!(matches!(
            Frame::decode(&bytes),
            Err(FrameError::Oversize { .. })
        ));
        let big = Frame::new(FrameType::RequestBody, 1, vec![0u8; MAX_PAYLOAD + 1]);
        assert!(matches!(big.to_bytes(), Err(FrameError::Oversize { .. })));
        let max = Frame::new(FrameType::RequestBody, 1, vec![0u8; MAX_PAYLOAD]);
        assert_eq!(Frame::decode(&max.to_bytes().unwrap()).unwrap().0, max);
    }

    #[test]
    fn truncated() {
        let bytes = frame().to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    Frame::decode(&bytes[..cut]),
                    Err(FrameError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn stream_reader() {
        let mut bytes = frame().to_bytes().unwrap().to_vec();
        bytes.extend_from_slice(&frame().to_bytes().unwrap());
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(frame()));
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(frame()));
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
        let mut r = &bytes[..5];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(FrameError::Truncated { .. })
        ));
        let mut r = &bytes[..HEADER_LEN + 2];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(FrameError::Truncated { .. })
        ));
        let mut r = &b"GET / HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(FrameError::BadMagic(_))
        ));
    }
}
