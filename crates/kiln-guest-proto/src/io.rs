//! The writer task both ends share: frames from many tasks are queued on a
//! channel and written in order by one task, so frames never interleave
//! byte-wise and concurrent calls interleave frame-wise.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::frame::{write_frame, Frame};

/// Queue depth of outgoing frames per connection.
pub(crate) const OUT_QUEUE: usize = 256;

/// Writes queued frames until every sender is gone or `stop` fires; on
/// `stop` it writes what is already queued, then shuts the stream down
/// (senders held elsewhere, e.g. by a log forwarder, cannot keep it open).
pub(crate) fn spawn_writer<W>(
    mut writer: W,
    mut rx: mpsc::Receiver<Frame>,
    mut stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                biased;
                f = rx.recv() => f,
                _ = &mut stop => {
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(frame) = frame else { break };
            if let Err(e) = write_frame(&mut writer, &frame).await {
                tracing::debug!(error = %e, "guest channel write failed");
                return;
            }
            // Flush once the queue is drained, not per frame.
            if rx.is_empty() {
                if let Err(e) = writer.flush().await {
                    tracing::debug!(error = %e, "guest channel flush failed");
                    return;
                }
            }
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    })
}
