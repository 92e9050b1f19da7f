//! The bus's errors that callers tell apart, one enum matched by variant:
//! a compare-and-set that lost ([`Error::Conflict`]), an object over its
//! reader's limit ([`Error::TooLarge`]), a control service's error answer
//! ([`Error::Service`]); anything else is [`Error::Other`].

use super::service::ServiceError;

/// An error of the bus that a caller may act on by its kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compare-and-set that lost: someone else wrote the key since.
    #[error("{0} was changed by another node")]
    Conflict(&'static str),
    /// An object larger than its reader accepts.
    #[error("{name} holds {size} bytes, over the limit of {max}")]
    TooLarge {
        /// The object's name in its bucket.
        name: String,
        /// Its size, as its metadata says or as its bytes arrived.
        size: u64,
        /// The most its reader accepts.
        max: u64,
    },
    /// The control service answered with an error (its code and message).
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// Any other failure (a connection, a server, a bucket missing).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}
