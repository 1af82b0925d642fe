//! The local OCI registry of `kiln::registry`, for the tests.

pub use kiln::registry::{layer, write_layout, Layer, Registry, PASSWORD, USER};

/// [`kiln::registry::layer_of_dir`], which must succeed in a test.
pub fn layer_of_dir(dir: &std::path::Path) -> Layer {
    kiln::registry::layer_of_dir(dir).unwrap()
}
