pub mod bench;
pub mod dev;
pub mod functions;
