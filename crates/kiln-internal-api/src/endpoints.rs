//! A service reachable at several addresses of which one answers at a
//! time: the schedulers of a cluster, one leading, the others standing by.
//!
//! Configured as one comma-separated string (`scheduler_url =
//! "https://sched-a:9443,https://sched-b:9443"`, as etcd's endpoints or a
//! PostgreSQL multi-host URL); a single URL is a list of one. Calls go to
//! the address that last answered; when it is unreachable or answers
//! `NotLeader`, the call moves on to the next, once around the list, and
//! the one that answers is remembered.
//!
//! A call is moved on only when it cannot have taken effect where it was
//! sent: the address refused it as a standby, or no connection could be
//! made or kept (a leader killed mid-call, whose work died with it). A
//! timeout is not moved on: the leader may still be doing the work.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_core::FcErrorKind;

use crate::client::InternalClientError;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Endpoints {
    urls: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

impl Endpoints {
    /// `list`: URLs separated by commas (spaces around them ignored).
    /// Errors name the entry that is not an `https://` URL.
    pub fn parse(list: &str) -> Result<Self, String> {
        let urls: Vec<String> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .collect();
        if let Some(bad) = urls
            .iter()
            .find(|u| !u.starts_with("https://") || u.len() <= 8)
        {
            return Err(format!(
                "{bad:?} is not an https:// URL (give one URL, or several separated by commas)"
            ));
        }
        Ok(Self {
            urls: urls.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The address calls go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Run `call` against the current address, moving on as the module
    /// docs say; the last error when none answers.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, InternalClientError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, InternalClientError>>,
    {
        let start = self.current.load(Ordering::Relaxed);
        let n = self.urls.len();
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            match call(self.urls[at].clone()).await {
                Err(e) if i + 1 < n && moves_on(&e) => {
                    tracing::debug!(url = %self.urls[at], error = %e, "trying the next address");
                    last = Some(e);
                }
                answer => {
                    if i > 0 && answer.is_ok() {
                        tracing::info!(url = %self.urls[at], "following the scheduler that answers");
                        self.current.store(at, Ordering::Relaxed);
                    }
                    return answer;
                }
            }
        }
        Err(last.expect("at least one address was tried"))
    }
}

/// Whether a call that failed so may go to another address.
fn moves_on(e: &InternalClientError) -> bool {
    match e {
        InternalClientError::Remote { error, .. } => error.kind == Some(FcErrorKind::NotLeader),
        InternalClientError::Transport { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::FcError;
    use std::sync::Mutex;

    fn not_leader(url: &str) -> InternalClientError {
        InternalClientError::Remote {
            url: url.to_owned(),
            error: FcError::unavailable("standby").with_kind(FcErrorKind::NotLeader),
        }
    }

    #[test]
    fn parses_one_or_several_https_urls() {
        let e = Endpoints::parse("https://a:1/").unwrap();
        assert_eq!(e.urls(), ["https://a:1"]);
        let e = Endpoints::parse("https://a:1, https://b:2").unwrap();
        assert_eq!(e.urls(), ["https://a:1", "https://b:2"]);
        assert_eq!(e.current(), "https://a:1");
        for bad in ["", "http://a:1", "https://a:1,", "https://a:1,,https://b:2"] {
            assert!(Endpoints::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn moves_past_standbys_and_dead_addresses_and_sticks_to_the_leader() {
        let e = Endpoints::parse("https://a,https://b,https://c").unwrap();
        let tried = Mutex::new(Vec::new());
        let answer = e
            .call(|url| {
                tried.lock().unwrap().push(url.clone());
                async move {
                    match url.as_str() {
                        "https://a" => Err(not_leader(&url)),
                        "https://b" => Err(InternalClientError::Transport {
                            url,
                            message: "connection refused".into(),
                        }),
                        _ => Ok(url),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, "https://c");
        assert_eq!(tried.lock().unwrap().len(), 3);
        assert_eq!(
            e.current(),
            "https://c",
            "the next call starts at the leader"
        );
    }

    #[tokio::test]
    async fn other_failures_are_answered_not_retried_elsewhere() {
        let e = Endpoints::parse("https://a,https://b").unwrap();
        let calls = Mutex::new(0);
        let err = e
            .call(|url| {
                *calls.lock().unwrap() += 1;
                async move {
                    Err::<(), _>(InternalClientError::Timeout {
                        url,
                        timeout: std::time::Duration::from_secs(1),
                    })
                }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, InternalClientError::Timeout { .. }));
        assert_eq!(
            *calls.lock().unwrap(),
            1,
            "a timed-out call may have taken effect"
        );
        // Everyone a standby: the last refusal comes back.
        let err = e
            .call(|url| async move { Err::<(), _>(not_leader(&url)) })
            .await
            .unwrap_err();
        assert!(matches!(err, InternalClientError::Remote { .. }));
        assert_eq!(e.current(), "https://a");
    }
}
