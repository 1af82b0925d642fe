//! One typed router for every Kiln API (the gateway's public and internal
//! listeners, the scheduler, the agent).
//!
//! Each service declares ONE table: a row per route, method, path pattern
//! and who may call it -> a function that builds the service's typed route
//! value from the named path parameters. Handlers then match on that value
//! and get their parameters as typed fields: no positional indexing, no
//! `expect`.
//!
//! ```text
//! route(POST, "/v1/nodes/{node}/heartbeat", AGENT_OWN_NODE, |p| Ok(Api::Heartbeat { node: p.parse("node")? })),
//! ```
//!
//! The third column of an internal table is its [`Callers`]: the roles
//! whose certificates may call the route (issue 15). A row cannot leave it
//! out (an internal table is a `[Route<R, Callers>]`, and only
//! [`Router::authorise`] routes one: the compiler refuses a table of
//! [`signed`] rows, and the router refuses to build with a row nobody may
//! call, which each service's table test builds). The gateway's public
//! table is written with [`signed`] rows instead: its requests are
//! authorised by their FC signature, not by a certificate.
//!
//! Paths are matched by [`matchit`] (the matcher axum uses): `{name}`
//! captures one non-empty segment. A path no row matches is FC's
//! `PathNotSupported` (404); a path some row matches with another method is
//! `MethodNotAllowed` (405); a caller the row does not admit is
//! `AccessDenied` (403, see [`crate::authz`]). Parameters are
//! percent-decoded before they are parsed, so an encoded `/` can never
//! smuggle a second segment into an id.

use std::borrow::Cow;
use std::fmt::Display;
use std::str::FromStr;

use http::Method;
use kiln_core::{FcError, FcErrorCode};
use kiln_pki::Identity;

pub use crate::authz::{Callers, Denied, DenyReason};

