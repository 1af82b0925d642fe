//! Domain types shared by every Kiln service.
//!
//! Nothing here performs I/O: the types are what the gateway, the scheduler
//! and the agent agree on, so they live in one place and are checked once.
#![forbid(unsafe_code)]

pub mod clock;
pub mod error;
pub mod error_chain;
pub mod ids;
pub mod limits;
pub mod spec;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{FcError, FcErrorCode, FcErrorKind};
pub use error_chain::error_chain;
pub use ids::{AccountId, FunctionName, IdError, InstanceId, LeaseId, NodeId, RequestId};
pub use spec::{
    HandlerLanguage, ImageSpec, InstanceSpec, LifecycleHook, NetworkSpec, RuntimeName, SandboxKind,
    VpcAttachment, NODEJS_BOOTSTRAP, PYTHON_BOOTSTRAP, REGISTRY_PASSWORD_KEY,
};
