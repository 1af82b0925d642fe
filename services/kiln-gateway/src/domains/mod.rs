//! Custom domains (FC's CreateCustomDomain and friends): a domain name an
//! account owns, its HTTPS certificate, TLS settings and routes from path
//! patterns to a function and qualifier.
//!
//! ```text
//!   public listener ── ClientHello SNI ──> tls::Selector: the domain's
//!        │                                  certificate and TLS versions
//!        └─ request Host a custom domain? ─> serve: route by path
//!             (exact, else longest prefix) ─> methods ─> the function's
//!             HTTP trigger for the route's qualifier (its authType)
//!             ─> http_trigger::call_trigger (the trigger's invoke path)
//! ```
//!
//! The domain index lives in memory ([`Domains`]), loaded from the
//! gateway's store at start and updated with every write, so a domain
//! serves as soon as CreateCustomDomain answers. A domain name is unique
//! across accounts. The private key is sealed in the store
//! (`custom_domains.key_sealed`, see [`crate::secrets::rows`]) and never
//! answered by the API.

pub mod config;
pub mod serve;
pub mod store;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use http::Request;
use kiln_core::{AccountId, FcError, FcErrorCode};
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::catalog::CatalogError;
use crate::secrets::Sealer;
use crate::store::MetaStoreError;
use config::{DomainInput, PathPattern, RouteRecord, TlsSettings};
pub use store::DomainStore;

/// A custom domain as stored (the private key aside, sealed in its own
/// column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainRecord {
    pub account_id: AccountId,
    pub domain_name: String,
    pub protocol: String,
    pub cert_name: String,
    /// The PEM chain, as given.
    pub certificate: String,
    pub tls: TlsSettings,
    pub routes: Vec<RouteRecord>,
    pub created_ms: u64,
    pub modified_ms: u64,
}

/// A domain ready to serve: its record, parsed routes and TLS.
#[derive(Debug)]
pub struct DomainEntry {
    pub record: DomainRecord,
    pub routes: Vec<(PathPattern, RouteRecord)>,
    cert: Arc<tls::DomainCert>,
    private_key: String,
    pub tls: Arc<ServerConfig>,
}

impl DomainEntry {
    fn build(
        record: DomainRecord,
        cert: Arc<tls::DomainCert>,
        private_key: String,
    ) -> Result<Self, FcError> {
        let tls = tls::server_config(&cert, &record.tls)?;
        let routes = record
            .routes
            .iter()
            .map(|r| Ok((PathPattern::parse(&r.path)?, r.clone())))
            .collect::<Result<_, FcError>>()?;
        Ok(Self {
            record,
            routes,
            cert,
            private_key,
            tls,
        })
    }

    /// The route serving `path`.
    pub fn route(&self, path: &str) -> Option<&RouteRecord> {
        config::match_route(&self.routes, path)
    }
}

/// FC's DomainNameNotFound.
pub fn not_found(name: &str) -> FcError {
    FcError::new(
        FcErrorCode::DomainNameNotFound,
        format!("custom domain {name:?} does not exist"),
    )
}

fn store_failed(e: MetaStoreError) -> ApiError {
    ApiError::Catalog(CatalogError::Store(e))
}

/// Every custom domain, by name.
pub struct Domains {
    store: Arc<dyn DomainStore>,
    sealer: Arc<Sealer>,
    /// The gateway's trigger domains: no custom domain under them.
    reserved: Vec<String>,
    /// The names the gateway's own certificate covers (its API host):
    /// no custom domain may take them.
    own_names: Vec<String>,
    by_name: RwLock<BTreeMap<String, Arc<DomainEntry>>>,
    /// One write at a time: a write is store, then index.
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Domains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domains")
            .field(
                "domains",
                &self.by_name.read().map(|m| m.len()).unwrap_or(0),
            )
            .finish()
    }
}

/// Why the stored domains could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DomainsLoadError {
    #[error(transparent)]
    Store(#[from] MetaStoreError),
    #[error("Stored custom domain {name} cannot be served: {message}")]
    Invalid { name: String, message: String },
    #[error("The task reloading custom domains failed")]
    Join,
}

