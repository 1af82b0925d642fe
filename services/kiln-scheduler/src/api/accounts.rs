//! `/v1/accounts/{id}/limits` (admin): an account's quotas and throttles.

use http::{Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{AccountId, FcError, FunctionName};
use kiln_internal_api::server::{json, no_content, read_json, Body};
use kiln_internal_api::{AccountLimits, FunctionLimits};

use super::BODY_LIMIT;
use crate::service::Scheduler;

/// The limits in force: the account's own, or the defaults.
pub fn get_limits(sched: &Scheduler, account: &AccountId) -> Response<Body> {
    json(StatusCode::OK, &sched.account_limits(account))
}

/// Replace the account's limits with the body's (validated whole).
pub async fn put_limits(
    sched: &Scheduler,
    account: &AccountId,
    body: Incoming,
) -> Result<Response<Body>, FcError> {
    let limits: AccountLimits = read_json(body, BODY_LIMIT).await?;
    let stored = sched.set_account_limits(account, Some(limits)).await?;
    Ok(json(StatusCode::OK, &stored))
}

/// Back to the defaults.
pub async fn delete_limits(
    sched: &Scheduler,
    account: &AccountId,
) -> Result<Response<Body>, FcError> {
    sched.set_account_limits(account, None).await?;
    Ok(no_content())
}

/// Set (`Some(body)`, a `FunctionLimits`) or remove (`None`) one
/// function's limits; answers the account's limits now in force.
pub async fn put_function_limits(
    sched: &Scheduler,
    account: &AccountId,
    function: &FunctionName,
    body: Option<Incoming>,
) -> Result<Response<Body>, FcError> {
    let limits = match body {
        Some(b) => Some(read_json::<FunctionLimits>(b, BODY_LIMIT).await?),
        None => None,
    };
    let now = sched.set_function_limits(account, function, limits).await?;
    Ok(json(StatusCode::OK, &now))
}

/// The account's provision configurations with their status.
pub fn provisions(sched: &Scheduler, account: &AccountId) -> Response<Body> {
    json(StatusCode::OK, &sched.provision_details(account))
}
