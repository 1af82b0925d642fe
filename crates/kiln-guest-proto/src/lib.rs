//! The protocol between the host (kiln-agent's microVM driver) and
//! `kiln-guest`, PID 1 inside each microVM.
//!
//! One byte stream per guest (vsock in production; virtio-serial or TCP in
//! tests) carries versioned, length-prefixed [`frame`]s. The guest speaks
//! first (Ready); the host configures it once (Configure -> Configured),
//! then runs any number of concurrent calls (Invoke, Initialize, PreStop;
//! request and response bodies streamed in chunks) and exec sessions, each
//! on its own stream id. The guest sends the function's output as Log
//! frames. Malformed input is a typed [`FrameError`], never a panic.
//! Each stream is flow-controlled ([`flow`]), so one slow consumer never
//! stalls the other calls sharing the connection.
//!
//! Host side: [`GuestClient`] (plus [`vsock::connect_hybrid_vsock`] for
//! cloud-hypervisor). Guest side: [`server::serve`] with a [`GuestHandler`].
#![forbid(unsafe_code)]

pub mod client;
pub mod flow;
pub mod frame;
mod io;
pub mod message;
pub mod server;
pub mod vsock;

pub use client::{
    ExecEvent, ExecInput as ExecInputHandle, ExecOutput, ExecSession, GuestClient,
    GuestClientError, GuestResponse, PendingResponse, RequestBodySender, ResponseBody,
};
pub use flow::{INITIAL_WINDOW, MAX_WINDOW};
pub use frame::{
    Frame, FrameError, FrameType, HEADER_LEN, MAX_DATA_CHUNK, MAX_PAYLOAD, PROTOCOL_VERSION,
};
pub use message::*;
pub use server::{
    serve, CallRequest, ExecInput, ExecInputs, ExecWriter, GuestHandler, LogSender, RequestBody,
    ResponseWriter, ServeError,
};
