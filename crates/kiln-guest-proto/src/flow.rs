//! Per-stream flow control (protocol version 2).
//!
//! Every call and exec session has a window in each direction: the bytes
//! its sender may still put on the connection for that stream before the
//! receiver grants more with a [`crate::FrameType::WindowUpdate`] frame.
//! A flow-controlled frame costs its encoded size ([`frame_cost`]: payload
//! plus the 12-byte header, so a flood of tiny frames is bounded too).
//! Both windows start at [`INITIAL_WINDOW`]; a receiver grants back what
//! its consumer has taken once that reaches half the initial window.
//!
//! Flow-controlled frames: guest -> host ResponseBody, ExecStdout,
//! ExecStderr; host -> guest RequestBody, ExecStdin, ExecStdinClose,
//! ExecResize. Heads, ends, exits, errors and cancels are not (a stream
//! has at most one of each that matters).
//!
//! So the receiver never waits for one stream's consumer while reading
//! the shared connection: it buffers at most a window per stream, and a
//! slow consumer only stops its own stream's sender. A peer that sends
//! past the window, or grants a window over [`MAX_WINDOW`], fails that
//! stream only; a WindowUpdate that does not decode (wrong size, stream 0,
//! increment 0 or over [`MAX_WINDOW`]) is a malformed frame and ends the
//! connection like any other.

use std::sync::Mutex;

use tokio::sync::Semaphore;

use crate::frame::{Frame, HEADER_LEN};

/// Window each side of each stream starts with (256 KiB: four full data
/// chunks, so one stream can keep the connection busy while its consumer
/// keeps up).
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest window a receiver may grant on one stream (16 MiB).
pub const MAX_WINDOW: u32 = 16 << 20;

/// What a flow-controlled frame takes out of its stream's window.
pub fn frame_cost(frame: &Frame) -> u32 {
    data_cost(frame.payload.len())
}

/// The cost of a frame with `payload_len` payload bytes.
pub fn data_cost(payload_len: usize) -> u32 {
    // Payloads are at most MAX_PAYLOAD (1 MiB), so this cannot overflow.
    (payload_len + HEADER_LEN) as u32
}

/// A stream's window as its receiver keeps it.
#[derive(Debug)]
pub(crate) struct RecvWindow {
    state: Mutex<RecvState>,
}

#[derive(Debug)]
struct RecvState {
    /// What the peer may still send.
    credit: u32,
    /// Consumed but not yet granted back.
    pending: u32,
}

impl RecvWindow {
    pub(crate) fn new() -> RecvWindow {
        RecvWindow {
            state: Mutex::new(RecvState {
                credit: INITIAL_WINDOW,
                pending: 0,
            }),
        }
    }

    /// A frame costing `cost` arrived; false if the peer had no credit for it.
    pub(crate) fn arrived(&self, cost: u32) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.credit.checked_sub(cost) {
            Some(left) => {
                s.credit = left;
                true
            }
            None => false,
        }
    }

    /// The consumer took a frame costing `cost`; returns the increment to
    /// grant the peer now, if any. The credit is counted before the grant
    /// goes out, so data sent against it is never refused.
    pub(crate) fn consumed(&self, cost: u32) -> Option<u32> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.pending = s.pending.saturating_add(cost);
        if s.pending < INITIAL_WINDOW / 2 {
            return None;
        }
        let grant = s.pending;
        s.pending = 0;
        s.credit = s.credit.saturating_add(grant);
        Some(grant)
    }
}

/// A stream's window as its sender keeps it: permits are bytes.
#[derive(Debug)]
pub(crate) struct SendWindow {
    permits: Semaphore,
}

/// The stream ended (or the connection did) while waiting for window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowClosed;

/// A grant that would take the window over [`MAX_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowOverflow {
    pub(crate) window: u64,
}

impl SendWindow {
    pub(crate) fn new() -> SendWindow {
        SendWindow {
            permits: Semaphore::new(INITIAL_WINDOW as usize),
        }
    }

    /// Wait until the peer lets us send `cost` bytes, and take them.
    pub(crate) async fn take(&self, cost: u32) -> Result<(), WindowClosed> {
        let permit = self
            .permits
            .acquire_many(cost)
            .await
            .map_err(|_| WindowClosed)?;
        permit.forget();
        Ok(())
    }

    /// The peer granted `increment` more bytes.
    pub(crate) fn grant(&self, increment: u32) -> Result<(), WindowOverflow> {
        let window = self.permits.available_permits() as u64 + u64::from(increment);
        if window > u64::from(MAX_WINDOW) {
            return Err(WindowOverflow { window });
        }
        self.permits.add_permits(increment as usize);
        Ok(())
    }

    /// The stream is over: wake every waiting sender with [`WindowClosed`].
    pub(crate) fn close(&self) {
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn receiver_refuses_what_it_did_not_grant() {
        let w = RecvWindow::new();
        assert!(w.arrived(INITIAL_WINDOW - 10));
        assert!(!w.arrived(11));
        assert!(w.arrived(10));
        assert!(!w.arrived(1));
        // Consuming grants back once half the window is consumed, and the
        // credit is usable at once.
        assert_eq!(w.consumed(INITIAL_WINDOW / 2 - 1), None);
        assert!(!w.arrived(1));
        assert_eq!(w.consumed(1), Some(INITIAL_WINDOW / 2));
        assert!(w.arrived(INITIAL_WINDOW / 2));
        assert!(!w.arrived(1));
    }

    #[tokio::test]
    async fn sender_waits_for_grants_and_wakes_on_close() {
        let w = std::sync::Arc::new(SendWindow::new());
        w.take(INITIAL_WINDOW).await.unwrap();
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.take(100).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        w.grant(100).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.take(1).await }
        });
        w.close();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .unwrap()
                .unwrap(),
            Err(WindowClosed)
        );
    }

    #[test]
    fn grants_past_the_maximum_are_refused() {
        let w = SendWindow::new();
        assert!(w.grant(MAX_WINDOW - INITIAL_WINDOW).is_ok());
        assert_eq!(
            w.grant(1),
            Err(WindowOverflow {
                window: u64::from(MAX_WINDOW) + 1
            })
        );
    }
}
