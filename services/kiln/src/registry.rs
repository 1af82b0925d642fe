//! A local OCI registry for tests and `kiln bench`: Debian's
//! `docker-registry` (the CNCF distribution server) on 127.0.0.1 with a TLS
//! certificate from a CA made for it and htpasswd (bcrypt) basic auth, its
//! storage in a temporary directory; images are built here as OCI layouts
//! and pushed with `skopeo copy`. Stopped (by its pid) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The programs a registry needs (Debian: docker-registry, skopeo,
/// apache2-utils).
pub const TOOLS: [&str; 3] = ["docker-registry", "skopeo", "htpasswd"];

pub const USER: &str = "kiln";
pub const PASSWORD: &str = "registry-s3cret";

pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Registry {
    /// Start one ([`TOOLS`] must be installed).
    pub fn start() -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-registry-")
            .tempdir()?;
        let d = dir.path();
        let ca = kiln_pki::Ca::generate("kiln registry CA")?;
        std::fs::write(d.join("ca.pem"), ca.cert_pem())?;
        let leaf = ca.issue(
            &kiln_pki::CertRequest::public_server("127.0.0.1").names(&["127.0.0.1".into()]),
        )?;
        leaf.write(&d.join("cert.pem"), &d.join("key.pem"))?;
        // skopeo reads a directory of CA files named *.crt.
        std::fs::create_dir(d.join("certs.d"))?;
        std::fs::write(d.join("certs.d/ca.crt"), ca.cert_pem())?;
        let out = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .context("run htpasswd (apache2-utils)")?;
        if !out.status.success() {
            bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(d.join("htpasswd"), &out.stdout)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  htpasswd:\n    realm: kiln-test\n    path: {htpasswd}\n",
            storage = d.join("storage").display(),
            cert = d.join("cert.pem").display(),
            key = d.join("key.pem").display(),
            htpasswd = d.join("htpasswd").display(),
        );
        std::fs::write(d.join("config.yml"), config)?;
        let log = std::fs::File::create(d.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn docker-registry")?;
        let mut r = Registry { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = r.child.try_wait() {
                bail!("docker-registry exited with {status}: {}", r.log());
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not listen within 30 s: {}", r.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(r)
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Push the OCI layout at `layout` (tag `tag`) as `repo:tag`.
    pub fn push(&self, layout: &Path, repo: &str, tag: &str) -> Result<()> {
        let out = Command::new("skopeo")
            .arg("copy")
            .arg("--quiet")
            .arg("--dest-cert-dir")
            .arg(self.dir.path().join("certs.d"))
            .arg("--dest-creds")
            .arg(format!("{USER}:{PASSWORD}"))
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .output()
            .context("run skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    /// The file the registry keeps a blob in.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join(format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gzip-compressed layer: its bytes, digest and diff id.
#[derive(Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A layer of files: (path, content, mode), all owned by root. (Tars are
/// built in memory: writing them cannot fail.)
pub fn layer(files: &[(&str, &[u8], u32)]) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).expect("a tar in memory");
    }
    finish(b)
}

/// A layer holding the directory tree at `dir` (a runtime's root).
pub fn layer_of_dir(dir: &Path) -> Result<Layer> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(".", dir)
        .with_context(|| format!("tar {}", dir.display()))?;
    Ok(finish(b))
}

fn finish(b: tar::Builder<Vec<u8>>) -> Layer {
    use std::io::Write;
    let tar = b.into_inner().expect("a tar in memory");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip in memory");
    let blob = gz.finish().expect("gzip in memory");
    Layer {
        digest: sha(&blob),
        diff_id: sha(&tar),
        blob,
    }
}

/// Write an OCI image layout at `dir` holding one image tagged `tag`: the
/// layers (base first) and a config running `entrypoint` with `env`.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Layer],
    config: serde_json::Value,
) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> Result<String> {
        let d = sha(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data)?;
        Ok(d)
    };
    let mut cfg = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    if cfg!(target_arch = "aarch64") {
        cfg["architecture"] = "arm64".into();
    }
    let cfg = serde_json::to_vec(&cfg)?;
    let cfg_digest = put(&cfg)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": layers.iter().map(|l| Ok(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(&l.blob)?,
            "size": l.blob.len(),
        }))).collect::<Result<Vec<_>>>()?,
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let m_digest = put(&manifest)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": m_digest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }))?,
    )?;
    Ok(())
}
