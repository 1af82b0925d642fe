pub mod bench;
pub mod configs;
pub mod dev;
pub mod functions;
pub mod nodes;
pub mod observe;
pub mod runtimes;
pub mod tasks;
