//! SIGTERM and SIGINT: the two ways an operator (or systemd) asks a service
//! to stop.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Both stop signals, caught from the moment this is made (so a signal
/// that arrives while the service starts is not lost).
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Install the handlers; needs a running tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Wait for the next stop signal and name it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
