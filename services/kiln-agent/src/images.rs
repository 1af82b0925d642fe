//! Custom-container images: pulled from OCI distribution registries over
//! HTTPS (`oci-client`), every blob's digest verified, each layer
//! unpacked once per node into `state_dir/images/layers/<sha256>`
//! (content-addressed by the compressed blob's digest, shared read-only by
//! every instance of every image holding it), and merged by the sandbox as
//! the instance's root filesystem.
//!
//! - **Trust.** Registries are verified against `[images] ca_bundle` (a
//!   PEM file) or the system's roots; plain HTTP and unverified TLS are
//!   never used. Registry credentials come with the function's spec (sealed
//!   at rest like its environment); each pull uses a client of its own, so
//!   one function's credentials never serve another's pull.
//! - **Digests.** The manifest is checked by the client against the
//!   registry's `Docker-Content-Digest` (and a reference's `@digest`); the
//!   config blob and every layer blob are hashed here while they download
//!   and refused when they do not match the manifest; every unpacked layer
//!   is hashed again uncompressed and checked against the config's
//!   `diff_ids`.
//! - **Size.** `[images] max_image_mb` (FC's 10 GB by default) caps the
//!   layers' declared sizes before anything is fetched, the bytes as they
//!   arrive, and the bytes unpacked.
//! - **Once.** A tag is resolved once per node and function configuration
//!   (as FC resolves it at deploy, `resolvedImageUri`); concurrent cold
//!   starts of one image wait for one pull, and of one layer for one
//!   download.
//! - **Budget.** Over `[images] budget_mb` of unpacked layers, the least
//!   recently used layers no instance uses are removed; a layer an
//!   instance uses never is.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kiln_core::{FcError, FcErrorCode, ImageSpec, InstanceSpec};
use kiln_sandbox::ImageRootfs;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The largest image config accepted.
const CONFIG_MAX: u64 = 8 * 1024 * 1024;
/// Entries one layer may hold.
const LAYER_ENTRIES_MAX: usize = 1_000_000;

/// Why an image could not be made available. Everything but local I/O is
/// the function's (its image, its registry, its credentials): FC's
/// `FunctionNotStarted` with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Image reference {reference:?} is invalid: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("Cannot reach registry {registry} for image {reference}: {reason}")]
    Unreachable {
        registry: String,
        reference: String,
        reason: String,
    },
    #[error("Registry {registry} refused the credentials for image {reference} (check customContainerConfig.registryConfig.authConfig)")]
    Unauthorized { registry: String, reference: String },
    #[error("Image {reference} was not found in its registry")]
    NotFound { reference: String },
    #[error("Image {reference} failed verification: {what} has digest {actual}, its manifest says {expected}")]
    DigestMismatch {
        reference: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("Image {reference} is larger than this node's limit of {limit_mb} MB ({what})")]
    TooLarge {
        reference: String,
        limit_mb: u64,
        what: String,
    },
    #[error("Image {reference} cannot run here: {reason}")]
    Unsupported { reference: String, reason: String },
    #[error("Image {reference}: pulling it took longer than {seconds} s")]
    Timeout { reference: String, seconds: u64 },
    #[error("Image {reference}: registry {registry} answered an error: {reason}")]
    Registry {
        registry: String,
        reference: String,
        reason: String,
    },
    #[error("Cannot write image data at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub fn to_fc(&self) -> FcError {
        match self {
            Self::Io { .. } => FcError::internal(self.to_string()),
            _ => FcError::new(FcErrorCode::FunctionNotStarted, self.to_string()),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the image's config says about how it runs (`config` of the OCI
/// image configuration).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

/// An image resolved on this node: its manifest's layers and its config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: String,
    pub manifest_digest: String,
    /// Layer blob digests (`sha256:<hex>`), the base first, with media
    /// types, declared sizes and expected uncompressed digests.
    layers: Vec<(OciDescriptor, String)>,
    pub run: RunConfig,
}

/// How an instance of the image starts: the spec the sandbox gets (the
/// resolved command and the image's environment under the function's)
/// and its root filesystem.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub spec: InstanceSpec,
    pub rootfs: ImageRootfs,
    /// Hex digests of its layers (what the instance pins).
    pub layer_digests: Vec<String>,
}

