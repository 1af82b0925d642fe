//! Roles and temporary credentials: Kiln's stand-in for RAM and STS.
//!
//! An account defines roles, each with a [`policy::Policy`] over
//! `fc:<Operation>` actions and `acs:...` resources. A function names one
//! in FC's `role` field (`acs:ram::<accountId>:role/<roleName>`); agents
//! fetch short-lived credentials for it over the internal API
//! ([`Ram::issue`]), and a request signed with them is limited to what the
//! role allows ([`authz`]).

pub mod authz;
pub mod policy;
pub mod store;
pub mod sts;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use kiln_core::{AccountId, Clock, FcError, FcErrorCode};
use kiln_internal_api::{CredentialsRequest, TemporaryCredentials};

use crate::catalog::Catalog;
use crate::model::FunctionConfig;
use crate::store::MetaStoreError;

pub use policy::Policy;
pub use store::{RoleRecord, RoleStore};
pub use sts::{Session, Sts};

/// Longest role name (RAM's limit).
const ROLE_NAME_MAX: usize = 64;
/// Shortest and longest credential lifetime the gateway accepts.
pub const LIFETIME_MIN_S: u64 = 5;
pub const LIFETIME_MAX_S: u64 = 43_200;

/// A role name: 1 to 64 letters, digits, `.`, `-`, `_`. Compared without
/// case, as RAM does; kept lower-case in ARNs.
pub fn check_role_name(name: &str) -> Result<(), FcError> {
    let ok = !name.is_empty()
        && name.len() <= ROLE_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(FcError::invalid_argument(format!(
            "roleName {:?} must be 1 to {ROLE_NAME_MAX} letters, digits, '.', '-' or '_'",
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// `acs:ram::<accountId>:role/<roleName>`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    pub account_id: AccountId,
    /// Lower-case.
    pub name: String,
}

impl RoleArn {
    pub fn parse(arn: &str) -> Result<Self, FcError> {
        let bad = || {
            FcError::invalid_argument(format!(
                "role {:?} is not a RAM role ARN like acs:ram::<accountId>:role/<roleName>",
                arn.chars().take(200).collect::<String>()
            ))
        };
        let rest = arn.strip_prefix("acs:ram::").ok_or_else(bad)?;
        let (account, name) = rest.split_once(":role/").ok_or_else(bad)?;
        let account_id: AccountId = account.parse().map_err(|_| bad())?;
        check_role_name(name).map_err(|_| bad())?;
        Ok(Self {
            account_id,
            name: name.to_ascii_lowercase(),
        })
    }

    pub fn of(account: &AccountId, name: &str) -> String {
        format!("acs:ram::{account}:role/{}", name.to_ascii_lowercase())
    }
}

/// The function's role ARN in canonical form, when it has one.
pub fn function_role(config: &FunctionConfig) -> Option<String> {
    let arn = config.extras.get("role")?.as_str()?;
    RoleArn::parse(arn)
        .ok()
        .map(|r| RoleArn::of(&r.account_id, &r.name))
}

/// Why a role write failed.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Store(#[from] MetaStoreError),
    #[error("Store task failed")]
    Join,
}

type RoleMap = HashMap<AccountId, BTreeMap<String, Arc<RoleRecord>>>;

/// Roles (in memory, kept in step with the store), the STS key and the
/// credential lifetime.
pub struct Ram {
    store: Arc<dyn RoleStore>,
    roles: RwLock<RoleMap>,
    write: tokio::sync::Mutex<()>,
    pub sts: Sts,
    lifetime_ms: u64,
    clock: Arc<dyn Clock>,
}

impl Ram {
    pub async fn open(
        store: Arc<dyn RoleStore>,
        sts: Sts,
        lifetime_s: u64,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RoleError> {
        let roles = Self::load(&store).await?;
        Ok(Self {
            store,
            roles: RwLock::new(roles),
            write: tokio::sync::Mutex::new(()),
            sts,
            lifetime_ms: lifetime_s.saturating_mul(1000),
            clock,
        })
    }

    async fn load(store: &Arc<dyn RoleStore>) -> Result<RoleMap, RoleError> {
        let s = store.clone();
        let records = tokio::task::spawn_blocking(move || s.roles())
            .await
            .map_err(|_| RoleError::Join)??;
        let mut roles: RoleMap = HashMap::new();
        for r in records {
            roles
                .entry(r.account_id.clone())
                .or_default()
                .insert(r.name.clone(), Arc::new(r));
        }
        Ok(roles)
    }

    /// Reload every role from the store (another gateway of a cluster
    /// changed one).
    pub async fn reload(&self) -> Result<(), RoleError> {
        let _w = self.write.lock().await;
        let roles = Self::load(&self.store).await?;
        *self.roles.write().unwrap_or_else(|p| p.into_inner()) = roles;
        Ok(())
    }

    pub fn role(&self, account: &AccountId, name: &str) -> Option<Arc<RoleRecord>> {
        self.roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
            .and_then(|m| m.get(&name.to_ascii_lowercase()))
            .cloned()
    }

    /// Roles of `account` whose names start with `prefix`, after `after`,
    /// at most `limit`; and whether more follow.
    pub fn list(
        &self,
        account: &AccountId,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<RoleRecord>>, bool) {
        let guard = self.roles.read().unwrap_or_else(|p| p.into_inner());
        let Some(m) = guard.get(account) else {
            return (Vec::new(), false);
        };
        let prefix = prefix.to_ascii_lowercase();
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for (k, r) in m
            .range::<str, _>((start, Bound::Unbounded))
            .skip_while(|(k, _)| k.as_str() < prefix.as_str())
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            if out.len() == limit {
                return (out, true);
            }
            let _ = k;
            out.push(r.clone());
        }
        (out, false)
    }

    /// Create or replace a role.
    pub async fn put(&self, record: RoleRecord) -> Result<Arc<RoleRecord>, RoleError> {
        let _w = self.write.lock().await;
        let mut record = record;
        if let Some(old) = self.role(&record.account_id, &record.name) {
            record.created_ms = old.created_ms;
        }
        let s = self.store.clone();
        let r = record.clone();
        tokio::task::spawn_blocking(move || s.put_role(&r))
            .await
            .map_err(|_| RoleError::Join)??;
        let record = Arc::new(record);
        self.roles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(record.account_id.clone())
            .or_default()
            .insert(record.name.clone(), record.clone());
        Ok(record)
    }

    /// Delete a role; false if it did not exist.
    pub async fn delete(&self, account: &AccountId, name: &str) -> Result<bool, RoleError> {
        let _w = self.write.lock().await;
        let name = name.to_ascii_lowercase();
        if self.role(account, &name).is_none() {
            return Ok(false);
        }
        let s = self.store.clone();
        let (a, n) = (account.clone(), name.clone());
        tokio::task::spawn_blocking(move || s.delete_role(&a, &n))
            .await
            .map_err(|_| RoleError::Join)??;
        if let Some(m) = self
            .roles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(account)
        {
            m.remove(&name);
        }
        Ok(true)
    }

    /// Check a function's `role` field as given in a create or update
    /// body: a RAM role ARN of the caller's account naming an existing
    /// role, or `""` (no role).
    pub fn check_function_role(
        &self,
        account: &AccountId,
        value: &serde_json::Value,
    ) -> Result<(), FcError> {
        let arn = value
            .as_str()
            .ok_or_else(|| FcError::invalid_argument("role must be a string"))?;
        if arn.is_empty() {
            return Ok(());
        }
        let parsed = RoleArn::parse(arn)?;
        if &parsed.account_id != account {
            return Err(FcError::invalid_argument(format!(
                "role {arn:?} belongs to another account; a function may only assume a role of its own account"
            )));
        }
        if self.role(account, &parsed.name).is_none() {
            return Err(FcError::invalid_argument(format!(
                "role {arn:?} does not exist; create it with PutRole first"
            )));
        }
        Ok(())
    }

    /// Temporary credentials for an instance of a function with a role.
    pub fn issue(
        &self,
        catalog: &Catalog,
        req: &CredentialsRequest,
    ) -> Result<TemporaryCredentials, FcError> {
        let entry = catalog
            .function(&req.account_id, &req.function_name)
            .ok_or_else(|| crate::api::not_found(&req.function_name))?;
        if entry.spec.role.as_deref() != Some(req.role.as_str()) {
            return Err(FcError::new(
                FcErrorCode::AccessDenied,
                format!(
                    "function '{}' no longer has role {:?}",
                    req.function_name, req.role
                ),
            ));
        }
        let arn = RoleArn::parse(&req.role)?;
        if self.role(&req.account_id, &arn.name).is_none() {
            return Err(FcError::new(
                FcErrorCode::EntityNotExistRole,
                format!("role {:?} does not exist", req.role),
            ));
        }
        let expiration_ms = self.clock.now_ms().saturating_add(self.lifetime_ms);
        let creds = self.sts.issue(Session {
            access_key_id: String::new(),
            account_id: req.account_id.clone(),
            role: arn.name,
            function_name: req.function_name.clone(),
            instance_id: req.instance_id.to_string(),
            expiration_ms,
        });
        tracing::info!(
            account = %req.account_id,
            function = %req.function_name,
            instance_id = %req.instance_id,
            access_key_id = %creds.access_key_id,
            expiration_ms,
            "temporary credentials issued"
        );
        Ok(creds)
    }
}

#[cfg(test)]
mod tests {
    use kiln_core::{InstanceId, ManualClock};
    use serde_json::json;

    use super::*;
    use crate::store::{CodeFiles, SqliteStore};

    struct Fixture {
        _dir: tempfile::TempDir,
        catalog: Catalog,
        ram: Ram,
        clock: ManualClock,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(
                &dir.path().join("gateway.db"),
                crate::store::tests::sealer(),
            )
            .unwrap(),
        );
        let catalog = Catalog::open(
            store.clone(),
            CodeFiles::new(dir.path().join("code")).unwrap(),
        )
        .await
        .unwrap();
        let clock = ManualClock::new(1_000_000);
        let ram = Ram::open(store, Sts::new([1; 32]), 60, Arc::new(clock.clone()))
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            catalog,
            ram,
            clock,
        }
    }

    fn role(name: &str) -> RoleRecord {
        RoleRecord {
            account_id: "1".parse().unwrap(),
            name: name.into(),
            description: String::new(),
            policy: Policy::parse(&json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": "fc:GetFunction", "Resource": "*"}]}))
            .unwrap(),
            created_ms: 1,
            modified_ms: 1,
        }
    }

    fn request(role: &str) -> CredentialsRequest {
        CredentialsRequest {
            account_id: "1".parse().unwrap(),
            function_name: "f".parse().unwrap(),
            role: role.into(),
            instance_id: InstanceId::generate(),
        }
    }

    #[tokio::test]
    async fn credentials_are_issued_only_for_the_functions_current_existing_role() {
        let f = fixture().await;
        let arn = "acs:ram::1:role/reader";
        // No such function.
        let e = f.ram.issue(&f.catalog, &request(arn)).unwrap_err();
        assert_eq!(e.code, FcErrorCode::FunctionNotFound);

        f.ram.put(role("reader")).await.unwrap();
        let mut rec = crate::store::tests::record("1", "f", &"a".repeat(64));
        rec.config
            .extras
            .insert("role".into(), json!("acs:ram::1:role/Reader"));
        let digest = rec.config.code.sha256.clone();
        f.catalog
            .create(
                rec,
                Some(crate::catalog::NewCode {
                    blob: crate::store::CodeBlob {
                        sha256: digest,
                        size: 3,
                        checksum: "7".into(),
                    },
                    zip: b"zip".to_vec(),
                }),
            )
            .await
            .unwrap();
        let entry = f
            .catalog
            .function(&"1".parse().unwrap(), &"f".parse().unwrap())
            .unwrap();
        assert_eq!(
            entry.spec.role.as_deref(),
            Some(arn),
            "canonical, lower-case"
        );

        f.clock.set(2_000_000);
        let c = f.ram.issue(&f.catalog, &request(arn)).unwrap();
        assert_eq!(
            c.expiration_ms,
            2_000_000 + 60_000,
            "the configured lifetime"
        );
        let s = f
            .ram
            .sts
            .open(&c.security_token, &c.access_key_id, 2_000_001)
            .unwrap();
        assert_eq!((s.role.as_str(), s.function_name.as_str()), ("reader", "f"));

        // A role the function no longer has.
        let e = f
            .ram
            .issue(&f.catalog, &request("acs:ram::1:role/writer"))
            .unwrap_err();
        assert_eq!(e.code, FcErrorCode::AccessDenied);
        // A deleted role.
        assert!(f.ram.delete(&"1".parse().unwrap(), "READER").await.unwrap());
        let e = f.ram.issue(&f.catalog, &request(arn)).unwrap_err();
        assert_eq!(e.code, FcErrorCode::EntityNotExistRole);
    }

    #[tokio::test]
    async fn authorization_follows_the_roles_policy_and_account_keys_do_everything() {
        use http::Method;

        use crate::auth::{Caller, Principal};
        let f = fixture().await;
        let mut r = role("reader");
        r.policy = Policy::parse(&json!({"Version": "1", "Statement": [
            {"Effect": "Allow", "Action": "fc:GetFunction",
             "Resource": "acs:fc:*:*:functions/self"}]}))
        .unwrap();
        f.ram.put(r).await.unwrap();
        let session = Session {
            access_key_id: "STS.x".into(),
            account_id: "1".parse().unwrap(),
            role: "reader".into(),
            function_name: "self".parse().unwrap(),
            instance_id: "i".into(),
            expiration_ms: u64::MAX,
        };
        let caller = |principal| Caller {
            account_id: "1".parse().unwrap(),
            access_key_id: "k".into(),
            principal,
        };
        let as_role = caller(Principal::Role(Arc::new(session)));
        let as_account = caller(Principal::Account);
        let check = |c: &Caller, m: Method, p: &str| {
            authz::authorize(&f.ram, "r", c, &crate::api::route(&m, p).unwrap())
        };
        assert!(check(&as_role, Method::GET, "/2023-03-30/functions/self").is_ok());
        for (m, p) in [
            (Method::DELETE, "/2023-03-30/functions/self"),
            (Method::GET, "/2023-03-30/functions/other"),
            (Method::GET, "/2023-03-30/functions"),
            (Method::PUT, "/2023-03-30/roles/reader"),
        ] {
            let e = check(&as_role, m.clone(), p).unwrap_err();
            assert_eq!(e.code, FcErrorCode::AccessDenied, "{m} {p}");
            assert!(check(&as_account, m, p).is_ok());
        }
        // Deleting the role takes away what its credentials could do.
        f.ram.delete(&"1".parse().unwrap(), "reader").await.unwrap();
        let e = check(&as_role, Method::GET, "/2023-03-30/functions/self").unwrap_err();
        assert_eq!(e.code, FcErrorCode::AccessDenied);
    }

    #[tokio::test]
    async fn a_functions_role_must_be_an_existing_role_of_its_account() {
        let f = fixture().await;
        f.ram.put(role("reader")).await.unwrap();
        let a: AccountId = "1".parse().unwrap();
        let check = |v: serde_json::Value| f.ram.check_function_role(&a, &v);
        assert!(check(json!("acs:ram::1:role/reader")).is_ok());
        assert!(check(json!("acs:ram::1:role/READER")).is_ok());
        assert!(check(json!("")).is_ok(), "no role");
        for bad in [
            json!(7),
            json!("reader"),
            json!("acs:ram::1:role/nobody"),
            json!("acs:ram::2:role/reader"),
        ] {
            let e = check(bad.clone()).unwrap_err();
            assert_eq!(e.code, FcErrorCode::InvalidArgument, "{bad}");
        }
        // Listing pages by name.
        f.ram.put(role("reader2")).await.unwrap();
        f.ram.put(role("writer")).await.unwrap();
        let (page, more) = f.ram.list(&a, "read", None, 1);
        assert_eq!((page[0].name.as_str(), more), ("reader", true));
        let (page, more) = f.ram.list(&a, "read", Some("reader"), 5);
        assert_eq!(
            (page.len(), page[0].name.as_str(), more),
            (1, "reader2", false)
        );
    }

    #[test]
    fn role_arns_parse_strictly() {
        let r = RoleArn::parse("acs:ram::123:role/Reader.v1").unwrap();
        assert_eq!(r.account_id.as_str(), "123");
        assert_eq!(r.name, "reader.v1");
        assert_eq!(
            RoleArn::of(&r.account_id, "Reader.v1"),
            "acs:ram::123:role/reader.v1"
        );
        for bad in [
            "",
            "reader",
            "acs:ram:cn-hangzhou:123:role/x",
            "acs:ram::123:user/x",
            "acs:ram::123:role/",
            "acs:ram::123:role/a/b",
            "acs:ram::12 3:role/x",
            "acs:ram::123:role/has space",
            &format!("acs:ram::123:role/{}", "a".repeat(65)),
        ] {
            let e = RoleArn::parse(bad).unwrap_err();
            assert_eq!(e.code, FcErrorCode::InvalidArgument, "{bad}");
        }
    }
}