impl Domains {
    /// Load every stored domain (a certificate that expired while stored
    /// still loads: clients see it expired, and the owner updates it).
    pub fn open(
        store: Arc<dyn DomainStore>,
        sealer: Arc<Sealer>,
        reserved: Vec<String>,
        own_names: Vec<String>,
    ) -> Result<Self, DomainsLoadError> {
        let by_name = Self::load_index(store.as_ref(), &sealer)?;
        Ok(Self {
            store,
            sealer,
            reserved,
            own_names,
            by_name: RwLock::new(by_name),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Reload every domain from the store (another gateway of a cluster
    /// changed one); on failure the current index stays.
    pub async fn reload(&self) -> Result<(), DomainsLoadError> {
        let _w = self.writes.lock().await;
        let (store, sealer) = (self.store.clone(), self.sealer.clone());
        let by_name =
            tokio::task::spawn_blocking(move || Self::load_index(store.as_ref(), &sealer))
                .await
                .map_err(|_| DomainsLoadError::Join)??;
        *self.by_name.write().unwrap_or_else(|p| p.into_inner()) = by_name;
        Ok(())
    }

    fn load_index(
        store: &dyn DomainStore,
        sealer: &Sealer,
    ) -> Result<BTreeMap<String, Arc<DomainEntry>>, DomainsLoadError> {
        let mut by_name = BTreeMap::new();
        for (record, key) in store::load(store, sealer)? {
            let invalid = |e: FcError| DomainsLoadError::Invalid {
                name: record.domain_name.clone(),
                message: e.message,
            };
            let cert = tls::check_cert(&record.domain_name, &record.certificate, &key, None)
                .map_err(invalid)?;
            let entry = DomainEntry::build(record.clone(), Arc::new(cert), key).map_err(invalid)?;
            by_name.insert(record.domain_name.clone(), Arc::new(entry));
        }
        Ok(by_name)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<DomainEntry>>> {
        self.by_name.read().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self, entry: Arc<DomainEntry>) {
        self.by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.record.domain_name.clone(), entry);
    }

    /// The TLS configuration for an SNI name, if it is a custom domain.
    pub fn tls_for(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        self.read().get(&name).map(|d| d.tls.clone())
    }

    /// The domain a request's Host names, if it is a custom domain.
    pub fn of_request<B>(&self, req: &Request<B>) -> Option<Arc<DomainEntry>> {
        let map = self.read();
        // Every API call asks: no host parsing while there are no domains.
        if map.is_empty() {
            return None;
        }
        map.get(&request_host(req)?).cloned()
    }

    /// The caller's domain `name` (another account's is not found).
    pub fn get(&self, account: &AccountId, name: &str) -> Result<Arc<DomainEntry>, FcError> {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        self.read()
            .get(&lower)
            .filter(|d| &d.record.account_id == account)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    /// The account's domains, by name.
    pub fn of_account(&self, account: &AccountId) -> Vec<Arc<DomainEntry>> {
        self.read()
            .values()
            .filter(|d| &d.record.account_id == account)
            .cloned()
            .collect()
    }

    /// Run a store operation off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn DomainStore, &Sealer) -> Result<T, MetaStoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (store, sealer) = (self.store.clone(), self.sealer.clone());
        tokio::task::spawn_blocking(move || f(store.as_ref(), &sealer))
            .await
            .map_err(|_| ApiError::Catalog(CatalogError::Join))?
            .map_err(store_failed)
    }

    fn reserved(&self) -> Vec<&str> {
        self.reserved.iter().map(String::as_str).collect()
    }

    /// CreateCustomDomain: everything checked before anything is stored.
    pub async fn create(
        &self,
        account: &AccountId,
        input: DomainInput,
        now_ms: u64,
    ) -> Result<Arc<DomainEntry>, ApiError> {
        config::refuse_unsupported(&input)?;
        let name = config::check_domain_name(
            input
                .domain_name
                .as_deref()
                .ok_or_else(|| FcError::invalid_argument("domainName is required"))?,
            &self.reserved(),
        )?;
        if let Some(own) = self.own_names.iter().find(|n| tls::covers(n, &name)) {
            return Err(FcError::invalid_argument(format!(
                "domainName {name:?} is the gateway's own (its certificate names {own}): pick a domain of your own"
            ))
            .into());
        }
        let protocol = input
            .protocol
            .clone()
            .ok_or_else(|| FcError::invalid_argument("protocol is required (HTTPS)"))?;
        config::check_protocol(&protocol)?;
        let cert_in = input.cert_config.clone().ok_or_else(|| {
            FcError::invalid_argument(
                "certConfig is required: Kiln serves custom domains over HTTPS with the domain's own certificate",
            )
        })?;
        let (cert_name, certificate, key, cert) = checked_cert(&name, &cert_in, now_ms)?;
        let tls = TlsSettings::parse(&input.tls_config.clone().unwrap_or_default())?;
        let routes = config::parse_routes(&input.route_config.clone().unwrap_or_default())?;
        let record = DomainRecord {
            account_id: account.clone(),
            domain_name: name.clone(),
            protocol,
            cert_name,
            certificate,
            tls,
            routes,
            created_ms: now_ms,
            modified_ms: now_ms,
        };
        let entry = Arc::new(DomainEntry::build(record, Arc::new(cert), key)?);
        let _w = self.writes.lock().await;
        if let Some(existing) = self.read().get(&name) {
            let whose = if &existing.record.account_id == account {
                "you already have it"
            } else {
                "another account has it"
            };
            return Err(FcError::new(
                FcErrorCode::DomainNameAlreadyExists,
                format!("custom domain {name:?} already exists ({whose})"),
            )
            .into());
        }
        let (record, key) = (entry.record.clone(), entry.private_key.clone());
        let inserted = self
            .blocking(move |st, se| store::insert(st, se, &record, &key))
            .await?;
        if !inserted {
            return Err(FcError::new(
                FcErrorCode::DomainNameAlreadyExists,
                format!("custom domain {name:?} already exists"),
            )
            .into());
        }
        self.index(entry.clone());
        Ok(entry)
    }

    /// UpdateCustomDomain: the fields given replace the domain's; the rest
    /// stay.
    pub async fn update(
        &self,
        account: &AccountId,
        name: &str,
        input: DomainInput,
        now_ms: u64,
    ) -> Result<Arc<DomainEntry>, ApiError> {
        if input.domain_name.is_some() {
            return Err(FcError::invalid_argument(
                "domainName cannot be updated: it is the domain's identity (the path names it)",
            )
            .into());
        }
        config::refuse_unsupported(&input)?;
        let _w = self.writes.lock().await;
        let current = self.get(account, name)?;
        let mut record = current.record.clone();
        if let Some(p) = &input.protocol {
            config::check_protocol(p)?;
            record.protocol = p.clone();
        }
        let (cert, key) = match &input.cert_config {
            None => (current.cert.clone(), current.private_key.clone()),
            Some(c) => {
                let (cert_name, certificate, key, cert) =
                    checked_cert(&record.domain_name, c, now_ms)?;
                record.cert_name = cert_name;
                record.certificate = certificate;
                (Arc::new(cert), key)
            }
        };
        if let Some(t) = &input.tls_config {
            record.tls = TlsSettings::parse(t)?;
        }
        if let Some(r) = &input.route_config {
            record.routes = config::parse_routes(r)?;
        }
        record.modified_ms = now_ms;
        let entry = Arc::new(DomainEntry::build(record, cert, key)?);
        let (record, key) = (entry.record.clone(), entry.private_key.clone());
        self.blocking(move |st, se| store::update(st, se, &record, &key))
            .await?;
        self.index(entry.clone());
        Ok(entry)
    }

    /// DeleteCustomDomain.
    pub async fn delete(&self, account: &AccountId, name: &str) -> Result<(), ApiError> {
        let _w = self.writes.lock().await;
        let current = self.get(account, name)?;
        let name = current.record.domain_name.clone();
        self.blocking(move |st, _| store::delete(st, &name)).await?;
        self.by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&current.record.domain_name);
        Ok(())
    }
}

/// `(certName, certificate, privateKey, checked)` of a `certConfig`.
fn checked_cert(
    domain: &str,
    c: &config::CertInput,
    now_ms: u64,
) -> Result<(String, String, String, tls::DomainCert), FcError> {
    let certificate = c
        .certificate
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| FcError::invalid_argument("certConfig.certificate is required (PEM)"))?;
    let key = c
        .private_key
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| FcError::invalid_argument("certConfig.privateKey is required (PEM)"))?;
    let cert_name = c.cert_name.clone().unwrap_or_default();
    if cert_name.len() > 128 {
        return Err(FcError::invalid_argument(
            "certConfig.certName is longer than 128 bytes",
        ));
    }
    let checked = tls::check_cert(domain, &certificate, &key, Some((now_ms / 1000) as i64))?;
    Ok((cert_name, certificate, key, checked))
}

/// The host a request names (HTTP/2's authority, else Host), lower case,
/// without port or trailing dot.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let host = match req.uri().host() {
        Some(h) => h.to_owned(),
        None => {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            match h.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
                _ => h.to_owned(),
            }
        }
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}