/// FC's (and OCI runtimes') rule: the function's `entrypoint` replaces
/// the image's `Entrypoint` and drops its `Cmd`; its `command` replaces
/// the `Cmd`.
pub fn resolve_argv(image: &ImageSpec, run: &RunConfig) -> Result<Vec<String>, String> {
    let entrypoint = if image.entrypoint.is_empty() {
        run.entrypoint.clone().unwrap_or_default()
    } else {
        image.entrypoint.clone()
    };
    let args = if !image.command.is_empty() {
        image.command.clone()
    } else if !image.entrypoint.is_empty() {
        Vec::new()
    } else {
        run.cmd.clone().unwrap_or_default()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(args).collect();
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(
            "it has no Entrypoint or Cmd and customContainerConfig gives no entrypoint or command"
                .into(),
        );
    }
    Ok(argv)
}

/// The image's `User` as ids in the sandbox's user namespace: numeric
/// `uid[:gid]`, or names looked up in the image's `/etc/passwd` and
/// `/etc/group` (top layer first). Empty: root, which is the sandbox's
/// unprivileged mapped root, as for every function.
pub fn resolve_user(user: Option<&str>, layers: &[PathBuf]) -> Result<(u32, u32), String> {
    let user = user.unwrap_or("").trim();
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = layers.iter().find_map(|l| {
            let p = l.join(file);
            // A whiteout (character device) hides the file below.
            let meta = std::fs::symlink_metadata(&p).ok()?;
            meta.is_file().then(|| std::fs::read_to_string(&p).ok())?
        })?;
        text.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.first() == Some(&name) && f.len() > field).then(|| {
                let id = f[2].parse().ok()?;
                let gid = if field >= 3 { f[3].parse().ok() } else { None };
                Some((id, gid))
            })?
        })
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(id) => (id, None),
        Err(_) => lookup("etc/passwd", u, 3)
            .ok_or_else(|| format!("its user {u:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => {
                lookup("etc/group", g, 2)
                    .ok_or_else(|| format!("its group {g:?} is not in the image's /etc/group"))?
                    .0
            }
        },
        None => passwd_gid.unwrap_or(0),
    };
    if uid >= 65_536 || gid >= 65_536 {
        return Err(format!(
            "its user {user:?} is outside the ids 0..65535 a sandbox maps"
        ));
    }
    Ok((uid, gid))
}

/// The sandbox's spec: the resolved command and the image's `Env` under
/// the function's own variables.
pub fn sandbox_spec(spec: &InstanceSpec, argv: Vec<String>, run: &RunConfig) -> InstanceSpec {
    let mut s = spec.clone();
    s.command = argv;
    s.args = Vec::new();
    let mut env: std::collections::BTreeMap<String, String> = run
        .env
        .iter()
        .flatten()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    env.extend(spec.environment.clone());
    s.environment = env;
    s
}

/// One unpacked layer's record beside its directory.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct LayerRecord {
    diff_id: String,
    bytes: u64,
}

#[derive(Default)]
struct Lru {
    /// Hex digest -> (unpacked bytes, last use).
    entries: HashMap<String, (u64, u64)>,
    total: u64,
    tick: u64,
    pins: HashMap<String, Vec<String>>,
    pinned: HashMap<String, usize>,
    evicted: u64,
}

/// The node's image cache. See the module docs.
pub struct ImageCache {
    layers_dir: PathBuf,
    blobs_dir: PathBuf,
    id_base: Option<u32>,
    roots: Vec<Certificate>,
    max_image_bytes: u64,
    budget_bytes: u64,
    pull_timeout: Duration,
    resolved: Mutex<HashMap<String, Arc<ResolvedImage>>>,
    /// Single flight: per image key while resolving, per layer digest
    /// while downloading and unpacking.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    lru: Mutex<Lru>,
}

/// Settings of an [`ImageCache`].
pub struct ImageCacheSettings {
    pub dir: PathBuf,
    /// The sandbox's mapped root (owners of unpacked files are shifted
    /// by it); `None` in tests without root.
    pub id_base: Option<u32>,
    pub ca_bundle: Option<PathBuf>,
    pub max_image_mb: u64,
    pub budget_mb: u64,
    pub pull_timeout: Duration,
}

fn hex_of(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| crate::code::is_digest(h))
}

