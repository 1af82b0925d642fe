//! The on-disk layout of one instance and the record the driver keeps of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

/// What the driver needs to tear an instance down, persisted as
/// `instance.json` before anything else is created for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub slot_index: u32,
    /// Name of the netns and of the host-side veth.
    pub netns: String,
    pub endpoint: SocketAddr,
    pub pid: Option<u32>,
    /// When `pid` started (see `OciRuntime::init_started`): the pid is this
    /// instance's process only while the two match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// The runc container id, when it is not `<name_prefix>-<instance id>`
    /// (a pre-made sandbox keeps the id it was made with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// A claimed pre-made sandbox's old path, a symlink to the instance
    /// directory (runc's state names the bundle by it); removed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub premade_link: Option<PathBuf>,
}

/// Paths below `state_dir/instances/<id>/`.
#[derive(Debug, Clone)]
pub struct InstancePaths {
    pub dir: PathBuf,
}

impl InstancePaths {
    pub fn new(instances_dir: &Path, id: &InstanceId) -> Self {
        Self {
            dir: instances_dir.join(id.as_str()),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("instance.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("bundle/rootfs")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("bundle/config.json")
    }
    /// Host side of the merged `/code` overlay.
    pub fn code(&self) -> PathBuf {
        self.dir.join("code")
    }
    /// Mount point of the instance's size-limited writable filesystem.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
    /// The (sparse) image file behind [`Self::disk`].
    pub fn disk_image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    /// The `/code` overlay's upper dir, on the writable filesystem.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("disk/upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("disk/work")
    }
    /// Host side of the instance's `/tmp`, on the writable filesystem.
    pub fn tmp(&self) -> PathBuf {
        self.dir.join("disk/tmp")
    }
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn read_record(&self) -> Option<InstanceRecord> {
        let bytes = std::fs::read(self.record()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_record(&self, record: &InstanceRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        let tmp = self.dir.join("instance.json.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, self.record())
    }
}
