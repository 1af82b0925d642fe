//! A custom domain's configuration in FC's shapes (`CreateCustomDomainInput`,
//! `UpdateCustomDomainInput`), checked: what Kiln cannot do is refused
//! with FC's InvalidArgument naming the field, never accepted and ignored.

use http::Method;
use kiln_core::{FcError, FunctionName};
use serde::{Deserialize, Serialize};

use crate::versions::{Qualifier, LATEST};

/// FC's limit on a domain's routes.
pub const ROUTES_MAX: usize = 100;
/// FC's limit on `tlsConfig.cipherSuites`.
pub const CIPHER_SUITES_MAX: usize = 100;
/// A route path's length limit.
pub const PATH_MAX: usize = 2048;

/// The methods a route may name (FC's HTTP trigger methods).
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];

/// `CertConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertInput {
    pub cert_name: Option<String>,
    pub certificate: Option<String>,
    pub private_key: Option<String>,
}

/// `TLSConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsInput {
    pub min_version: Option<String>,
    pub max_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
}

/// `PathConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathInput {
    pub path: Option<String>,
    pub function_name: Option<String>,
    pub qualifier: Option<String>,
    pub methods: Option<Vec<String>>,
    pub rewrite_config: Option<serde_json::Value>,
}

/// `RouteConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesInput {
    pub routes: Option<Vec<PathInput>>,
}

/// `CreateCustomDomainInput` and `UpdateCustomDomainInput` (the latter
/// without `domainName`, which the path names).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainInput {
    pub domain_name: Option<String>,
    pub protocol: Option<String>,
    pub cert_config: Option<CertInput>,
    pub tls_config: Option<TlsInput>,
    pub route_config: Option<RoutesInput>,
    pub auth_config: Option<serde_json::Value>,
    pub waf_config: Option<serde_json::Value>,
    pub cors_config: Option<serde_json::Value>,
    #[serde(rename = "isE2B")]
    pub is_e2b: Option<bool>,
}

/// A TLS protocol version FC names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "TLSv1.2",
            Self::Tls13 => "TLSv1.3",
        }
    }

    fn parse(field: &str, s: &str) -> Result<Self, FcError> {
        match s {
            "TLSv1.2" => Ok(Self::Tls12),
            "TLSv1.3" => Ok(Self::Tls13),
            "TLSv1.0" | "TLSv1.1" => Err(FcError::invalid_argument(format!(
                "tlsConfig.{field}: {s} is not served: Kiln speaks TLSv1.2 and TLSv1.3 only"
            ))),
            _ => Err(FcError::invalid_argument(format!(
                "tlsConfig.{field}: {s:?} is not a TLS version; use TLSv1.2 or TLSv1.3"
            ))),
        }
    }
}

/// A domain's checked TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsSettings {
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// Empty: every suite Kiln serves.
    pub cipher_suites: Vec<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            cipher_suites: Vec::new(),
        }
    }
}

impl TlsSettings {
    /// Check `tlsConfig` (suite names are checked against the TLS
    /// provider when the domain's TLS configuration is built).
    pub fn parse(input: &TlsInput) -> Result<Self, FcError> {
        let d = Self::default();
        let min_version = match input.min_version.as_deref() {
            None | Some("") => d.min_version,
            Some(s) => TlsVersion::parse("minVersion", s)?,
        };
        let max_version = match input.max_version.as_deref() {
            None | Some("") => d.max_version,
            Some(s) => TlsVersion::parse("maxVersion", s)?,
        };
        if min_version > max_version {
            return Err(FcError::invalid_argument(format!(
                "tlsConfig: minVersion {} is above maxVersion {}",
                min_version.as_str(),
                max_version.as_str()
            )));
        }
        let cipher_suites = input.cipher_suites.clone().unwrap_or_default();
        if cipher_suites.len() > CIPHER_SUITES_MAX {
            return Err(FcError::invalid_argument(format!(
                "tlsConfig.cipherSuites: at most {CIPHER_SUITES_MAX} suites"
            )));
        }
        Ok(Self {
            min_version,
            max_version,
            cipher_suites,
        })
    }
}

