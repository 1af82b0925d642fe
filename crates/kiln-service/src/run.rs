//! Run one service from start to graceful stop, and say how it ended.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::logging::{self, LogArgs, LogFormat, Output};
use crate::signals::StopSignals;

/// The exit codes of every Kiln service binary.
pub mod exit {
    /// Stopped gracefully after SIGTERM or SIGINT.
    pub const STOPPED: u8 = 0;
    /// The configuration could not be loaded, the service could not
    /// start, or a second signal cut its graceful stop short; stderr says
    /// which. (clap answers bad arguments with 2.)
    pub const FAILED: u8 = 1;
}

/// A way for the service to be asked to stop: signals in production, a
/// script in tests.
pub(crate) trait StopSource {
    fn recv(&mut self) -> impl Future<Output = &'static str>;
}

impl StopSource for StopSignals {
    fn recv(&mut self) -> impl Future<Output = &'static str> {
        StopSignals::recv(self)
    }
}

/// How a run ended badly: the exit code and the error with its causes.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: anyhow::Error) -> Self {
        Self { code, error }
    }
}

/// One service binary: its name (the prefix of its error lines), its
/// config file and how it logs.
pub struct Service {
    name: &'static str,
    config: PathBuf,
    log_format: LogFormat,
    default_filter: &'static str,
}

impl Service {
    pub fn new(name: &'static str, config: impl Into<PathBuf>, log: &LogArgs) -> Self {
        Self {
            name,
            config: config.into(),
            log_format: log.log_format,
            default_filter: "info",
        }
    }

    /// The filter when `RUST_LOG` is unset (default `info`).
    pub fn default_filter(mut self, filter: &'static str) -> Self {
        self.default_filter = filter;
        self
    }

    /// Start tracing, `load` (and validate) the config, `start` the
    /// service on a multi-threaded runtime, wait for SIGTERM or SIGINT,
    /// then `stop` it. Errors print once on stderr as `name: error: cause:
    /// ...`; the exit code is one of [`exit`].
    pub fn run<C, H, LE, SE, SF, TF>(
        self,
        load: impl FnOnce(&Path) -> Result<C, LE>,
        start: impl FnOnce(C) -> SF,
        stop: impl FnOnce(H) -> TF,
    ) -> ExitCode
    where
        LE: Into<anyhow::Error>,
        SE: Into<anyhow::Error>,
        SF: Future<Output = Result<H, SE>>,
        TF: Future<Output = ()>,
    {
        self.run_until(load, start, |_| std::future::pending(), stop)
    }

    /// [`Service::run`] for a service that may also end by itself: when
    /// the future `ended` makes from the running handle resolves (a
    /// scheduler deposed as leader), the service is stopped and the
    /// process exits with [`exit::FAILED`] and that reason, for its
    /// supervisor to restart it.
    pub fn run_until<C, H, LE, SE, SF, EF, TF>(
        self,
        load: impl FnOnce(&Path) -> Result<C, LE>,
        start: impl FnOnce(C) -> SF,
        ended: impl FnOnce(&H) -> EF,
        stop: impl FnOnce(H) -> TF,
    ) -> ExitCode
    where
        LE: Into<anyhow::Error>,
        SE: Into<anyhow::Error>,
        SF: Future<Output = Result<H, SE>>,
        EF: Future<Output = String>,
        TF: Future<Output = ()>,
    {
        logging::init(self.log_format, self.default_filter, Output::Stdout);
        let result = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("Cannot start the async runtime")
            .map_err(|e| Failure::new(exit::FAILED, e))
            .and_then(|rt| {
                rt.block_on(async {
                    let signals = StopSignals::install()
                        .context("Cannot install the SIGTERM and SIGINT handlers")
                        .map_err(|e| Failure::new(exit::FAILED, e))?;
                    self.serve(load, start, ended, stop, signals).await
                })
            });
        self.exit_code(result)
    }

    /// Print a failure that happened before [`Service::run`] (the agent's
    /// mount namespace, say) the way `run` prints its own.
    pub fn fail(&self, error: impl Into<anyhow::Error>) -> ExitCode {
        self.exit_code(Err(Failure::new(exit::FAILED, error.into())))
    }

    fn exit_code(&self, result: Result<(), Failure>) -> ExitCode {
        match result {
            Ok(()) => ExitCode::from(exit::STOPPED),
            Err(f) => {
                eprintln!("{}", self.error_line(&f.error));
                ExitCode::from(f.code)
            }
        }
    }

    fn error_line(&self, error: &anyhow::Error) -> String {
        format!("{}: {}", self.name, error_chain(error))
    }

    pub(crate) async fn serve<C, H, LE, SE, SF, EF, TF>(
        &self,
        load: impl FnOnce(&Path) -> Result<C, LE>,
        start: impl FnOnce(C) -> SF,
        ended: impl FnOnce(&H) -> EF,
        stop: impl FnOnce(H) -> TF,
        mut signals: impl StopSource,
    ) -> Result<(), Failure>
    where
        LE: Into<anyhow::Error>,
        SE: Into<anyhow::Error>,
        SF: Future<Output = Result<H, SE>>,
        EF: Future<Output = String>,
        TF: Future<Output = ()>,
    {
        let config = load(&self.config).map_err(|e| Failure::new(exit::FAILED, e.into()))?;
        // Starting may wait (a standby scheduler waits to lead): a signal
        // meanwhile stops it there.
        let started = tokio::select! {
            biased;
            started = start(config) => started,
            signal = signals.recv() => {
                tracing::info!(signal, "stopped before it finished starting");
                return Ok(());
            }
        };
        let handle = started.map_err(|e| {
            Failure::new(
                exit::FAILED,
                e.into().context(format!("Cannot start {}", self.name)),
            )
        })?;
        let ended = ended(&handle);
        let signal = tokio::select! {
            biased;
            signal = signals.recv() => signal,
            why = ended => {
                tracing::error!(reason = %why, "ended by itself; stopping");
                stop(handle).await;
                return Err(Failure::new(exit::FAILED, anyhow::anyhow!(why)));
            }
        };
        tracing::info!(signal, "shutting down");
        let stopping = stop(handle);
        tokio::pin!(stopping);
        tokio::select! {
            () = &mut stopping => {
                tracing::info!("stopped");
                Ok(())
            }
            again = signals.recv() => Err(Failure::new(
                exit::FAILED,
                anyhow::anyhow!("{again} before the graceful shutdown finished; stopped at once"),
            )),
        }
    }
}

