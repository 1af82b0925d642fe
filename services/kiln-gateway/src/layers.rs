//! FC's layers: named, versioned zips (1, 2, ... per layer, numbers never
//! reused) that functions merge read-only under `/opt`. Layer zips are
//! stored once by sha256 in the same content-addressed files as function
//! code; a zip stays while a layer version or any function references it,
//! so deleting a layer version a function uses (allowed, as in FC) does not
//! break that function, while new references to it are refused.
//!
//! A layer is private to its account unless PutLayerACL made it public;
//! other accounts may then read and use its versions by ARN.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use kiln_core::{AccountId, FcError, FcErrorCode, RuntimeName};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, CatalogError, NewCode};
use crate::model::{fc_time, CodeRef, LayerRef};
use crate::store::{LayerRecord, LayerVersionRecord};

/// FC's maximum number of layers on one function.
pub const FUNCTION_LAYERS_MAX: usize = 5;
/// Longest layer name.
pub const LAYER_NAME_MAX: usize = 64;
pub const LIST_LIMIT_DEFAULT: usize = 20;
pub const LIST_LIMIT_MAX: usize = 100;
pub const DESCRIPTION_MAX: usize = 256;
pub const LICENSE_MAX: usize = 128;

/// A layer name: 1 to 64 letters, digits, `-` and `_`, starting with a
/// letter or `_`.
pub fn check_layer_name(name: &str) -> Result<(), FcError> {
    let mut b = name.bytes();
    let first = b
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_');
    if !first
        || name.len() > LAYER_NAME_MAX
        || !b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(FcError::invalid_argument(format!(
            "layerName {:?} is invalid: 1 to {LAYER_NAME_MAX} letters, digits, '-' or '_', starting with a letter or '_'",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// A layer version's ARN,
/// `acs:fc:<region>:<account>:layers/<name>/versions/<n>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerArn {
    pub region: String,
    pub account_id: AccountId,
    pub name: String,
    pub version: u32,
}

impl LayerArn {
    pub fn parse(s: &str) -> Result<Self, FcError> {
        let bad = || {
            FcError::invalid_argument(format!(
                "layer ARN {:?} is malformed: expected acs:fc:<region>:<accountId>:layers/<layerName>/versions/<version>",
                s.chars().take(200).collect::<String>()
            ))
        };
        let rest = s.strip_prefix("acs:fc:").ok_or_else(bad)?;
        let mut parts = rest.splitn(3, ':');
        let (Some(region), Some(account), Some(resource)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if region.is_empty()
            || !region
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err(bad());
        }
        let account_id: AccountId = account.parse().map_err(|_| bad())?;
        let segs: Vec<&str> = resource.split('/').collect();
        let [layers, name, versions, version] = segs.as_slice() else {
            return Err(bad());
        };
        if *layers != "layers" || *versions != "versions" {
            return Err(bad());
        }
        check_layer_name(name).map_err(|_| bad())?;
        let version = parse_version(version).ok_or_else(bad)?;
        Ok(Self {
            region: region.to_owned(),
            account_id,
            name: (*name).to_owned(),
            version,
        })
    }
}

/// A version number as FC writes it: a positive decimal.
pub fn parse_version(s: &str) -> Option<u32> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|v| *v > 0)
}

pub fn arn(region: &str, account: &AccountId, name: &str, version: u32) -> String {
    format!("acs:fc:{region}:{account}:layers/{name}/versions/{version}")
}

/// `CreateLayerVersionInput`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateLayerVersionInput {
    pub code: Option<crate::model::InputCodeLocation>,
    pub compatible_runtime: Option<Vec<String>>,
    pub description: Option<String>,
    pub license: Option<String>,
}

/// `Layer`, the SDK's model of one layer version.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Layer {
    /// "0" private, "1" public.
    pub acl: &'static str,
    pub code_checksum: String,
    pub code_size: u64,
    pub compatible_runtime: Vec<String>,
    pub create_time: String,
    pub description: String,
    pub layer_name: String,
    pub layer_version_arn: String,
    pub license: String,
    pub version: u32,
}

