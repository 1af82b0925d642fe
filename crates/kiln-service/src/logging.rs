//! Tracing setup, the same for every binary: `RUST_LOG` filters (else a
//! default level), and lines are text for people or JSON for collectors.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?} is unknown; use text or json")),
        }
    }
}

/// `--log-format`, for every binary's arguments (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// How log lines are written: text, or json (one object per line).
    #[arg(
        long,
        env = "KILN_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// Where a binary writes its log lines: services to stdout, the `kiln`
/// CLI to stderr (its stdout is for answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Install, for the whole process, a subscriber filtered by `RUST_LOG`
/// (else `default_filter`) writing `format` lines to `output`, in colour
/// only on a terminal. A second call (a test harness that already set one)
/// leaves the first in place.
pub fn init(format: LogFormat, default_filter: &str, output: Output) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let subscriber = match output {
        Output::Stdout => subscriber(
            format,
            filter,
            std::io::stdout,
            std::io::stdout().is_terminal(),
        ),
        Output::Stderr => subscriber(
            format,
            filter,
            std::io::stderr,
            std::io::stderr().is_terminal(),
        ),
    };
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// A subscriber writing `format` lines that pass `filter` to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

#[cfg(test)]
mod tests {
    use kiln_test_support::CapturedLog;

    use super::*;

    /// Serve one request through the real accept loop and return what the
    /// subscriber wrote.
    fn access_line(format: LogFormat) -> Vec<String> {
        let out = CapturedLog::default();
        let sub = subscriber(format, EnvFilter::new("info"), out.clone(), false);
        tracing::subscriber::with_default(sub, || {
            let req = http::Request::builder()
                .method("DELETE")
                .uri("/v1/leases/l-1?Signature=secret")
                .header("x-fc-request-id", "r-1")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let pending =
                kiln_internal_api::access_log::begin(&req, "127.0.0.1:9".parse().unwrap())
                    .expect("info is enabled");
            let resp = http::Response::builder()
                .status(204)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            pending.finish(&resp);
            tracing::debug!("filtered out at the default level");
        });
        out.lines()
    }

    #[test]
    fn json_lines_parse_and_carry_the_access_fields() {
        let lines = access_line(LogFormat::Json);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "kiln::access");
        assert_eq!(v["message"], "access");
        assert_eq!(v["method"], "DELETE");
        assert_eq!(v["path"], "/v1/leases/l-1");
        assert_eq!(v["status"], 204);
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["peer"], "127.0.0.1:9");
        assert_eq!(v["bytes_out"], 0);
        assert!(v["duration_us"].is_u64());
        assert!(v["timestamp"].is_string());
        assert!(!lines[0].contains("secret"));
    }

    #[test]
    fn text_is_the_default_and_is_not_json() {
        assert_eq!(LogFormat::default(), LogFormat::Text);
        let lines = access_line(LogFormat::Text);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_err());
        assert!(lines[0].contains("status=204"), "{}", lines[0]);
        assert!(lines[0].contains("path=/v1/leases/l-1"), "{}", lines[0]);
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("yaml".parse::<LogFormat>().is_err());
    }
}