/// An error and its causes on one line, each once.
fn error_chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Stop signals from a script: each `recv` takes the next, and waits
    /// forever when the script is done.
    struct Script(Vec<&'static str>);

    impl StopSource for Script {
        async fn recv(&mut self) -> &'static str {
            if self.0.is_empty() {
                std::future::pending::<()>().await;
            }
            self.0.remove(0)
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot parse config file {0}")]
    struct ParseError(String, #[source] std::num::ParseIntError);

    fn service() -> Service {
        Service::new("kiln-test", "/etc/kiln/test.toml", &LogArgs::default())
    }

    fn never<H>(_: &H) -> std::future::Pending<String> {
        std::future::pending()
    }

    fn load_ok(p: &Path) -> Result<String, ParseError> {
        Ok(p.display().to_string())
    }

    #[tokio::test]
    async fn a_bad_config_exits_1_with_its_causes() {
        let svc = service();
        let f = svc
            .serve(
                |p: &Path| {
                    Err::<(), _>(ParseError(
                        p.display().to_string(),
                        "x".parse::<u8>().unwrap_err(),
                    ))
                },
                |_: ()| async { Ok::<(), anyhow::Error>(()) },
                never,
                |_: ()| async {},
                Script(vec!["SIGTERM"]),
            )
            .await
            .unwrap_err();
        assert_eq!(f.code, exit::FAILED);
        assert_eq!(
            svc.error_line(&f.error),
            "kiln-test: Cannot parse config file /etc/kiln/test.toml: invalid digit found in string"
        );
    }

    #[tokio::test]
    async fn a_failed_start_exits_1_and_names_the_service() {
        let svc = service();
        let f = svc
            .serve(
                load_ok,
                |_| async { Err::<(), _>(anyhow::anyhow!("Cannot bind 127.0.0.1:1")) },
                never,
                |_: ()| async {},
                Script(vec!["SIGTERM"]),
            )
            .await
            .unwrap_err();
        assert_eq!(f.code, exit::FAILED);
        assert_eq!(
            svc.error_line(&f.error),
            "kiln-test: Cannot start kiln-test: Cannot bind 127.0.0.1:1"
        );
    }

    #[tokio::test]
    async fn a_signal_stops_the_service_gracefully() {
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let r = service()
            .serve(
                load_ok,
                |config: String| async move {
                    assert_eq!(config, "/etc/kiln/test.toml");
                    Ok::<_, anyhow::Error>(flag)
                },
                never,
                |flag: Arc<AtomicBool>| async move { flag.store(true, Ordering::SeqCst) },
                Script(vec!["SIGINT"]),
            )
            .await;
        assert!(r.is_ok());
        assert!(stopped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_second_signal_cuts_a_hung_shutdown_short() {
        let f = service()
            .serve(
                load_ok,
                |_| async { Ok::<(), anyhow::Error>(()) },
                never,
                |_: ()| std::future::pending::<()>(),
                Script(vec!["SIGTERM", "SIGINT"]),
            )
            .await
            .unwrap_err();
        assert_eq!(f.code, exit::FAILED);
        assert!(
            f.error.to_string().starts_with("SIGINT before"),
            "{}",
            f.error
        );
    }

    #[tokio::test]
    async fn a_service_that_ends_by_itself_is_stopped_and_exits_1() {
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let f = service()
            .serve(
                load_ok,
                |_| async move { Ok::<_, anyhow::Error>(flag) },
                |_: &Arc<AtomicBool>| async { "lost the scheduler leadership".to_owned() },
                |flag: Arc<AtomicBool>| async move { flag.store(true, Ordering::SeqCst) },
                Script(vec![]),
            )
            .await
            .unwrap_err();
        assert_eq!(f.code, exit::FAILED);
        assert_eq!(f.error.to_string(), "lost the scheduler leadership");
        assert!(stopped.load(Ordering::SeqCst), "stopped before exiting");
    }

    #[tokio::test]
    async fn a_signal_while_starting_stops_the_service_there() {
        let r = service()
            .serve(
                load_ok,
                |_| std::future::pending::<Result<(), anyhow::Error>>(),
                never,
                |_: ()| async { panic!("nothing started, nothing to stop") },
                Script(vec!["SIGTERM"]),
            )
            .await;
        assert!(r.is_ok());
    }

    #[test]
    fn exit_codes_map_to_the_process() {
        let svc = service();
        assert_eq!(svc.exit_code(Ok(())), ExitCode::from(0));
        assert_eq!(
            svc.exit_code(Err(Failure::new(exit::FAILED, anyhow::anyhow!("bad")))),
            ExitCode::from(1)
        );
    }
}
