//! A real OCI registry for a test: Debian's `docker-registry` (the CNCF
//! distribution server) on 127.0.0.1 with a TLS certificate from a CA made
//! for the test and htpasswd (bcrypt) basic auth, its storage in a
//! temporary directory; images are built here as OCI layouts and pushed
//! with `skopeo copy`. Stopped (by its pid) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const USER: &str = "kiln";
pub const PASSWORD: &str = "registry-s3cret";

pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Registry {
    /// Start one; the caller has checked `docker-registry`, `skopeo` and
    /// `htpasswd` are installed.
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("kiln-registry-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let ca = kiln_pki::Ca::generate("kiln test registry CA").unwrap();
        std::fs::write(d.join("ca.pem"), ca.cert_pem()).unwrap();
        let leaf = ca
            .issue(&kiln_pki::CertRequest::public_server("127.0.0.1").names(&["127.0.0.1".into()]))
            .unwrap();
        leaf.write(&d.join("cert.pem"), &d.join("key.pem")).unwrap();
        // skopeo reads a directory of CA files named *.crt.
        std::fs::create_dir(d.join("certs.d")).unwrap();
        std::fs::write(d.join("certs.d/ca.crt"), ca.cert_pem()).unwrap();
        let out = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("run htpasswd");
        assert!(out.status.success(), "htpasswd failed");
        std::fs::write(d.join("htpasswd"), &out.stdout).unwrap();
        let port = kiln_test_support::free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  htpasswd:\n    realm: kiln-test\n    path: {htpasswd}\n",
            storage = d.join("storage").display(),
            cert = d.join("cert.pem").display(),
            key = d.join("key.pem").display(),
            htpasswd = d.join("htpasswd").display(),
        );
        std::fs::write(d.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(d.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        let mut r = Registry { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("docker-registry exited with {status}: {}", r.log());
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
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
    pub fn push(&self, layout: &Path, repo: &str, tag: &str) {
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
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
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

/// A layer of files: (path, content, mode), all owned by root.
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
        b.append_data(&mut h, path, *data).unwrap();
    }
    finish(b)
}

/// A layer holding the directory tree at `dir` (a runtime's root).
pub fn layer_of_dir(dir: &Path) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(".", dir).unwrap();
    finish(b)
}

fn finish(b: tar::Builder<Vec<u8>>) -> Layer {
    use std::io::Write;
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let blob = gz.finish().unwrap();
    Layer {
        digest: sha(&blob),
        diff_id: sha(&tar),
        blob,
    }
}

/// Write an OCI image layout at `dir` holding one image tagged `tag`: the
/// layers (base first) and a config running `entrypoint` with `env`.
pub fn write_layout(dir: &Path, tag: &str, layers: &[Layer], config: serde_json::Value) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let d = sha(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
        d
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
    let cfg = serde_json::to_vec(&cfg).unwrap();
    let cfg_digest = put(&cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(&l.blob),
            "size": l.blob.len(),
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let m_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
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
        }))
        .unwrap(),
    )
    .unwrap();
}
