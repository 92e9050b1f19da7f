//! The CLI's errors that its caller (`src/main.rs`) tells apart, one enum
//! matched by variant: the store's, carried typed whether the store or the
//! daemon answered (an unknown version is exit code 2); anything else is
//! [`Error::Other`].

use crate::store;

/// An error of a CLI command that its caller may act on by its kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store's, or the daemon's 404 for a version, as the store's
    /// [`store::Error::UnknownVersion`].
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Any other failure.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}
