//! Who may call an internal route: the roles column of every internal
//! route table (see [`crate::router`]), and what a refusal looks like.
//!
//! A [`Callers`] value is a set of [`Role`]s, optionally narrowed for
//! agents to the node their certificate names ([`Callers::own_node`]).
//! Checking it is a bit test on the identity the connection's client
//! certificate carried (parsed once per connection by `serve_tls`): the
//! warm invoke path pays no allocation for it.
//!
//! A refused call is FC's `AccessDenied` (403) naming the caller's role and
//! the route; [`Refusals`] counts it (by role and route) and logs it at
//! warn with the peer's identity and address. A connection whose
//! certificate names no Kiln identity is refused by every route the same
//! way (fail closed), health included.

use std::fmt;
use std::net::SocketAddr;

use http::Method;
use kiln_core::{FcError, FcErrorCode, NodeId};
use kiln_pki::{Identity, Role};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The roles that may call one route.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Callers {
    roles: u8,
    own_node: bool,
}

const fn bit(role: Role) -> u8 {
    1 << (role as u8)
}

impl Callers {
    /// Every role of the cluster (health: any cluster identity).
    pub const ANY: Callers = Callers::of(&Role::ALL);

    /// The roles in `roles`. An empty set is allowed here so that tables
    /// stay `const`, and refused by `Router::new` (a table row nobody may
    /// call is a bug, caught by each service's table test).
    pub const fn of(roles: &[Role]) -> Callers {
        let mut set = 0;
        let mut i = 0;
        while i < roles.len() {
            set |= bit(roles[i]);
            i += 1;
        }
        Callers {
            roles: set,
            own_node: false,
        }
    }

    /// Agents only for their own node: the route's `{node}` path
    /// parameter, or (for a route without one) a node id its handler
    /// compares with [`node_of_agent`].
    pub const fn own_node(self) -> Callers {
        Callers {
            roles: self.roles,
            own_node: true,
        }
    }

    pub const fn is_empty(self) -> bool {
        self.roles == 0
    }

    pub fn admits(self, role: Role) -> bool {
        self.roles & bit(role) != 0
    }

    /// Agents are admitted only for the node their certificate names.
    pub fn is_own_node(self) -> bool {
        self.own_node
    }

    pub fn roles(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.admits(*r))
    }
}

impl fmt::Debug for Callers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Callers {
    /// `gateway, operator` / `agent (own node)`: as docs/security.md
    /// writes the table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for role in self.roles() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(role.as_str())?;
            if role == Role::Agent && self.own_node {
                f.write_str(" (own node)")?;
            }
        }
        if first {
            f.write_str("nobody")?;
        }
        Ok(())
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The client certificate names no Kiln identity.
    NoIdentity,
    /// The caller's role is not in the route's column.
    Role,
    /// An agent asked about a node other than its own.
    OtherNode,
    /// An agent asked for a resource (an instance, a code package) the
    /// scheduler has not placed on its node.
    NotPlaced,
    /// An agent tried to register a node a live agent with another
    /// certificate holds.
    Held,
}

/// A refused call: which route, who, why.
#[derive(Debug, Clone)]
pub struct Denied {
    pub method: Method,
    /// The route's pattern (`/v1/nodes/{node}/cordon`), never the raw path:
    /// a bounded metric label.
    pub route: &'static str,
    pub role: Option<Role>,
    pub reason: DenyReason,
    /// What the refusal adds for a reader (the resource asked for).
    pub detail: Option<String>,
}

impl Denied {
    pub fn new(
        method: &Method,
        route: &'static str,
        caller: Option<&Identity>,
        reason: DenyReason,
    ) -> Self {
        Self {
            method: method.clone(),
            route,
            role: caller.map(Identity::role),
            reason,
            detail: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// FC's `AccessDenied` (403), naming the role and the route.
    pub fn to_fc(&self) -> FcError {
        let route = format!("{} {}", self.method, self.route);
        let mut message = match (self.reason, self.role) {
            (DenyReason::NoIdentity, _) | (_, None) => format!(
                "the client certificate names no Kiln identity (spiffe://<cluster>/<role>), so it may not call {route}; issue it with the role it serves (see docs/joining.md)"
            ),
            (DenyReason::Role, Some(role)) => {
                format!("role {role} may not call {route}")
            }
            (DenyReason::OtherNode, Some(role)) => format!(
                "role {role} may call {route} only for the node its certificate names"
            ),
            (DenyReason::NotPlaced, Some(role)) => format!(
                "role {role} may call {route} only for what the scheduler placed on its node"
            ),
            (DenyReason::Held, Some(role)) => format!(
                "role {role} may not call {route} for a node another certificate holds"
            ),
        };
        if let Some(detail) = &self.detail {
            message.push_str(": ");
            message.push_str(detail);
        }
        FcError::new(FcErrorCode::AccessDenied, message)
    }
}

/// The node an agent's certificate names, or the refusal for any other
/// caller and for an agent asking about another node.
pub fn node_of_agent<'a>(
    caller: Option<&'a Identity>,
    method: &Method,
    route: &'static str,
    asked: &NodeId,
) -> Result<&'a NodeId, Denied> {
    match caller {
        None => Err(Denied::new(method, route, caller, DenyReason::NoIdentity)),
        Some(id) => match id.node() {
            Some(node) if node == asked => Ok(node),
            Some(node) => Err(Denied::new(method, route, caller, DenyReason::OtherNode)
                .detail(format!("the certificate names node {node}, not {asked}"))),
            None => Err(Denied::new(method, route, caller, DenyReason::Role)),
        },
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RoleLabel(Option<Role>);

impl EncodeLabelValue for RoleLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.0.map_or("none", Role::as_str))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    role: RoleLabel,
    method: String,
    route: &'static str,
}