impl Layer {
    pub fn new(v: &LayerVersionRecord, public: bool, region: &str) -> Self {
        Self {
            acl: if public { "1" } else { "0" },
            code_checksum: v.code.checksum.clone(),
            code_size: v.code.size,
            compatible_runtime: v.compatible_runtime.clone(),
            create_time: fc_time(v.created_ms),
            description: v.description.clone(),
            layer_name: v.name.clone(),
            layer_version_arn: arn(region, &v.account_id, &v.name, v.version),
            license: v.license.clone(),
            version: v.version,
        }
    }
}

/// `ListLayersOutput`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListLayersOutput {
    pub layers: Vec<Layer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `ListLayerVersionOutput`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListLayerVersionOutput {
    pub layers: Vec<Layer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_version: Option<u32>,
}

/// One layer in memory.
#[derive(Debug, Clone, Default)]
pub struct LayerState {
    pub public: bool,
    pub last_version: u32,
    pub versions: BTreeMap<u32, Arc<LayerVersionRecord>>,
}

/// Every layer, by account then name.
#[derive(Debug, Default)]
pub struct LayerIndex {
    pub layers: BTreeMap<AccountId, BTreeMap<String, LayerState>>,
}

impl LayerIndex {
    pub fn load(layers: Vec<LayerRecord>, versions: Vec<LayerVersionRecord>) -> Self {
        let mut idx = Self::default();
        for l in layers {
            idx.layers.entry(l.account_id).or_default().insert(
                l.name,
                LayerState {
                    public: l.public,
                    last_version: l.last_version,
                    versions: BTreeMap::new(),
                },
            );
        }
        for v in versions {
            let st = idx
                .layers
                .entry(v.account_id.clone())
                .or_default()
                .entry(v.name.clone())
                .or_default();
            st.last_version = st.last_version.max(v.version);
            st.versions.insert(v.version, Arc::new(v));
        }
        idx
    }

    fn get(&self, account: &AccountId, name: &str) -> Option<&LayerState> {
        self.layers.get(account).and_then(|m| m.get(name))
    }

    pub fn digests(&self) -> HashSet<String> {
        self.layers
            .values()
            .flat_map(|m| m.values())
            .flat_map(|s| s.versions.values())
            .map(|v| v.code.sha256.clone())
            .collect()
    }
}

fn not_found(what: impl std::fmt::Display) -> FcError {
    FcError::new(
        FcErrorCode::LayerNotFound,
        format!("layer {what} does not exist"),
    )
}

/// A layer zip arriving through the API, with its create fields checked.
pub struct NewLayerVersion {
    pub code: NewCode,
    pub compatible_runtime: Vec<String>,
    pub description: String,
    pub license: String,
}

/// Check a CreateLayerVersion body's fields other than the code.
pub fn check_fields(
    input: &CreateLayerVersionInput,
) -> Result<(Vec<String>, String, String), FcError> {
    let compatible = input.compatible_runtime.clone().unwrap_or_default();
    if compatible.is_empty() {
        return Err(FcError::invalid_argument(
            "compatibleRuntime is required: the runtimes that may use this layer",
        ));
    }
    for r in &compatible {
        r.parse::<RuntimeName>()
            .map_err(|e| FcError::invalid_argument(format!("compatibleRuntime: {e}")))?;
    }
    let description = input.description.clone().unwrap_or_default();
    if description.len() > DESCRIPTION_MAX {
        return Err(FcError::invalid_argument(format!(
            "description must be at most {DESCRIPTION_MAX} bytes"
        )));
    }
    let license = input.license.clone().unwrap_or_default();
    if license.len() > LICENSE_MAX || license.chars().any(char::is_control) {
        return Err(FcError::invalid_argument(format!(
            "license must be at most {LICENSE_MAX} bytes without control characters"
        )));
    }
    Ok((compatible, description, license))
}

