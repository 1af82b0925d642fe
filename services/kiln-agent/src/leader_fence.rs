//! Refusing a deposed scheduler leader's calls.
//!
//! A clustered scheduler stamps its calls to agents with its leadership's
//! fencing token and tells every agent the token in its registration and
//! heartbeat answers. The agent remembers the newest token it has seen and
//! refuses to create or destroy instances for a caller with an older one:
//! once the new leader's first heartbeat answer has arrived, a leader that
//! lost its lease (paused, partitioned) can no longer place or remove
//! anything on this node, even with a call it started before it lost the
//! lease. Calls without a token come from a single scheduler and pass.

use std::sync::atomic::{AtomicI64, Ordering};

use kiln_core::{FcError, FcErrorKind};

/// The newest leader token this agent has seen (0: none).
#[derive(Debug, Default)]
pub struct LeaderFence {
    newest: AtomicI64,
}

impl LeaderFence {
    /// A leader with `token` answered: raise the fence to it.
    pub fn observe(&self, token: i64) {
        let before = self.newest.fetch_max(token, Ordering::AcqRel);
        if token > before && before > 0 {
            tracing::info!(token, previous = before, "a new scheduler leader took over");
        }
    }

    /// Whether a call stamped with `token` may act; raises the fence to a
    /// newer token.
    pub fn admit(&self, token: Option<i64>) -> Result<(), FcError> {
        let Some(token) = token else { return Ok(()) };
        let newest = self.newest.load(Ordering::Acquire);
        if token < newest {
            tracing::warn!(
                token,
                newest,
                "refused a call from a deposed scheduler leader"
            );
            return Err(FcError::unavailable(format!(
                "this call comes from a deposed scheduler leader (token {token}); the leader \
                 now holds token {newest}"
            ))
            .with_kind(FcErrorKind::NotLeader));
        }
        self.observe(token);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_tokens_are_refused_once_a_newer_leader_is_known() {
        let f = LeaderFence::default();
        f.admit(None).unwrap();
        f.admit(Some(3)).unwrap();
        f.observe(5);
        let e = f.admit(Some(3)).unwrap_err();
        assert_eq!(e.kind, Some(FcErrorKind::NotLeader));
        assert!(e.message.contains("token 5"), "{e}");
        f.admit(Some(5)).unwrap();
        f.admit(Some(6)).unwrap();
        assert!(f.admit(Some(5)).is_err(), "a call raised the fence too");
        f.observe(4);
        f.admit(Some(6)).unwrap();
        f.admit(None).unwrap();
    }
}
