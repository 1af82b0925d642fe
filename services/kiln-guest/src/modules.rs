//! Kernel modules from the initramfs. The image build writes
//! `/lib/modules/kiln.order`: one module path per line, dependencies first.

use std::path::{Path, PathBuf};

/// Loads one module file.
pub trait ModuleLoader {
    fn load(&self, path: &Path) -> Result<(), ModuleError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("Reading the module list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Opening module {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Loading module {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// `finit_module(2)`; a module that is already loaded (or built in) is fine.
pub struct FinitModule;

impl ModuleLoader for FinitModule {
    fn load(&self, path: &Path) -> Result<(), ModuleError> {
        let file = std::fs::File::open(path).map_err(|source| ModuleError::Open {
            path: path.into(),
            source,
        })?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
            Err(source) => Err(ModuleError::Load {
                path: path.into(),
                source,
            }),
        }
    }
}

/// Module paths listed in `order` (relative paths are below `base`).
pub fn read_order(order: &Path, base: &Path) -> Result<Vec<PathBuf>, ModuleError> {
    let text = match std::fs::read_to_string(order) {
        Ok(t) => t,
        // An image whose drivers are all built in has no list.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ModuleError::List {
                path: order.into(),
                source,
            })
        }
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| base.join(l))
        .collect())
}

/// Load every module in order; stop at the first failure.
pub fn load_all(
    loader: &dyn ModuleLoader,
    order: &Path,
    base: &Path,
) -> Result<usize, ModuleError> {
    let modules = read_order(order, base)?;
    for m in &modules {
        loader.load(m)?;
        tracing::debug!(module = %m.display(), "module loaded");
    }
    Ok(modules.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Recorder(RefCell<Vec<PathBuf>>, Option<&'static str>);
    impl ModuleLoader for Recorder {
        fn load(&self, path: &Path) -> Result<(), ModuleError> {
            if self.1.is_some_and(|f| path.ends_with(f)) {
                return Err(ModuleError::Load {
                    path: path.into(),
                    source: nix::errno::Errno::ENOEXEC,
                });
            }
            self.0.borrow_mut().push(path.into());
            Ok(())
        }
    }

    #[test]
    fn loads_in_order_and_stops_at_failure() {
        let dir = tempfile::tempdir().unwrap();
        let order = dir.path().join("kiln.order");
        std::fs::write(
            &order,
            "# deps first\nkernel/virtio.ko\n\nkernel/virtio_blk.ko\nkernel/erofs.ko\n",
        )
        .unwrap();
        let r = Recorder(RefCell::new(vec![]), None);
        assert_eq!(
            load_all(&r, &order, Path::new("/lib/modules/k")).unwrap(),
            3
        );
        assert_eq!(
            r.0.borrow().as_slice(),
            [
                PathBuf::from("/lib/modules/k/kernel/virtio.ko"),
                PathBuf::from("/lib/modules/k/kernel/virtio_blk.ko"),
                PathBuf::from("/lib/modules/k/kernel/erofs.ko"),
            ]
        );
        let r = Recorder(RefCell::new(vec![]), Some("virtio_blk.ko"));
        assert!(matches!(
            load_all(&r, &order, Path::new("/m")),
            Err(ModuleError::Load { .. })
        ));
        assert_eq!(r.0.borrow().len(), 1);
        assert_eq!(
            load_all(&r, &dir.path().join("none"), Path::new("/m")).unwrap(),
            0
        );
    }
}