impl Catalog {
    fn layer_index(&self) -> std::sync::RwLockReadGuard<'_, LayerIndex> {
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any layer version or any function (code or layers) uses
    /// the zip `digest`. Called under the write lock before a zip file is
    /// removed.
    pub(crate) fn zip_in_use(&self, digest: &str) -> bool {
        if self.layer_index().digests().contains(digest) || self.version_zip_in_use(digest) {
            return true;
        }
        let functions = self.functions.read().unwrap_or_else(|p| p.into_inner());
        functions.values().flat_map(|m| m.values()).any(|f| {
            f.record.config.code.sha256 == digest
                || f.record.config.layers.iter().any(|l| l.sha256 == digest)
        })
    }

    /// Whether any layer version or function's layer list uses `digest`
    /// (code packages are counted by their own rows).
    pub(crate) fn layer_zip_in_use(&self, digest: &str) -> bool {
        if self.layer_index().digests().contains(digest) || self.version_uses_layer_zip(digest) {
            return true;
        }
        let functions = self.functions.read().unwrap_or_else(|p| p.into_inner());
        functions
            .values()
            .flat_map(|m| m.values())
            .any(|f| f.record.config.layers.iter().any(|l| l.sha256 == digest))
    }

    /// Publish a new version of `name` (created on first use).
    pub async fn create_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        new: NewLayerVersion,
        now_ms: u64,
    ) -> Result<(Arc<LayerVersionRecord>, bool), CatalogError> {
        let _w = self.write.lock().await;
        let bound = self.check_bounds(
            account,
            crate::bounds::Change {
                layer_versions: 1,
                added_bytes: new.code.blob.size,
                ..Default::default()
            },
        )?;
        let (version, public) = match self.layer_index().get(account, name) {
            Some(s) => (s.last_version + 1, s.public),
            None => (1, false),
        };
        let record = LayerVersionRecord {
            account_id: account.clone(),
            name: name.to_owned(),
            version,
            code: CodeRef {
                sha256: new.code.blob.sha256.clone(),
                size: new.code.blob.size,
                checksum: new.code.blob.checksum.clone(),
            },
            description: new.description,
            compatible_runtime: new.compatible_runtime,
            license: new.license,
            created_ms: now_ms,
        };
        let files = self.code_files().clone();
        let digest = new.code.blob.sha256.clone();
        let zip = new.code.zip;
        let store = self.store.clone();
        let r = record.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<u32, CatalogError> {
            files
                .write(&digest, &zip)
                .map_err(CatalogError::CodeWrite)?;
            store.ensure_account(&r.account_id, r.created_ms)?;
            Ok(store.insert_layer_version_within(&r, bound)?)
        })
        .await
        .map_err(|_| CatalogError::Join)?;
        // Another gateway of a cluster may have taken the number: the
        // store hands out the next free one.
        let mut record = record;
        let written = written.map(|stored| record.version = stored);
        let version = record.version;
        if let Err(e) = written {
            if !self.zip_in_use(&record.code.sha256) && self.store_has_no_code(&record.code.sha256)
            {
                self.code_files().remove(&record.code.sha256);
            }
            return Err(e);
        }
        let record = Arc::new(record);
        let mut idx = self.layers.write().unwrap_or_else(|p| p.into_inner());
        let st = idx
            .layers
            .entry(account.clone())
            .or_default()
            .entry(name.to_owned())
            .or_default();
        st.last_version = version;
        st.versions.insert(version, record.clone());
        Ok((record, public))
    }

    fn store_has_no_code(&self, digest: &str) -> bool {
        matches!(self.store.code_blob(digest), Ok(None))
    }

    /// `account`'s own layer version.
    pub fn layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u32,
    ) -> Result<(Arc<LayerVersionRecord>, bool), FcError> {
        let idx = self.layer_index();
        let st = idx
            .get(account, name)
            .ok_or_else(|| not_found(format!("'{name}'")))?;
        let v = st
            .versions
            .get(&version)
            .ok_or_else(|| not_found(format!("'{name}' version {version}")))?;
        Ok((v.clone(), st.public))
    }

    /// The version an ARN names, if `caller` may use it: its own, or a
    /// public layer of another account. Another account's private layer
    /// is as absent as a missing one.
    pub fn layer_by_arn(
        &self,
        caller: &AccountId,
        region: &str,
        arn: &LayerArn,
    ) -> Result<(Arc<LayerVersionRecord>, bool), FcError> {
        let shown = || {
            not_found(format!(
                "version {}",
                self::arn(&arn.region, &arn.account_id, &arn.name, arn.version)
            ))
        };
        if arn.region != region {
            return Err(shown());
        }
        let (v, public) = self
            .layer_version(&arn.account_id, &arn.name, arn.version)
            .map_err(|_| shown())?;
        if &arn.account_id != caller && !public {
            return Err(shown());
        }
        Ok((v, public))
    }

    /// The latest version of each of `account`'s layers whose name starts
    /// with `prefix` and sorts after `after`; `public_only` keeps public
    /// ones. At most `limit`, and whether more follow.
    pub fn list_layers(
        &self,
        account: &AccountId,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        public_only: bool,
    ) -> (Vec<(Arc<LayerVersionRecord>, bool)>, bool) {
        let idx = self.layer_index();
        let Some(m) = idx.layers.get(account) else {
            return (Vec::new(), false);
        };
        let mut out = Vec::new();
        for (name, st) in m {
            if !name.starts_with(prefix) || after.is_some_and(|a| name.as_str() <= a) {
                continue;
            }
            if public_only && !st.public {
                continue;
            }
            let Some(latest) = st.versions.values().next_back() else {
                continue;
            };
            if out.len() == limit {
                return (out, true);
            }
            out.push((latest.clone(), st.public));
        }
        (out, false)
    }

    /// `account`'s versions of `name` from `start` upwards, at most
    /// `limit`, and the next version when more follow.
    #[allow(clippy::type_complexity)]
    pub fn list_layer_versions(
        &self,
        account: &AccountId,
        name: &str,
        start: u32,
        limit: usize,
    ) -> Result<(Vec<Arc<LayerVersionRecord>>, bool, Option<u32>), FcError> {
        let idx = self.layer_index();
        let st = idx
            .get(account, name)
            .filter(|s| !s.versions.is_empty())
            .ok_or_else(|| not_found(format!("'{name}'")))?;
        let mut it = st.versions.range(start..);
        let page: Vec<_> = it.by_ref().take(limit).map(|(_, v)| v.clone()).collect();
        let next = it.next().map(|(n, _)| *n);
        Ok((page, st.public, next))
    }

    /// Delete one version. Functions that use it keep working (their zip
    /// stays until nothing references it); new references are refused.
    pub async fn delete_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u32,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let (v, _) = self
            .layer_version(account, name, version)
            .map_err(CatalogError::Invalid)?;
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || store.delete_layer_version(&a, &n, version))
            .await
            .map_err(|_| CatalogError::Join)??;
        {
            let mut idx = self.layers.write().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = idx.layers.get_mut(account).and_then(|m| m.get_mut(name)) {
                st.versions.remove(&version);
            }
        }
        let digest = &v.code.sha256;
        if !self.zip_in_use(digest) && self.store_has_no_code(digest) {
            self.code_files().remove(digest);
        }
        Ok(())
    }

    /// PutLayerACL: make `account`'s layer public or private.
    pub async fn put_layer_acl(
        &self,
        account: &AccountId,
        name: &str,
        public: bool,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        if self.layer_index().get(account, name).is_none() {
            return Err(CatalogError::Invalid(not_found(format!("'{name}'"))));
        }
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.to_owned());
        let found = tokio::task::spawn_blocking(move || store.set_layer_public(&a, &n, public))
            .await
            .map_err(|_| CatalogError::Join)??;
        if !found {
            return Err(CatalogError::Invalid(not_found(format!("'{name}'"))));
        }
        let mut idx = self.layers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = idx.layers.get_mut(account).and_then(|m| m.get_mut(name)) {
            st.public = public;
        }
        Ok(())
    }

    /// Resolve a function's `layers` (ARNs, in order) for `caller` and the
    /// function's `runtime`: each must be well formed, exist, be the
    /// caller's or public, and list the runtime as compatible.
    pub fn resolve_layers(
        &self,
        caller: &AccountId,
        region: &str,
        runtime: RuntimeName,
        arns: &[String],
    ) -> Result<Vec<LayerRef>, FcError> {
        if arns.len() > FUNCTION_LAYERS_MAX {
            return Err(FcError::invalid_argument(format!(
                "layers: at most {FUNCTION_LAYERS_MAX} layers per function, got {}",
                arns.len()
            )));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(arns.len());
        for raw in arns {
            let arn = LayerArn::parse(raw)?;
            if !seen.insert((arn.account_id.clone(), arn.name.clone())) {
                return Err(FcError::invalid_argument(format!(
                    "layers: layer {} is listed more than once",
                    arn.name
                )));
            }
            let (v, _) = self
                .layer_by_arn(caller, region, &arn)
                .map_err(|e| FcError::invalid_argument(format!("layers: {}", e.message)))?;
            if !v.compatible_runtime.iter().any(|r| r == runtime.as_str()) {
                return Err(FcError::invalid_argument(format!(
                    "runtime: {runtime} is not supported by layer:{raw}"
                )));
            }
            out.push(LayerRef {
                arn: raw.clone(),
                sha256: v.code.sha256.clone(),
                size: v.code.size,
            });
        }
        Ok(out)
    }

    /// Under the write lock, before a function is written: every layer it
    /// newly references must still exist (a version deleted since the
    /// request was validated is refused; ones the function already had
    /// stay usable).
    pub(crate) fn check_new_layers(
        &self,
        before: &[LayerRef],
        after: &[LayerRef],
    ) -> Result<(), CatalogError> {
        let live = self.layer_index().digests();
        for l in after {
            if before.iter().any(|b| b == l) {
                continue;
            }
            if !live.contains(&l.sha256) {
                return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                    "layers: layer version {} does not exist",
                    l.arn
                ))));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_parse_and_refuse_malformed_ones() {
        let a = LayerArn::parse("acs:fc:cn-test:1000000000000001:layers/my_layer-1/versions/3")
            .unwrap();
        assert_eq!(
            (
                a.region.as_str(),
                a.account_id.as_str(),
                a.name.as_str(),
                a.version
            ),
            ("cn-test", "1000000000000001", "my_layer-1", 3)
        );
        assert_eq!(
            arn(&a.region, &a.account_id, &a.name, a.version),
            "acs:fc:cn-test:1000000000000001:layers/my_layer-1/versions/3"
        );
        for bad in [
            "",
            "my-layer",
            "acs:fc:cn-test:1:layers/x/versions/0",
            "acs:fc:cn-test:1:layers/x/versions/01",
            "acs:fc:cn-test:1:layers/x/versions/-1",
            "acs:fc:cn-test:1:layers/x/versions/",
            "acs:fc:cn-test:1:layers/x",
            "acs:fc:cn-test:1:functions/x/versions/1",
            "acs:fc:cn-test:1:layers/../versions/1",
            "acs:fc:cn-test:1:layers/x/versions/1/extra",
            "acs:fc::1:layers/x/versions/1",
            "acs:fc:cn-test:not-an-account:layers/x/versions/1",
            "acs:oss:cn-test:1:layers/x/versions/1",
            "acs:fc:cn-test:1:layers/x/versions/99999999999",
        ] {
            let e = LayerArn::parse(bad).unwrap_err();
            assert_eq!(e.code, FcErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn layer_names_follow_fc() {
        for ok in ["a", "_x", "My-Layer_2", &"a".repeat(64)] {
            check_layer_name(ok).unwrap();
        }
        for bad in ["", "1a", "-a", "a.b", "a/b", &"a".repeat(65), "a b"] {
            assert!(check_layer_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_fields_are_checked() {
        let mut i = CreateLayerVersionInput::default();
        assert!(check_fields(&i)
            .unwrap_err()
            .message
            .contains("compatibleRuntime"));
        i.compatible_runtime = Some(vec!["python3.10".into()]);
        assert!(check_fields(&i).is_err());
        i.compatible_runtime = Some(vec!["custom".into(), "custom.debian12".into()]);
        assert_eq!(check_fields(&i).unwrap().0.len(), 2);
        i.description = Some("d".repeat(DESCRIPTION_MAX + 1));
        assert!(check_fields(&i).is_err());
    }
}
