//! One typed router for every Kiln API (the gateway's public and internal
//! listeners, the scheduler, the agent).
//!
//! Each service declares ONE table: a row per route, method + path pattern
//! -> a function that builds the service's typed route value from the
//! named path parameters. Handlers then match on that value and get their
//! parameters as typed fields: no positional indexing, no `expect`.
//!
//! ```text
//! route(Method::POST, "/v1/nodes/{node}/heartbeat", |p| Ok(Api::Heartbeat { node: p.parse("node")? })),
//! ```
//!
//! Paths are matched by [`matchit`] (the matcher axum uses): `{name}`
//! captures one non-empty segment. A path no row matches is FC's
//! `PathNotSupported` (404); a path some row matches with another method is
//! `MethodNotAllowed` (405). Parameters are percent-decoded before they are
//! parsed, so an encoded `/` can never smuggle a second segment into an id.
//!
//! The row type is the place to add a column (issue 15 will add the roles
//! allowed to call each route): every route of a service stays one line in
//! one table, auditable at a glance.

use std::borrow::Cow;
use std::fmt::Display;
use std::str::FromStr;

use http::Method;
use kiln_core::{FcError, FcErrorCode};

/// Builds a service's typed route value from a matched path's parameters.
pub type Build<R> = fn(&PathParams<'_>) -> Result<R, FcError>;

/// One row of a route table.
pub struct Route<R> {
    pub method: Method,
    /// A [`matchit`] pattern: `{name}` captures one path segment.
    pub path: &'static str,
    pub build: Build<R>,
}

/// A row of a route table, written as one line.
pub const fn route<R>(method: Method, path: &'static str, build: Build<R>) -> Route<R> {
    Route {
        method,
        path,
        build,
    }
}

/// Why a route table cannot be built: a bug in the table, found by each
/// service's unit test that builds it.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("Route {method} {path} is declared twice")]
    Duplicate { method: Method, path: &'static str },
    #[error("Route pattern {path} conflicts with another or is malformed")]
    Pattern {
        path: &'static str,
        #[source]
        source: matchit::InsertError,
    },
}

/// The methods served on one path pattern.
struct PathEntry<R> {
    pattern: &'static str,
    methods: Vec<(Method, Build<R>)>,
}

/// A compiled route table.
pub struct Router<R> {
    tree: matchit::Router<usize>,
    entries: Vec<PathEntry<R>>,
    ignore_trailing_slash: bool,
}

impl<R> Router<R> {
    /// Compile `table`; fails on a pattern matchit refuses or a method
    /// declared twice for one pattern.
    pub fn new(table: &[Route<R>]) -> Result<Self, RouterError> {
        let mut tree = matchit::Router::new();
        let mut entries: Vec<PathEntry<R>> = Vec::new();
        for row in table {
            let index = match entries.iter().position(|e| e.pattern == row.path) {
                Some(i) => i,
                None => {
                    tree.insert(row.path, entries.len()).map_err(|source| {
                        RouterError::Pattern {
                            path: row.path,
                            source,
                        }
                    })?;
                    entries.push(PathEntry {
                        pattern: row.path,
                        methods: Vec::new(),
                    });
                    entries.len() - 1
                }
            };
            let entry = &mut entries[index];
            if entry.methods.iter().any(|(m, _)| *m == row.method) {
                return Err(RouterError::Duplicate {
                    method: row.method.clone(),
                    path: row.path,
                });
            }
            entry.methods.push((row.method.clone(), row.build));
        }
        Ok(Self {
            tree,
            entries,
            ignore_trailing_slash: false,
        })
    }

    /// Treat `/v1/nodes/` as `/v1/nodes` (the internal APIs always have).
    pub fn ignore_trailing_slash(mut self) -> Self {
        self.ignore_trailing_slash = true;
        self
    }

    /// The typed route for `method` on `path` (a URI path, without its
    /// query), or FC's 404/405, or the builder's error for a parameter
    /// that does not parse.
    pub fn route(&self, method: &Method, path: &str) -> Result<R, FcError> {
        let lookup = match path.strip_suffix('/') {
            Some(trimmed) if self.ignore_trailing_slash && !trimmed.is_empty() => trimmed,
            _ => path,
        };
        let Ok(matched) = self.tree.at(lookup) else {
            return Err(FcError::new(
                FcErrorCode::PathNotSupported,
                format!("'{method}' against '{path}' is not supported"),
            ));
        };
        let entry = &self.entries[*matched.value];
        let Some((_, build)) = entry.methods.iter().find(|(m, _)| m == method) else {
            return Err(FcError::new(
                FcErrorCode::MethodNotAllowed,
                format!("method {method} is not allowed on {path}"),
            ));
        };
        build(&PathParams {
            params: matched.params,
            pattern: entry.pattern,
        })
    }

    /// Every (method, pattern) the table serves, in table order per
    /// pattern: for tests that walk a whole table.
    pub fn rows(&self) -> impl Iterator<Item = (&Method, &'static str)> + '_ {
        self.entries
            .iter()
            .flat_map(|e| e.methods.iter().map(move |(m, _)| (m, e.pattern)))
    }
}

/// The named parameters of a matched path.
pub struct PathParams<'a> {
    params: matchit::Params<'a, 'a>,
    pattern: &'static str,
}

impl PathParams<'_> {
    /// The parameter as it appears in the path (still percent-encoded).
    pub fn raw(&self, name: &str) -> Result<&str, FcError> {
        self.params.get(name).ok_or_else(|| {
            // A table row whose builder names a parameter its pattern
            // lacks: a bug, answered as one rather than a panic.
            FcError::internal(format!(
                "route {} has no parameter {{{name}}}",
                self.pattern
            ))
        })
    }

    /// The parameter percent-decoded (borrowed when nothing was encoded).
    pub fn text(&self, name: &str) -> Result<Cow<'_, str>, FcError> {
        percent_encoding::percent_decode_str(self.raw(name)?)
            .decode_utf8()
            .map_err(|_| FcError::invalid_argument(format!("path parameter {name} is not UTF-8")))
    }

    /// The parameter percent-decoded and owned.
    pub fn string(&self, name: &str) -> Result<String, FcError> {
        self.text(name).map(Cow::into_owned)
    }

    /// The parameter percent-decoded and parsed, typically into a typed
    /// id (whose error names the kind and value); a value that does not
    /// parse is InvalidArgument with the type's own message.
    pub fn parse<T>(&self, name: &str) -> Result<T, FcError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.text(name)?
            .parse::<T>()
            .map_err(|e| FcError::invalid_argument(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Api {
        List,
        Create,
        Get { id: String },
        Stop { id: String, n: u32 },
    }

    fn table() -> Vec<Route<Api>> {
        vec![
            route(Method::GET, "/v1/things", |_| Ok(Api::List)),
            route(Method::POST, "/v1/things", |_| Ok(Api::Create)),
            route(Method::GET, "/v1/things/{id}", |p| {
                Ok(Api::Get {
                    id: p.string("id")?,
                })
            }),
            route(Method::PUT, "/v1/things/{id}/stop/{n}", |p| {
                Ok(Api::Stop {
                    id: p.string("id")?,
                    n: p.parse("n")?,
                })
            }),
        ]
    }

    #[test]
    fn routes_to_typed_values_with_named_params() {
        let r = Router::new(&table()).unwrap();
        assert_eq!(r.route(&Method::GET, "/v1/things").unwrap(), Api::List);
        assert_eq!(r.route(&Method::POST, "/v1/things").unwrap(), Api::Create);
        assert_eq!(
            r.route(&Method::GET, "/v1/things/a%2Db").unwrap(),
            Api::Get { id: "a-b".into() }
        );
        assert_eq!(
            r.route(&Method::PUT, "/v1/things/x/stop/7").unwrap(),
            Api::Stop {
                id: "x".into(),
                n: 7
            }
        );
        assert_eq!(r.rows().count(), 4);
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_is_405() {
        let r = Router::new(&table()).unwrap();
        let e = r.route(&Method::GET, "/v1/nope").unwrap_err();
        assert_eq!(e.code, FcErrorCode::PathNotSupported);
        assert_eq!(e.code.http_status(), 404);
        let e = r.route(&Method::DELETE, "/v1/things").unwrap_err();
        assert_eq!(e.code, FcErrorCode::MethodNotAllowed);
        assert_eq!(e.code.http_status(), 405);
        // An empty segment is no parameter.
        let e = r.route(&Method::PUT, "/v1/things//stop/1").unwrap_err();
        assert_eq!(e.code, FcErrorCode::PathNotSupported);
    }

    #[test]
    fn parameters_that_do_not_parse_are_invalid_arguments() {
        let r = Router::new(&table()).unwrap();
        let e = r
            .route(&Method::PUT, "/v1/things/x/stop/seven")
            .unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        assert_eq!(e.message, "invalid digit found in string");
        let e = r.route(&Method::GET, "/v1/things/%FF").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
    }

    #[test]
    fn trailing_slash_only_when_asked() {
        let strict = Router::new(&table()).unwrap();
        let e = strict.route(&Method::GET, "/v1/things/").unwrap_err();
        assert_eq!(e.code, FcErrorCode::PathNotSupported);
        let lenient = Router::new(&table()).unwrap().ignore_trailing_slash();
        assert_eq!(
            lenient.route(&Method::GET, "/v1/things/").unwrap(),
            Api::List
        );
        assert_eq!(
            lenient.route(&Method::GET, "/").unwrap_err().code,
            FcErrorCode::PathNotSupported
        );
    }

    #[test]
    fn a_misnamed_parameter_is_an_internal_error_not_a_panic() {
        let r = Router::new(&[route(Method::GET, "/v1/{id}", |p| {
            p.string("other").map(|id| Api::Get { id })
        })])
        .unwrap();
        let e = r.route(&Method::GET, "/v1/x").unwrap_err();
        assert_eq!(e.code.http_status(), 500);
    }

    #[test]
    fn broken_tables_are_refused() {
        let dup = [
            route(Method::GET, "/v1/things", |_| Ok(Api::List)),
            route(Method::GET, "/v1/things", |_| Ok(Api::Create)),
        ];
        assert!(matches!(
            Router::new(&dup),
            Err(RouterError::Duplicate { .. })
        ));
        let conflict = [
            route(Method::GET, "/v1/{a}", |_| Ok(Api::List)),
            route(Method::GET, "/v1/{b}", |_| Ok(Api::List)),
        ];
        assert!(matches!(
            Router::new(&conflict),
            Err(RouterError::Pattern { .. })
        ));
    }
}