/// The `internal_refusals` counter of one service, by role and route.
#[derive(Clone, Default)]
pub struct Refusals {
    counter: Family<RefusalLabels, Counter>,
}

impl Refusals {
    /// A counter registered as `<prefix>_internal_refusals` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let refusals = Self::default();
        registry.register(
            "internal_refusals",
            "Internal API calls refused (AccessDenied) by caller role and route",
            refusals.counter.clone(),
        );
        refusals
    }

    /// Count and log a refusal; answers the FC error to send.
    pub fn refuse(&self, denied: &Denied, caller: Option<&Identity>, peer: SocketAddr) -> FcError {
        self.counter
            .get_or_create(&RefusalLabels {
                role: RoleLabel(denied.role),
                method: denied.method.as_str().to_owned(),
                route: denied.route,
            })
            .inc();
        let error = denied.to_fc();
        let identity = caller.map_or_else(|| "none".to_owned(), Identity::uri);
        tracing::warn!(
            %peer,
            %identity,
            method = %denied.method,
            route = denied.route,
            reason = ?denied.reason,
            message = %error.message,
            "internal call refused"
        );
        error
    }

    /// How many calls were refused for `role` on `method route`.
    pub fn count(&self, role: Option<Role>, method: &Method, route: &'static str) -> u64 {
        self.counter
            .get_or_create(&RefusalLabels {
                role: RoleLabel(role),
                method: method.as_str().to_owned(),
                route,
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_admits_exactly_its_roles() {
        let admin = Callers::of(&[Role::Gateway, Role::Operator]);
        assert!(admin.admits(Role::Gateway) && admin.admits(Role::Operator));
        assert!(!admin.admits(Role::Agent) && !admin.admits(Role::Scheduler));
        assert_eq!(admin.to_string(), "gateway, operator");
        assert_eq!(
            Callers::of(&[Role::Agent]).own_node().to_string(),
            "agent (own node)"
        );
        assert!(Callers::of(&[]).is_empty());
        assert!(Role::ALL.into_iter().all(|r| Callers::ANY.admits(r)));
    }

    #[test]
    fn refusals_are_access_denied_naming_role_and_route() {
        let agent = Identity::agent("kiln", "n-a".parse().unwrap()).unwrap();
        let d = Denied::new(
            &Method::POST,
            "/v1/nodes/{node}/cordon",
            Some(&agent),
            DenyReason::Role,
        );
        let e = d.to_fc();
        assert_eq!(e.code, FcErrorCode::AccessDenied);
        assert_eq!(e.code.http_status(), 403);
        assert_eq!(
            e.message,
            "role agent may not call POST /v1/nodes/{node}/cordon"
        );
        let none = Denied::new(&Method::GET, "/v1/health", None, DenyReason::NoIdentity).to_fc();
        assert!(
            none.message.contains("names no Kiln identity"),
            "{}",
            none.message
        );

        let refusals = Refusals::default();
        let peer = "127.0.0.1:1".parse().unwrap();
        refusals.refuse(&d, Some(&agent), peer);
        refusals.refuse(&d, Some(&agent), peer);
        assert_eq!(
            refusals.count(Some(Role::Agent), &Method::POST, "/v1/nodes/{node}/cordon"),
            2
        );
        assert_eq!(
            refusals.count(
                Some(Role::Gateway),
                &Method::POST,
                "/v1/nodes/{node}/cordon"
            ),
            0
        );
    }

    #[test]
    fn an_agent_is_its_own_node_only() {
        let a: NodeId = "n-a".parse().unwrap();
        let b: NodeId = "n-b".parse().unwrap();
        let agent = Identity::agent("kiln", a.clone()).unwrap();
        let gw = Identity::service("kiln", Role::Gateway).unwrap();
        let route = "/v1/nodes/{node}/heartbeat";
        assert_eq!(
            node_of_agent(Some(&agent), &Method::POST, route, &a).unwrap(),
            &a
        );
        let other = node_of_agent(Some(&agent), &Method::POST, route, &b).unwrap_err();
        assert_eq!(other.reason, DenyReason::OtherNode);
        assert!(other.to_fc().message.contains("names node n-a, not n-b"));
        assert_eq!(
            node_of_agent(Some(&gw), &Method::POST, route, &a)
                .unwrap_err()
                .reason,
            DenyReason::Role
        );
        assert_eq!(
            node_of_agent(None, &Method::POST, route, &a)
                .unwrap_err()
                .reason,
            DenyReason::NoIdentity
        );
    }
}