/// A route's path pattern (FC's: exact `/a`, prefix `/a/*`, or `/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `/a/*`: `/a/` and everything under it (held without the `*`, as
    /// `/a/`); `/*` is the prefix `/`.
    Prefix(String),
}

impl PathPattern {
    pub fn parse(path: &str) -> Result<Self, FcError> {
        let bad = |why: &str| {
            Err(FcError::invalid_argument(format!(
                "routeConfig.routes[].path {path:?} {why}"
            )))
        };
        if !path.starts_with('/') {
            return bad("must start with '/'");
        }
        if path.len() > PATH_MAX {
            return bad(&format!("is longer than {PATH_MAX} bytes"));
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#')
        {
            return bad("holds a space, control character, '?' or '#'");
        }
        match path.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') && !prefix.contains('*') => {
                Ok(Self::Prefix(prefix.to_owned()))
            }
            Some(_) => bad("may hold '*' only as its last segment ('/a/*' or '/*')"),
            None if path.contains('*') => {
                bad("may hold '*' only as its last segment ('/a/*' or '/*')")
            }
            None => Ok(Self::Exact(path.to_owned())),
        }
    }

    /// How well this pattern matches `path`: None, or a rank where higher
    /// wins (an exact match above every prefix, a longer prefix above a
    /// shorter one).
    pub fn rank(&self, path: &str) -> Option<usize> {
        match self {
            Self::Exact(p) => (p == path).then_some(usize::MAX),
            Self::Prefix(p) => path.starts_with(p.as_str()).then_some(p.len()),
        }
    }
}

/// One checked route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRecord {
    pub path: String,
    pub function_name: FunctionName,
    pub qualifier: String,
    /// Upper case; empty: every method.
    pub methods: Vec<String>,
}

impl RouteRecord {
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m == method.as_str())
    }

    pub fn qualifier(&self) -> Qualifier {
        Qualifier::parse(Some(&self.qualifier)).unwrap_or(Qualifier::Latest)
    }
}

/// Check `routeConfig`.
pub fn parse_routes(input: &RoutesInput) -> Result<Vec<RouteRecord>, FcError> {
    let routes = input.routes.as_deref().unwrap_or_default();
    if routes.len() > ROUTES_MAX {
        return Err(FcError::invalid_argument(format!(
            "routeConfig.routes: at most {ROUTES_MAX} routes"
        )));
    }
    let mut out: Vec<RouteRecord> = Vec::with_capacity(routes.len());
    for r in routes {
        if r.rewrite_config.as_ref().is_some_and(|v| !is_empty(v)) {
            return Err(FcError::invalid_argument(
                "routeConfig.routes[].rewriteConfig is not supported by Kiln: the function gets the request's own path",
            ));
        }
        let path = r
            .path
            .as_deref()
            .ok_or_else(|| FcError::invalid_argument("routeConfig.routes[].path is required"))?;
        PathPattern::parse(path)?;
        if out.iter().any(|o| o.path == path) {
            return Err(FcError::invalid_argument(format!(
                "routeConfig.routes: path {path:?} appears twice"
            )));
        }
        let function_name: FunctionName = r
            .function_name
            .as_deref()
            .ok_or_else(|| {
                FcError::invalid_argument(format!(
                    "routeConfig.routes[].functionName is required (path {path:?})"
                ))
            })?
            .parse()
            .map_err(|e| {
                FcError::invalid_argument(format!("routeConfig.routes[].functionName: {e}"))
            })?;
        let qualifier = match r.qualifier.as_deref() {
            None | Some("") => LATEST.to_owned(),
            Some(q) => {
                Qualifier::parse(Some(q)).map_err(|e| {
                    FcError::invalid_argument(format!(
                        "routeConfig.routes[].qualifier: {}",
                        e.message
                    ))
                })?;
                q.to_owned()
            }
        };
        let mut methods = Vec::new();
        for m in r.methods.as_deref().unwrap_or_default() {
            let up = m.to_ascii_uppercase();
            if !METHODS.contains(&up.as_str()) {
                return Err(FcError::invalid_argument(format!(
                    "routeConfig.routes[].methods: {m:?} is not one of {}",
                    METHODS.join(", ")
                )));
            }
            if !methods.contains(&up) {
                methods.push(up);
            }
        }
        out.push(RouteRecord {
            path: path.to_owned(),
            function_name,
            qualifier,
            methods,
        });
    }
    Ok(out)
}