impl ImageCache {
    pub fn new(s: ImageCacheSettings) -> Result<Self, ImageError> {
        // reqwest's rustls takes the process's provider: ring, as the rest
        // of Kiln (set once; a second install is refused harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = match &s.ca_bundle {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(path).map_err(io_err(path))?;
                let certs: Vec<Certificate> = rustls_pemfile::certs(&mut &pem[..])
                    .map(|c| {
                        c.map(|der| Certificate {
                            encoding: CertificateEncoding::Der,
                            data: der.to_vec(),
                        })
                    })
                    .collect::<Result<_, _>>()
                    .map_err(io_err(path))?;
                if certs.is_empty() {
                    return Err(ImageError::Io {
                        path: path.clone(),
                        source: std::io::Error::other(
                            "no PEM certificate in the registry CA bundle",
                        ),
                    });
                }
                certs
            }
        };
        let layers_dir = s.dir.join("layers");
        let blobs_dir = s.dir.join("blobs");
        for d in [&layers_dir, &blobs_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        // Downloads and unpacks a previous run left half done.
        for d in [&layers_dir, &blobs_dir] {
            for e in std::fs::read_dir(d).map_err(io_err(d))?.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        }
        let cache = Self {
            layers_dir,
            blobs_dir,
            id_base: s.id_base,
            roots,
            max_image_bytes: s.max_image_mb * 1024 * 1024,
            budget_bytes: s.budget_mb * 1024 * 1024,
            pull_timeout: s.pull_timeout,
            resolved: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            lru: Mutex::new(Lru::default()),
        };
        cache.count_existing();
        Ok(cache)
    }

    fn count_existing(&self) {
        let Ok(rd) = std::fs::read_dir(&self.layers_dir) else {
            return;
        };
        let mut lru = self.lru.lock().expect("image cache lock");
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !crate::code::is_digest(&name) || !e.path().is_dir() {
                continue;
            }
            match self.record_of(&name) {
                Some(r) => {
                    lru.tick += 1;
                    let t = lru.tick;
                    lru.entries.insert(name, (r.bytes, t));
                    lru.total += r.bytes;
                }
                None => {
                    // Unpacked without its record: not trusted, redone.
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    fn record_path(&self, hex: &str) -> PathBuf {
        self.layers_dir.join(format!("{hex}.json"))
    }

    fn record_of(&self, hex: &str) -> Option<LayerRecord> {
        let bytes = std::fs::read(self.record_path(hex)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn layer_path(&self, hex: &str) -> PathBuf {
        self.layers_dir.join(hex)
    }

    /// Unpacked bytes held, and layers evicted so far.
    pub fn usage(&self) -> (u64, u64) {
        let lru = self.lru.lock().expect("image cache lock");
        (lru.total, lru.evicted)
    }

    /// Keep `digests` (hex) until [`ImageCache::unpin`].
    pub fn pin(&self, instance: &str, digests: Vec<String>) {
        let mut lru = self.lru.lock().expect("image cache lock");
        for d in &digests {
            *lru.pinned.entry(d.clone()).or_default() += 1;
        }
        if let Some(old) = lru.pins.insert(instance.to_owned(), digests) {
            for d in old {
                release(&mut lru, &d);
            }
        }
    }

    pub fn unpin(&self, instance: &str) {
        let mut lru = self.lru.lock().expect("image cache lock");
        if let Some(old) = lru.pins.remove(instance) {
            for d in old {
                release(&mut lru, &d);
            }
        }
    }

    fn client(&self) -> Result<Client, ImageError> {
        let config = ClientConfig {
            tls_certs_only: self.roots.clone(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        Client::try_from(config).map_err(|e| ImageError::Io {
            path: self.layers_dir.clone(),
            source: std::io::Error::other(format!("cannot build the registry client: {e}")),
        })
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inflight
            .lock()
            .expect("image cache lock")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    fn done_with(&self, key: &str, lock: &Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.inflight.lock().expect("image cache lock");
        if Arc::strong_count(lock) <= 2 {
            map.remove(key);
        }
    }

    /// Everything an instance of `spec` (a custom-container spec) needs:
    /// the image resolved, every layer unpacked and pinned for `instance`
    /// (pinned before anything is fetched: nothing it uses is evicted).
    pub async fn prepare(
        &self,
        instance: &str,
        spec: &InstanceSpec,
    ) -> Result<PreparedImage, ImageError> {
        let image = spec.image.as_ref().ok_or_else(|| ImageError::Unsupported {
            reference: String::new(),
            reason: "the spec has no image".into(),
        })?;
        let reference = image.reference.clone();
        let seconds = self.pull_timeout.as_secs();
        tokio::time::timeout(self.pull_timeout, self.prepare_inner(instance, spec, image))
            .await
            .map_err(|_| ImageError::Timeout { reference, seconds })?
    }

    async fn prepare_inner(
        &self,
        instance: &str,
        spec: &InstanceSpec,
        image: &ImageSpec,
    ) -> Result<PreparedImage, ImageError> {
        let started = std::time::Instant::now();
        let reference: Reference =
            image
                .reference
                .parse()
                .map_err(|e: oci_client::ParseError| ImageError::BadReference {
                    reference: image.reference.clone(),
                    reason: e.to_string(),
                })?;
        let auth = match (&image.registry_username, &image.registry_password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            _ => RegistryAuth::Anonymous,
        };
        let client = self.client()?;
        let resolved = self.resolve(&client, &reference, &auth, image).await?;
        let hexes: Vec<String> = resolved
            .layers
            .iter()
            .filter_map(|(d, _)| hex_of(&d.digest).map(str::to_owned))
            .collect();
        self.pin(instance, hexes.clone());
        let mut budget = self.max_image_bytes;
        for (desc, diff_id) in &resolved.layers {
            let bytes = self
                .ensure_layer(
                    &client,
                    &reference,
                    &auth,
                    &image.reference,
                    desc,
                    diff_id,
                    budget,
                )
                .await?;
            budget = budget.saturating_sub(bytes);
        }
        self.evict();
        let layers: Vec<PathBuf> = hexes.iter().rev().map(|h| self.layer_path(h)).collect();
        let argv =
            resolve_argv(image, &resolved.run).map_err(|reason| ImageError::Unsupported {
                reference: image.reference.clone(),
                reason,
            })?;
        let (uid, gid) = resolve_user(resolved.run.user.as_deref(), &layers).map_err(|reason| {
            ImageError::Unsupported {
                reference: image.reference.clone(),
                reason,
            }
        })?;
        let cwd = match resolved.run.working_dir.as_deref() {
            Some(d) if d.starts_with('/') => d.to_owned(),
            Some(d) if !d.is_empty() => format!("/{d}"),
            _ => "/".to_owned(),
        };
        tracing::info!(
            image = %image.reference,
            manifest = %resolved.manifest_digest,
            layers = layers.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image ready"
        );
        Ok(PreparedImage {
            spec: sandbox_spec(spec, argv, &resolved.run),
            rootfs: ImageRootfs {
                layers,
                cwd,
                uid,
                gid,
            },
            layer_digests: hexes,
        })
    }

    /// The image's manifest and config, once per node and configuration.
    async fn resolve(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        image: &ImageSpec,
    ) -> Result<Arc<ResolvedImage>, ImageError> {
        let key = {
            let json = serde_json::to_vec(image).expect("an image spec serialises");
            format!("image:{}", hex::encode(Sha256::digest(json)))
        };
        if let Some(r) = self.resolved.lock().expect("image cache lock").get(&key) {
            return Ok(r.clone());
        }
        let lock = self.lock_for(&key);
        let result = async {
            let _held = lock.lock().await;
            if let Some(r) = self.resolved.lock().expect("image cache lock").get(&key) {
                return Ok(r.clone());
            }
            let r = Arc::new(self.fetch_manifest(client, reference, auth, image).await?);
            self.resolved
                .lock()
                .expect("image cache lock")
                .insert(key.clone(), r.clone());
            Ok(r)
        }
        .await;
        self.done_with(&key, &lock);
        result
    }

    async fn fetch_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        image: &ImageSpec,
    ) -> Result<ResolvedImage, ImageError> {
        let name = &image.reference;
        let (manifest, manifest_digest): (OciImageManifest, String) = client
            .pull_image_manifest(reference, auth)
            .await
            .map_err(|e| registry_error(reference, name, e))?;
        let declared: u64 = manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        if declared > self.max_image_bytes {
            return Err(ImageError::TooLarge {
                reference: name.clone(),
                limit_mb: self.max_image_bytes / (1024 * 1024),
                what: format!("its manifest declares {declared} bytes of layers"),
            });
        }
        let mut config_bytes = Vec::new();
        self.download(
            client,
            reference,
            name,
            &manifest.config,
            CONFIG_MAX,
            "its config",
            |chunk| {
                config_bytes.extend_from_slice(chunk);
                Ok(())
            },
        )
        .await?;
        let config: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Unsupported {
                reference: name.clone(),
                reason: format!("its config is not an OCI image configuration: {e}"),
            })?;
        if config.os.as_deref().is_some_and(|os| os != "linux") {
            return Err(ImageError::Unsupported {
                reference: name.clone(),
                reason: format!("it is built for {:?}, not linux", config.os),
            });
        }
        if let Some(arch) = config.architecture.as_deref() {
            if arch != std::env::consts::ARCH
                && !(arch == "amd64" && cfg!(target_arch = "x86_64"))
                && !(arch == "arm64" && cfg!(target_arch = "aarch64"))
            {
                return Err(ImageError::Unsupported {
                    reference: name.clone(),
                    reason: format!(
                        "it is built for {arch}, this node runs {}",
                        std::env::consts::ARCH
                    ),
                });
            }
        }
        if config.rootfs.kind != "layers" || config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Unsupported {
                reference: name.clone(),
                reason: "its config's rootfs.diff_ids do not match its manifest's layers".into(),
            });
        }
        if manifest.layers.is_empty() {
            return Err(ImageError::Unsupported {
                reference: name.clone(),
                reason: "it has no layers".into(),
            });
        }
        for l in &manifest.layers {
            if hex_of(&l.digest).is_none() {
                return Err(ImageError::Unsupported {
                    reference: name.clone(),
                    reason: format!("layer digest {:?} is not a sha256 digest", l.digest),
                });
            }
            if kiln_code::LayerCompression::of_media_type(&l.media_type).is_none() {
                return Err(ImageError::Unsupported {
                    reference: name.clone(),
                    reason: format!(
                        "layer media type {} is not supported (tar or tar+gzip layers only)",
                        l.media_type
                    ),
                });
            }
        }
        Ok(ResolvedImage {
            reference: name.clone(),
            manifest_digest,
            layers: manifest
                .layers
                .into_iter()
                .zip(config.rootfs.diff_ids)
                .collect(),
            run: config.config.unwrap_or_default(),
        })
    }

    /// Stream a blob into `sink`, hashing it and refusing more than
    /// `limit` bytes, then check it against the manifest's digest.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        name: &str,
        desc: &OciDescriptor,
        limit: u64,
        what: &str,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, ImageError> {
        let expected = hex_of(&desc.digest).ok_or_else(|| ImageError::Unsupported {
            reference: name.to_owned(),
            reason: format!("{what} has digest {:?}, not a sha256 digest", desc.digest),
        })?;
        let mut stream = client
            .pull_blob_stream(reference, desc)
            .await
            .map_err(|e| registry_error(reference, name, e))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // The client checks the digest too, at the stream's end:
                // every byte has been hashed here, so say what it hashed to.
                Err(e)
                    if e.get_ref()
                        .is_some_and(|r| r.is::<oci_client::errors::DigestError>()) =>
                {
                    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
                    tracing::error!(image = name, what, expected = %desc.digest, %actual, "image blob failed verification; refused");
                    return Err(ImageError::DigestMismatch {
                        reference: name.to_owned(),
                        what: what.to_owned(),
                        expected: desc.digest.clone(),
                        actual,
                    });
                }
                Err(e) => {
                    return Err(ImageError::Unreachable {
                        registry: reference.resolve_registry().to_owned(),
                        reference: name.to_owned(),
                        reason: format!("reading {what}: {e}"),
                    })
                }
            };
            total += chunk.len() as u64;
            if total > limit {
                return Err(ImageError::TooLarge {
                    reference: name.to_owned(),
                    limit_mb: limit / (1024 * 1024),
                    what: format!("{what} exceeds it while downloading"),
                });
            }
            hasher.update(&chunk);
            sink(&chunk).map_err(|e| ImageError::Io {
                path: self.blobs_dir.clone(),
                source: e,
            })?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            tracing::error!(image = name, what, expected, %actual, "image blob failed verification; refused");
            return Err(ImageError::DigestMismatch {
                reference: name.to_owned(),
                what: what.to_owned(),
                expected: desc.digest.clone(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok(total)
    }

    /// One layer unpacked (once per node); returns its unpacked bytes.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_layer(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        name: &str,
        desc: &OciDescriptor,
        diff_id: &str,
        budget: u64,
    ) -> Result<u64, ImageError> {
        let hex = hex_of(&desc.digest).expect("checked at resolve").to_owned();
        if let Some(bytes) = self.cached_layer(&hex, diff_id, name)? {
            return Ok(bytes);
        }
        let lock = self.lock_for(&format!("layer:{hex}"));
        let result = async {
            let _held = lock.lock().await;
            if let Some(bytes) = self.cached_layer(&hex, diff_id, name)? {
                return Ok(bytes);
            }
            // The image may have been resolved by an earlier pull (this
            // client has not authenticated yet): authenticate first.
            client
                .store_auth_if_needed(reference.resolve_registry(), auth)
                .await;
            self.pull_layer(client, reference, name, desc, &hex, diff_id, budget)
                .await
        }
        .await;
        self.done_with(&format!("layer:{hex}"), &lock);
        result
    }

    /// A layer already unpacked: its bytes, after checking it is the
    /// layer the config names.
    fn cached_layer(
        &self,
        hex: &str,
        diff_id: &str,
        name: &str,
    ) -> Result<Option<u64>, ImageError> {
        if !self.layer_path(hex).is_dir() {
            return Ok(None);
        }
        let Some(record) = self.record_of(hex) else {
            return Ok(None);
        };
        if record.diff_id != diff_id {
            return Err(ImageError::DigestMismatch {
                reference: name.to_owned(),
                what: format!("layer sha256:{hex} (uncompressed)"),
                expected: diff_id.to_owned(),
                actual: record.diff_id,
            });
        }
        let mut lru = self.lru.lock().expect("image cache lock");
        lru.tick += 1;
        let t = lru.tick;
        if let Some(e) = lru.entries.get_mut(hex) {
            e.1 = t;
        }
        Ok(Some(record.bytes))
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_layer(
        &self,
        client: &Client,
        reference: &Reference,
        name: &str,
        desc: &OciDescriptor,
        hex: &str,
        diff_id: &str,
        budget: u64,
    ) -> Result<u64, ImageError> {
        let started = std::time::Instant::now();
        let mut suffix = [0u8; 8];
        rand_fill(&mut suffix);
        let part = self
            .blobs_dir
            .join(format!(".{hex}.{}.part", hex::encode(suffix)));
        let result = async {
            let mut file = std::fs::File::create(&part).map_err(io_err(&part))?;
            let what = format!("layer {}", desc.digest);
            let downloaded = self
                .download(client, reference, name, desc, budget, &what, |chunk| {
                    file.write_all(chunk)
                })
                .await?;
            file.sync_all().map_err(io_err(&part))?;
            drop(file);
            let compression = kiln_code::LayerCompression::of_media_type(&desc.media_type)
                .expect("checked at resolve");
            let dest = self.layer_path(hex);
            let id_base = self.id_base;
            let part2 = part.clone();
            let limits = kiln_code::LayerLimits {
                max_bytes: budget,
                max_entries: LAYER_ENTRIES_MAX,
            };
            let unpacked = tokio::task::spawn_blocking(move || {
                let blob = std::fs::File::open(&part2)?;
                Ok::<_, std::io::Error>(kiln_code::unpack_layer(
                    std::io::BufReader::new(blob),
                    compression,
                    &dest,
                    id_base,
                    limits,
                ))
            })
            .await
            .map_err(|e| ImageError::Io {
                path: self.layer_path(hex),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err(&part))?;
            let info = unpacked.map_err(|e| match e {
                kiln_code::LayerError::TooLarge { .. } => ImageError::TooLarge {
                    reference: name.to_owned(),
                    limit_mb: self.max_image_bytes / (1024 * 1024),
                    what: format!("layer {} exceeds it unpacked", desc.digest),
                },
                kiln_code::LayerError::Io { path, source } => ImageError::Io { path, source },
                other => ImageError::Unsupported {
                    reference: name.to_owned(),
                    reason: format!("layer {}: {other}", desc.digest),
                },
            })?;
            if info.diff_id != diff_id {
                let _ = std::fs::remove_dir_all(self.layer_path(hex));
                return Err(ImageError::DigestMismatch {
                    reference: name.to_owned(),
                    what: format!("layer {} (uncompressed)", desc.digest),
                    expected: diff_id.to_owned(),
                    actual: info.diff_id,
                });
            }
            let record = LayerRecord {
                diff_id: info.diff_id.clone(),
                bytes: info.bytes,
            };
            let rp = self.record_path(hex);
            std::fs::write(&rp, serde_json::to_vec(&record).expect("record serialises"))
                .map_err(io_err(&rp))?;
            {
                let mut lru = self.lru.lock().expect("image cache lock");
                lru.tick += 1;
                let t = lru.tick;
                if let Some((old, _)) = lru.entries.insert(hex.to_owned(), (info.bytes, t)) {
                    lru.total -= old;
                }
                lru.total += info.bytes;
            }
            tracing::info!(
                image = name,
                layer = %desc.digest,
                downloaded,
                unpacked = info.bytes,
                entries = info.entries,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "image layer pulled and unpacked"
            );
            Ok(info.bytes)
        }
        .await;
        let _ = std::fs::remove_file(&part);
        result
    }

    /// Remove least recently used layers no instance uses until the cache
    /// is within its budget.
    fn evict(&self) {
        let inflight: HashSet<String> = self
            .inflight
            .lock()
            .expect("image cache lock")
            .keys()
            .filter_map(|k| k.strip_prefix("layer:").map(str::to_owned))
            .collect();
        let mut doomed = Vec::new();
        {
            let mut lru = self.lru.lock().expect("image cache lock");
            while lru.total > self.budget_bytes {
                let victim = lru
                    .entries
                    .iter()
                    .filter(|(d, _)| !lru.pinned.contains_key(*d) && !inflight.contains(*d))
                    .min_by_key(|(_, e)| e.1)
                    .map(|(d, _)| d.clone());
                let Some(hex) = victim else {
                    tracing::warn!(
                        total = lru.total,
                        budget = self.budget_bytes,
                        "image cache over its budget, but every layer is in use"
                    );
                    break;
                };
                let (bytes, _) = lru.entries.remove(&hex).expect("present");
                lru.total -= bytes;
                // Renamed under the lock: a later prepare sees it gone.
                let to = self.layers_dir.join(format!(".evicted-{hex}"));
                let _ = std::fs::remove_file(self.record_path(&hex));
                match std::fs::rename(self.layer_path(&hex), &to) {
                    Ok(()) => {
                        lru.evicted += 1;
                        doomed.push((hex, to, bytes));
                    }
                    Err(e) => tracing::warn!(layer = %hex, error = %e, "cannot evict image layer"),
                }
            }
        }
        for (hex, path, bytes) in doomed {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(layer = %hex, error = %e, "cannot remove an evicted image layer");
            }
            tracing::info!(layer = %hex, bytes, "image layer evicted (least recently used)");
        }
    }
}

fn release(lru: &mut Lru, digest: &str) {
    if let Some(n) = lru.pinned.get_mut(digest) {
        *n -= 1;
        if *n == 0 {
            lru.pinned.remove(digest);
        }
    }
}

fn rand_fill(buf: &mut [u8]) {
    // Unique enough for a temporary name: time and a counter.
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (n >> ((i % 8) * 8)) as u8;
    }
}

/// A registry client error in terms the function's owner can act on.
fn registry_error(
    reference: &Reference,
    name: &str,
    e: oci_client::errors::OciDistributionError,
) -> ImageError {
    use oci_client::errors::OciDistributionError as E;
    let registry = reference.resolve_registry().to_owned();
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => ImageError::Unauthorized {
            registry,
            reference: name.to_owned(),
        },
        E::ImageManifestNotFoundError(_) => ImageError::NotFound {
            reference: name.to_owned(),
        },
        E::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            ImageError::Unauthorized {
                registry,
                reference: name.to_owned(),
            }
        }
        E::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::NotFound
                )
            }) =>
        {
            ImageError::NotFound {
                reference: name.to_owned(),
            }
        }
        E::RequestError(re) => ImageError::Unreachable {
            registry,
            reference: name.to_owned(),
            reason: kiln_core::error_chain(&re),
        },
        E::DigestError(d) => ImageError::DigestMismatch {
            reference: name.to_owned(),
            what: "its manifest".into(),
            expected: String::new(),
            actual: d.to_string(),
        },
        E::ServerError {
            code: 401 | 403, ..
        } => ImageError::Unauthorized {
            registry,
            reference: name.to_owned(),
        },
        E::ServerError { code: 404, .. } => ImageError::NotFound {
            reference: name.to_owned(),
        },
        other => ImageError::Registry {
            registry,
            reference: name.to_owned(),
            reason: kiln_core::error_chain(&other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], command: &[&str]) -> ImageSpec {
        ImageSpec {
            reference: "r.example/app:v1".into(),
            entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            registry_username: None,
            registry_password: None,
        }
    }

    fn run(entrypoint: &[&str], cmd: &[&str]) -> RunConfig {
        RunConfig {
            entrypoint: (!entrypoint.is_empty())
                .then(|| entrypoint.iter().map(|s| (*s).to_owned()).collect()),
            cmd: (!cmd.is_empty()).then(|| cmd.iter().map(|s| (*s).to_owned()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn entrypoint_and_command_combine_as_fc_and_oci_runtimes_do() {
        let r = run(&["/entry"], &["serve", "--port", "9000"]);
        assert_eq!(
            resolve_argv(&image(&[], &[]), &r).unwrap(),
            ["/entry", "serve", "--port", "9000"]
        );
        // command replaces Cmd only.
        assert_eq!(
            resolve_argv(&image(&[], &["other"]), &r).unwrap(),
            ["/entry", "other"]
        );
        // entrypoint replaces Entrypoint and drops Cmd.
        assert_eq!(
            resolve_argv(&image(&["/mine"], &[]), &r).unwrap(),
            ["/mine"]
        );
        assert_eq!(
            resolve_argv(&image(&["/mine"], &["a"]), &r).unwrap(),
            ["/mine", "a"]
        );
        assert_eq!(
            resolve_argv(&image(&[], &[]), &run(&[], &["/bin/server"])).unwrap(),
            ["/bin/server"]
        );
        assert!(resolve_argv(&image(&[], &[]), &run(&[], &[])).is_err());
    }

    fn cache_with(dir: &Path, layers: &[&str], budget_mb: u64) -> ImageCache {
        let l = dir.join("layers");
        std::fs::create_dir_all(&l).unwrap();
        for hex in layers {
            std::fs::create_dir(l.join(hex)).unwrap();
            let rec = LayerRecord {
                diff_id: format!("sha256:{hex}"),
                bytes: 1024 * 1024,
            };
            std::fs::write(
                l.join(format!("{hex}.json")),
                serde_json::to_vec(&rec).unwrap(),
            )
            .unwrap();
        }
        ImageCache::new(ImageCacheSettings {
            dir: dir.to_owned(),
            id_base: None,
            ca_bundle: None,
            max_image_mb: 1,
            budget_mb,
            pull_timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn unused_layers_are_evicted_under_the_budget_and_used_ones_never() {
        let tmp = tempfile::tempdir().unwrap();
        let [a, b, c] = ["a", "b", "c"].map(|x| x.repeat(64));
        let cache = cache_with(tmp.path(), &[&a, &b, &c], 2);
        assert_eq!(cache.usage(), (3 * 1024 * 1024, 0));
        // b is used by an instance; a and c are not, one of them goes.
        cache.pin("i-1", vec![b.clone()]);
        cache.evict();
        assert_eq!(cache.usage(), (2 * 1024 * 1024, 1));
        assert!(cache.layer_path(&b).is_dir());
        assert_eq!(
            [&a, &c]
                .iter()
                .filter(|h| cache.layer_path(h).is_dir())
                .count(),
            1
        );
        // Every layer in use: over the budget rather than evicting one.
        let kept = if cache.layer_path(&a).is_dir() {
            &a
        } else {
            &c
        };
        cache.pin("i-2", vec![kept.clone()]);
        let cache2 = cache_with(&tmp.path().join("other"), &[&a, &b, &c], 1);
        cache2.pin("i", vec![a.clone(), b.clone(), c.clone()]);
        cache2.evict();
        assert_eq!(cache2.usage(), (3 * 1024 * 1024, 0));
        // Unpinned, they go down to the budget; nothing half-evicted is
        // left beside them.
        cache2.unpin("i");
        cache2.evict();
        assert_eq!(cache2.usage().0, 1024 * 1024);
        let leftovers = std::fs::read_dir(tmp.path().join("other/layers"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".evicted"))
            .count();
        assert_eq!(leftovers, 0);
        // A layer dir without its record is not trusted: removed at start.
        let d = tmp.path().join("third");
        std::fs::create_dir_all(d.join("layers").join(&a)).unwrap();
        let cache3 = cache_with(&d, &[], 10);
        assert_eq!(cache3.usage(), (0, 0));
        assert!(!cache3.layer_path(&a).exists());
    }

    #[test]
    fn users_map_by_number_or_by_the_images_own_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, base) = (tmp.path().join("top"), tmp.path().join("base"));
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(
            base.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(base.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let layers = vec![top, base];
        assert_eq!(resolve_user(None, &layers).unwrap(), (0, 0));
        assert_eq!(resolve_user(Some("123"), &layers).unwrap(), (123, 0));
        assert_eq!(resolve_user(Some("123:456"), &layers).unwrap(), (123, 456));
        assert_eq!(resolve_user(Some("app"), &layers).unwrap(), (1000, 1001));
        assert_eq!(
            resolve_user(Some("app:staff"), &layers).unwrap(),
            (1000, 50)
        );
        assert!(resolve_user(Some("nobody-here"), &layers).is_err());
        assert!(resolve_user(Some("70000"), &layers).is_err());
    }

    #[test]
    fn the_functions_environment_wins_over_the_images() {
        let mut spec = kiln_core::InstanceSpec {
            account_id: "1".parse().unwrap(),
            function_name: "f".parse().unwrap(),
            revision: String::new(),
            version: None,
            runtime: kiln_core::RuntimeName::CustomContainer,
            handler: "h".into(),
            command: vec![],
            args: vec![],
            port: 9000,
            environment: [("A".to_owned(), "function".to_owned())].into(),
            memory_mb: 512,
            cpu_milli: 0,
            disk_mb: 512,
            timeout_s: 3,
            concurrency: 1,
            code_digest: String::new(),
            code_size: 0,
            initializer: None,
            pre_stop: None,
            layers: vec![],
            role: None,
            network: None,
            image: Some(image(&[], &[])),
        };
        spec = spec.seal();
        let r = RunConfig {
            env: Some(vec!["A=image".into(), "PATH=/usr/bin".into()]),
            ..Default::default()
        };
        let s = sandbox_spec(&spec, vec!["/x".into()], &r);
        assert_eq!(s.command, ["/x"]);
        assert_eq!(s.environment["A"], "function");
        assert_eq!(s.environment["PATH"], "/usr/bin");
    }
}