/// Builds a service's typed route value from a matched path's parameters.
pub type Build<R> = fn(&PathParams<'_>) -> Result<R, FcError>;

/// The access column of the gateway's public table: the handler verifies
/// the request's FC signature (there is no client certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed;

/// One row of a route table; `A` is its access column ([`Callers`] for
/// an internal table, [`Signed`] for the public one).
pub struct Route<R, A = Callers> {
    pub method: Method,
    /// A [`matchit`] pattern: `{name}` captures one path segment.
    pub path: &'static str,
    pub access: A,
    pub build: Build<R>,
}

/// A row of an internal route table, written as one line: who may call
/// it is part of the row.
pub const fn route<R>(
    method: Method,
    path: &'static str,
    callers: Callers,
    build: Build<R>,
) -> Route<R, Callers> {
    Route {
        method,
        path,
        access: callers,
        build,
    }
}

/// A row of the public (signature-authorised) route table.
pub const fn signed<R>(method: Method, path: &'static str, build: Build<R>) -> Route<R, Signed> {
    Route {
        method,
        path,
        access: Signed,
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
    #[error("Route {method} {path} admits no role: every internal route names who may call it")]
    NoCallers { method: Method, path: &'static str },
}

/// An access column the router can check when the table is built.
pub trait Access: Copy {
    fn check(&self, method: &Method, path: &'static str) -> Result<(), RouterError>;
}

impl Access for Signed {
    fn check(&self, _: &Method, _: &'static str) -> Result<(), RouterError> {
        Ok(())
    }
}

impl Access for Callers {
    fn check(&self, method: &Method, path: &'static str) -> Result<(), RouterError> {
        if self.is_empty() {
            return Err(RouterError::NoCallers {
                method: method.clone(),
                path,
            });
        }
        Ok(())
    }
}

struct MethodEntry<R, A> {
    method: Method,
    access: A,
    build: Build<R>,
}

/// The methods served on one path pattern.
struct PathEntry<R, A> {
    pattern: &'static str,
    methods: Vec<MethodEntry<R, A>>,
}

/// A compiled route table.
pub struct Router<R, A = Callers> {
    tree: matchit::Router<usize>,
    entries: Vec<PathEntry<R, A>>,
    ignore_trailing_slash: bool,
}

/// Why a request was not routed: not a route of the table (or a parameter
/// that does not parse), or a caller the row does not admit.
#[derive(Debug)]
pub enum RouteError {
    Invalid(FcError),
    Denied(Denied),
}

impl From<FcError> for RouteError {
    fn from(e: FcError) -> Self {
        RouteError::Invalid(e)
    }
}

impl<R, A: Access> Router<R, A> {
    /// Compile `table`; fails on a pattern matchit refuses, a method
    /// declared twice for one pattern, or an access column that admits
    /// nobody.
    pub fn new(table: &[Route<R, A>]) -> Result<Self, RouterError> {
        let mut tree = matchit::Router::new();
        let mut entries: Vec<PathEntry<R, A>> = Vec::new();
        for row in table {
            row.access.check(&row.method, row.path)?;
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
            if entry.methods.iter().any(|m| m.method == row.method) {
                return Err(RouterError::Duplicate {
                    method: row.method.clone(),
                    path: row.path,
                });
            }
            entry.methods.push(MethodEntry {
                method: row.method.clone(),
                access: row.access,
                build: row.build,
            });
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

    /// The row for `method` on `path`, with the path's parameters; FC's
    /// 404/405 when there is none.
    fn find<'p>(
        &'p self,
        method: &Method,
        path: &'p str,
    ) -> Result<(&'p MethodEntry<R, A>, PathParams<'p>), FcError> {
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
        let Some(row) = entry.methods.iter().find(|m| m.method == *method) else {
            return Err(FcError::new(
                FcErrorCode::MethodNotAllowed,
                format!("method {method} is not allowed on {path}"),
            ));
        };
        Ok((
            row,
            PathParams {
                params: matched.params,
                pattern: entry.pattern,
            },
        ))
    }

    /// Every (method, pattern, access) the table serves, in table order
    /// per pattern: for tests that walk a whole table, and for the route x
    /// role table of docs/security.md.
    pub fn rows(&self) -> impl Iterator<Item = (&Method, &'static str, A)> + '_ {
        self.entries.iter().flat_map(|e| {
            e.methods
                .iter()
                .map(move |m| (&m.method, e.pattern, m.access))
        })
    }
}

impl<R> Router<R, Signed> {
    /// The typed route for `method` on `path` (a URI path, without its
    /// query), or FC's 404/405, or the builder's error for a parameter
    /// that does not parse. The caller verifies the request's signature.
    pub fn route(&self, method: &Method, path: &str) -> Result<R, FcError> {
        let (row, params) = self.find(method, path)?;
        (row.build)(&params)
    }
}

impl<R> Router<R, Callers> {
    /// The typed route for `method` on `path` if `caller` (the identity of
    /// the connection's client certificate) may call it: its role is in
    /// the row's column and, for an own-node row, an agent names its own
    /// node as `{node}`. A path that is no route is answered first (the
    /// table is public: docs/security.md prints it).
    pub fn authorise(
        &self,
        method: &Method,
        path: &str,
        caller: Option<&Identity>,
    ) -> Result<R, RouteError> {
        let (row, params) = self.find(method, path)?;
        let denied = |reason| Denied::new(method, params.pattern, caller, reason);
        let Some(identity) = caller else {
            return Err(RouteError::Denied(denied(DenyReason::NoIdentity)));
        };
        if !row.access.admits(identity.role()) {
            return Err(RouteError::Denied(denied(DenyReason::Role)));
        }
        if let (true, Some(own)) = (row.access.is_own_node(), identity.node()) {
            // A row without {node} (the registration) names the node in its
            // body: its handler checks it with `authz::node_of_agent`.
            if params.pattern.contains("{node}") {
                let asked = params.text("node")?;
                if own.as_str() != asked {
                    return Err(RouteError::Denied(
                        denied(DenyReason::OtherNode)
                            .detail(format!("the certificate names node {own}, not {asked}")),
                    ));
                }
            }
        }
        Ok((row.build)(&params)?)
    }

    /// Who may call `method` on `path`: for the tables' own tests.
    pub fn callers(&self, method: &Method, path: &str) -> Result<Callers, FcError> {
        self.find(method, path).map(|(row, _)| row.access)
    }

    /// The typed route for `method` on `path` without checking a caller:
    /// for the tables' own tests only (serving code calls
    /// [`Router::authorise`]).
    #[doc(hidden)]
    pub fn route_for_tests(&self, method: &Method, path: &str) -> Result<R, FcError> {
        let (row, params) = self.find(method, path)?;
        (row.build)(&params)
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
    use kiln_pki::Role;

    use super::*;

    const ADMIN: Callers = Callers::of(&[Role::Gateway, Role::Operator]);
    const NODE: Callers = Callers::of(&[Role::Agent]).own_node();

    #[derive(Debug, PartialEq, Eq)]
    enum Api {
        List,
        Create,
        Get { id: String },
        Stop { id: String, n: u32 },
    }

    fn table() -> Vec<Route<Api, Signed>> {
        vec![
            signed(Method::GET, "/v1/things", |_| Ok(Api::List)),
            signed(Method::POST, "/v1/things", |_| Ok(Api::Create)),
            signed(Method::GET, "/v1/things/{id}", |p| {
                Ok(Api::Get {
                    id: p.string("id")?,
                })
            }),
            signed(Method::PUT, "/v1/things/{id}/stop/{n}", |p| {
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
        let r = Router::new(&[signed(Method::GET, "/v1/{id}", |p| {
            p.string("other").map(|id| Api::Get { id })
        })])
        .unwrap();
        let e = r.route(&Method::GET, "/v1/x").unwrap_err();
        assert_eq!(e.code.http_status(), 500);
    }

    #[test]
    fn broken_tables_are_refused() {
        let dup = [
            signed(Method::GET, "/v1/things", |_| Ok(Api::List)),
            signed(Method::GET, "/v1/things", |_| Ok(Api::Create)),
        ];
        assert!(matches!(
            Router::new(&dup),
            Err(RouterError::Duplicate { .. })
        ));
        let conflict = [
            route(Method::GET, "/v1/{a}", ADMIN, |_| Ok(Api::List)),
            route(Method::GET, "/v1/{b}", ADMIN, |_| Ok(Api::List)),
        ];
        assert!(matches!(
            Router::new(&conflict),
            Err(RouterError::Pattern { .. })
        ));
        // An internal row nobody may call: fail closed at build time.
        let nobody = [route(Method::GET, "/v1/things", Callers::of(&[]), |_| {
            Ok(Api::List)
        })];
        assert!(matches!(
            Router::new(&nobody),
            Err(RouterError::NoCallers { .. })
        ));
    }

    fn internal() -> Router<Api> {
        Router::new(&[
            route(Method::GET, "/v1/things", ADMIN, |_| Ok(Api::List)),
            route(Method::POST, "/v1/nodes/{id}/stop/{node}", NODE, |p| {
                Ok(Api::Get {
                    id: p.string("id")?,
                })
            }),
        ])
        .unwrap()
    }

    fn denied(r: Result<Api, RouteError>) -> Denied {
        match r {
            Err(RouteError::Denied(d)) => d,
            other => panic!("not denied: {other:?}"),
        }
    }

    #[test]
    fn internal_rows_admit_only_their_roles() {
        let r = internal();
        let gateway = Identity::service("kiln", Role::Gateway).unwrap();
        let scheduler = Identity::service("kiln", Role::Scheduler).unwrap();
        assert_eq!(
            r.authorise(&Method::GET, "/v1/things", Some(&gateway))
                .unwrap(),
            Api::List
        );
        let d = denied(r.authorise(&Method::GET, "/v1/things", Some(&scheduler)));
        assert_eq!(
            (d.reason, d.role, d.route),
            (DenyReason::Role, Some(Role::Scheduler), "/v1/things")
        );
        let d = denied(r.authorise(&Method::GET, "/v1/things", None));
        assert_eq!(d.reason, DenyReason::NoIdentity);
        // Unknown paths stay 404 whoever asks.
        assert!(matches!(
            r.authorise(&Method::GET, "/v1/nope", None),
            Err(RouteError::Invalid(e)) if e.code == FcErrorCode::PathNotSupported
        ));
        assert_eq!(r.callers(&Method::GET, "/v1/things").unwrap(), ADMIN);
    }

    #[test]
    fn own_node_rows_admit_an_agent_only_for_its_node() {
        let r = internal();
        let agent = Identity::agent("kiln", "n-a".parse().unwrap()).unwrap();
        assert_eq!(
            r.authorise(&Method::POST, "/v1/nodes/x/stop/n-a", Some(&agent))
                .unwrap(),
            Api::Get { id: "x".into() }
        );
        let d = denied(r.authorise(&Method::POST, "/v1/nodes/x/stop/n-b", Some(&agent)));
        assert_eq!(d.reason, DenyReason::OtherNode);
        // The check compares the decoded node, as the builder parses it.
        assert!(r
            .authorise(&Method::POST, "/v1/nodes/x/stop/n%2Da", Some(&agent))
            .is_ok());
        let d = denied(r.authorise(&Method::POST, "/v1/nodes/x/stop/n%2Db", Some(&agent)));
        assert_eq!(d.reason, DenyReason::OtherNode);
        // Other admitted roles name no node and are not narrowed.
        let gateway_too = Router::new(&[route(
            Method::POST,
            "/v1/nodes/{node}",
            Callers::of(&[Role::Gateway, Role::Agent]).own_node(),
            |_| Ok(Api::List),
        )])
        .unwrap();
        let gateway = Identity::service("kiln", Role::Gateway).unwrap();
        assert!(gateway_too
            .authorise(&Method::POST, "/v1/nodes/n-b", Some(&gateway))
            .is_ok());
    }
}
