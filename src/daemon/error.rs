//! The daemon's errors that callers tell apart, one enum matched by
//! variant: a request the service refuses ([`Error::BadRequest`]), an
//! endpoint of a role this node lacks ([`Error::NotHere`]), a version the
//! encoder has not loaded ([`Error::NotLoaded`]), and the store's and the
//! bus's own, carried typed; anything else is [`Error::Other`]. The one
//! mapping of these to service codes is `control::service_error`.

use crate::bus;
use crate::store;

/// An error of the daemon's that a caller may act on by its kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request the service refuses: 400.
    #[error("{0}")]
    BadRequest(String),
    /// An endpoint of a role this node does not have (not served, so only
    /// a misrouted request meets it): 404.
    #[error("this node has no {0} role")]
    NotHere(&'static str),
    /// A request for a version the encoder has not loaded: its handle
    /// fetches the version's weights and asks again.
    #[error("v{0} is not loaded here")]
    NotLoaded(u64),
    /// The store's (an unknown version is a 404, one in use a 400).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The bus's.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// Any other failure: 500.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}
