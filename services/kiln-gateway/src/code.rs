//! Code packages arriving through the API: checked by kiln-code (corrupt
//! archives, escaping paths, symlinks, zip bombs are refused), digested
//! and checksummed the way FC reports them.

use kiln_core::FcError;

use crate::catalog::NewCode;
use crate::checksum::code_checksum;
use crate::store::CodeBlob;

/// Inspect a zip; CPU-bound, run it on the blocking pool.
pub fn inspect(zip: Vec<u8>) -> Result<NewCode, FcError> {
    let info = kiln_code::inspect(&zip).map_err(FcError::from)?;
    Ok(NewCode {
        blob: CodeBlob {
            sha256: info.sha256,
            size: info.size,
            checksum: code_checksum(&zip),
        },
        zip,
    })
}
