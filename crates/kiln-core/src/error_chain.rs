//! An error and its causes on one line, the way every Kiln service logs and
//! reports them.

use std::error::Error;

/// `"outer: cause: cause"`: the error's message followed by each of its
/// [`Error::source`]s in order.
///
/// Errors should not repeat their source in their own message, but some
/// (other crates' among them) do; a cause whose text the line already ends
/// with is left out so it appears once.
pub fn error_chain(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot start the instance")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot read /etc/kiln.toml")]
    struct Middle(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot open {path}: {source}")]
    struct Repeats {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    fn denied() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied")
    }

    #[test]
    fn every_cause_follows_its_error_once() {
        let e = Outer(Middle(denied()));
        assert_eq!(
            error_chain(&e),
            "Cannot start the instance: Cannot read /etc/kiln.toml: permission denied"
        );
    }

    #[test]
    fn an_error_without_a_source_is_its_message() {
        assert_eq!(error_chain(&denied()), "permission denied");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Repeats {
            path: "/x",
            source: denied(),
        };
        assert_eq!(error_chain(&e), "Cannot open /x: permission denied");
    }
}
