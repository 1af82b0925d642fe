//! Everything a public request can fail with, and the one place an error
//! becomes FC's code and message.

use kiln_core::{FcError, FcErrorCode};
use kiln_internal_api::InternalClientError;

use crate::catalog::CatalogError;

/// Everything a public request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Fc(#[from] FcError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Internal(#[from] InternalClientError),
}

/// The one place an error becomes FC's code and message. Internal detail
/// is logged, not shown.
pub fn to_fc(err: &ApiError) -> FcError {
    match err {
        ApiError::Fc(e) => e.clone(),
        ApiError::Catalog(CatalogError::Exists(n)) => FcError::new(
            FcErrorCode::FunctionAlreadyExists,
            format!("function '{n}' already exists"),
        ),
        ApiError::Catalog(CatalogError::NotFound(n)) => super::request::not_found(n),
        ApiError::Catalog(CatalogError::Invalid(e)) => e.clone(),
        ApiError::Catalog(e) => {
            tracing::error!(error = %kiln_core::error_chain(e), "store failure");
            FcError::internal("the function store failed; retry the request")
        }
        ApiError::Internal(e) => {
            tracing::warn!(error = %e, "internal call failed");
            e.to_fc()
        }
    }
}
