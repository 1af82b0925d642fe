//! `/v1/instances`: what runs where, for the CLI.

use http::{Response, StatusCode};
use kiln_internal_api::server::{json, Body};

use crate::service::Scheduler;

pub fn list(sched: &Scheduler) -> Response<Body> {
    json(StatusCode::OK, &sched.instances())
}