/// The route serving `path`: the best-ranked match (see
/// [`PathPattern::rank`]).
pub fn match_route<'a>(
    routes: &'a [(PathPattern, RouteRecord)],
    path: &str,
) -> Option<&'a RouteRecord> {
    routes
        .iter()
        .filter_map(|(p, r)| p.rank(path).map(|rank| (rank, r)))
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, r)| r)
}

/// `protocol`: Kiln serves custom domains over HTTPS only.
pub fn check_protocol(p: &str) -> Result<(), FcError> {
    match p {
        "HTTPS" => Ok(()),
        "HTTP" | "HTTP,HTTPS" => Err(FcError::invalid_argument(format!(
            "protocol {p} is not supported: Kiln serves custom domains over HTTPS only; use HTTPS with a certConfig"
        ))),
        _ => Err(FcError::invalid_argument(format!(
            "protocol {p:?} is not one of HTTP, HTTPS, HTTP,HTTPS (Kiln serves HTTPS)"
        ))),
    }
}

/// The parts of the input Kiln does not implement, refused unless absent
/// or empty (or off).
pub fn refuse_unsupported(input: &DomainInput) -> Result<(), FcError> {
    if let Some(auth) = &input.auth_config {
        let anonymous = auth.as_object().is_some_and(|o| {
            o.iter().all(|(k, v)| match k.as_str() {
                "authType" => v.as_str().is_none_or(|t| t.is_empty() || t == "anonymous"),
                "authInfo" => is_empty(v),
                _ => false,
            })
        });
        if !anonymous && !is_empty(auth) {
            return Err(FcError::invalid_argument(
                "authConfig: only authType anonymous is supported by Kiln; each route's function is called with its HTTP trigger's authType (anonymous or function)",
            ));
        }
    }
    if let Some(waf) = &input.waf_config {
        let off = waf.as_object().is_some_and(|o| {
            o.iter()
                .all(|(k, v)| k == "enableWAF" && (v.is_null() || v == &serde_json::json!(false)))
        });
        if !off && !is_empty(waf) {
            return Err(FcError::invalid_argument(
                "wafConfig: Kiln has no web application firewall; omit wafConfig or set enableWAF false",
            ));
        }
    }
    if input.cors_config.as_ref().is_some_and(|v| !is_empty(v)) {
        return Err(FcError::invalid_argument(
            "corsConfig is not supported by Kiln: answer CORS headers from the function",
        ));
    }
    if input.is_e2b == Some(true) {
        return Err(FcError::invalid_argument("isE2B is not supported by Kiln"));
    }
    Ok(())
}

fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(o) => o.values().all(is_empty),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// A domain name as Kiln takes it: lower case DNS labels (letters, digits,
/// `-`), at least two, 253 bytes at most; no wildcard. `reserved` are the
/// gateway's own trigger domains, under which no custom domain may live.
pub fn check_domain_name(name: &str, reserved: &[&str]) -> Result<String, FcError> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let bad = |why: &str| {
        Err(FcError::invalid_argument(format!(
            "domainName {name:?} {why}"
        )))
    };
    if lower.is_empty() || lower.len() > 253 {
        return bad("must be 1 to 253 bytes");
    }
    if lower.contains('*') {
        return bad("is a wildcard, which Kiln does not serve; name each domain");
    }
    let labels: Vec<&str> = lower.split('.').collect();
    if labels.len() < 2 {
        return bad("must have at least two labels (example.com)");
    }
    for l in &labels {
        if l.is_empty()
            || l.len() > 63
            || l.starts_with('-')
            || l.ends_with('-')
            || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("is not a DNS name: labels of 1 to 63 letters, digits or '-', not starting or ending with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("is an address, not a domain name");
    }
    for r in reserved {
        let r = r.trim_end_matches('.').to_ascii_lowercase();
        if lower == r || lower.ends_with(&format!(".{r}")) {
            return bad(&format!(
                "is under {r}, the gateway's HTTP trigger domain: pick a domain of your own"
            ));
        }
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(paths: &[&str]) -> Vec<(PathPattern, RouteRecord)> {
        paths
            .iter()
            .map(|p| {
                (
                    PathPattern::parse(p).unwrap(),
                    RouteRecord {
                        path: (*p).to_owned(),
                        function_name: "f".parse().unwrap(),
                        qualifier: LATEST.into(),
                        methods: vec![],
                    },
                )
            })
            .collect()
    }

    fn matched(table: &[(PathPattern, RouteRecord)], path: &str) -> Option<String> {
        match_route(table, path).map(|r| r.path.clone())
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let t = routes(&["/*", "/api/*", "/api/v1/*", "/api/login", "/about"]);
        assert_eq!(matched(&t, "/api/login").as_deref(), Some("/api/login"));
        assert_eq!(matched(&t, "/api/v1/users").as_deref(), Some("/api/v1/*"));
        assert_eq!(matched(&t, "/api/v1/").as_deref(), Some("/api/v1/*"));
        assert_eq!(matched(&t, "/api/x").as_deref(), Some("/api/*"));
        // `/api/*` covers what is under `/api/`, not `/api` itself.
        assert_eq!(matched(&t, "/api").as_deref(), Some("/*"));
        assert_eq!(matched(&t, "/about").as_deref(), Some("/about"));
        assert_eq!(matched(&t, "/about/me").as_deref(), Some("/*"));
        assert_eq!(matched(&t, "/").as_deref(), Some("/*"));
        let t = routes(&["/a", "/b/*"]);
        assert_eq!(matched(&t, "/a/"), None);
        assert_eq!(matched(&t, "/ab"), None);
        assert_eq!(matched(&t, "/b"), None);
        assert_eq!(matched(&t, "/b/c/d").as_deref(), Some("/b/*"));
    }

    #[test]
    fn path_patterns_are_checked() {
        assert_eq!(
            PathPattern::parse("/*").unwrap(),
            PathPattern::Prefix("/".into())
        );
        assert_eq!(
            PathPattern::parse("/a/*").unwrap(),
            PathPattern::Prefix("/a/".into())
        );
        assert_eq!(
            PathPattern::parse("/a").unwrap(),
            PathPattern::Exact("/a".into())
        );
        for bad in ["", "a", "/a*", "/*/b", "/a/*/*", "/a b", "/a?x", "*"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn input(v: serde_json::Value) -> DomainInput {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn routes_are_checked_and_normalised() {
        let r = parse_routes(&RoutesInput {
            routes: Some(vec![PathInput {
                path: Some("/a/*".into()),
                function_name: Some("web".into()),
                qualifier: None,
                methods: Some(vec!["get".into(), "GET".into(), "post".into()]),
                rewrite_config: None,
            }]),
        })
        .unwrap();
        assert_eq!(r[0].qualifier, "LATEST");
        assert_eq!(r[0].methods, vec!["GET", "POST"]);
        assert!(r[0].allows(&Method::GET) && !r[0].allows(&Method::PUT));
        let one = |p: PathInput| {
            parse_routes(&RoutesInput {
                routes: Some(vec![p]),
            })
        };
        let base = PathInput {
            path: Some("/x".into()),
            function_name: Some("web".into()),
            ..Default::default()
        };
        assert!(one(base.clone()).unwrap()[0].allows(&Method::PATCH));
        for bad in [
            PathInput {
                methods: Some(vec!["BREW".into()]),
                ..base.clone()
            },
            PathInput {
                function_name: None,
                ..base.clone()
            },
            PathInput {
                function_name: Some("1bad".into()),
                ..base.clone()
            },
            PathInput {
                qualifier: Some("no such!".into()),
                ..base.clone()
            },
            PathInput {
                path: None,
                ..base.clone()
            },
            PathInput {
                rewrite_config: Some(
                    serde_json::json!({"equalRules": [{"match": "/a", "replacement": "/b"}]}),
                ),
                ..base.clone()
            },
        ] {
            let e = one(bad.clone()).unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument, "{bad:?}");
            assert!(e.message.contains("routeConfig"), "{}", e.message);
        }
        let twice = parse_routes(&RoutesInput {
            routes: Some(vec![base.clone(), base]),
        });
        assert!(twice.unwrap_err().message.contains("twice"));
    }

    #[test]
    fn tls_settings_are_checked() {
        let t = TlsSettings::parse(&TlsInput {
            min_version: Some("TLSv1.3".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (t.min_version, t.max_version),
            (TlsVersion::Tls13, TlsVersion::Tls13)
        );
        for (min, max) in [
            (Some("TLSv1.0"), None),
            (Some("TLSv1.1"), None),
            (Some("SSLv3"), None),
            (Some("TLSv1.3"), Some("TLSv1.2")),
        ] {
            let e = TlsSettings::parse(&TlsInput {
                min_version: min.map(str::to_owned),
                max_version: max.map(str::to_owned),
                cipher_suites: None,
            })
            .unwrap_err();
            assert!(e.message.starts_with("tlsConfig"), "{}", e.message);
        }
    }

    #[test]
    fn what_kiln_cannot_do_is_refused_naming_the_field() {
        for (doc, field) in [
            (
                serde_json::json!({"authConfig": {"authType": "jwt", "authInfo": "{}"}}),
                "authConfig",
            ),
            (
                serde_json::json!({"authConfig": {"authType": "function"}}),
                "authConfig",
            ),
            (
                serde_json::json!({"wafConfig": {"enableWAF": true}}),
                "wafConfig",
            ),
            (
                serde_json::json!({"corsConfig": {"allowOrigins": ["*"]}}),
                "corsConfig",
            ),
            (serde_json::json!({"isE2B": true}), "isE2B"),
        ] {
            let e = refuse_unsupported(&input(doc)).unwrap_err();
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        for ok in [
            serde_json::json!({"authConfig": {"authType": "anonymous"}}),
            serde_json::json!({"authConfig": {}}),
            serde_json::json!({"wafConfig": {"enableWAF": false}}),
            serde_json::json!({}),
        ] {
            refuse_unsupported(&input(ok)).unwrap();
        }
        assert!(check_protocol("HTTPS").is_ok());
        for p in ["HTTP", "HTTP,HTTPS", "ftp"] {
            assert!(check_protocol(p).unwrap_err().message.contains("protocol"));
        }
    }

    #[test]
    fn domain_names_are_checked() {
        let reserved = ["fcapp.localhost"];
        assert_eq!(
            check_domain_name("Shop.Example.COM.", &reserved).unwrap(),
            "shop.example.com"
        );
        for bad in [
            "",
            "localhost",
            "*.example.com",
            "-a.example.com",
            "a_b.example.com",
            "a..example.com",
            "127.0.0.1",
            "x.fcapp.localhost",
            "fcapp.localhost",
        ] {
            assert!(check_domain_name(bad, &reserved).is_err(), "{bad:?}");
        }
    }
}
