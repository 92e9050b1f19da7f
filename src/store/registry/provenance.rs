//! Why the active version changed and who changed it: the [`Provenance`]
//! each change of the active version carries into the history.
//!
//! It only names; the registry stores it (as the history entry's `why`,
//! `by` and `reason`, pinned in JSON) and the daemon and the CLI make it.

use serde::{Deserialize, Serialize};

/// The name the daemon records as the actor of its own changes.
const DAEMON: &str = "wmvae";

/// Why the active version changed. Stored and shown as the strings each
/// variant names (the history's `why`, pinned in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Version 1: fresh weights on a new store.
    #[serde(rename = "initial")]
    Initial,
    /// A checkpoint of training.
    #[serde(rename = "trained")]
    Trained,
    /// An operator's rollback (live or offline).
    #[serde(rename = "rollback")]
    Rollback,
    /// The trainer's own rollback after a run of diverging steps.
    #[serde(rename = "automatic rollback on divergence")]
    AutoRollback,
    /// Weights trained elsewhere.
    #[serde(rename = "import")]
    Import,
    /// A new leader's store catching up with the active version (from the
    /// object store's full checkpoint).
    #[serde(rename = "takeover")]
    Takeover,
    /// The daemon's rollback past an active version found [`crate::store::Error::Damaged`] in
    /// the store, with no copy of it in the object store.
    #[serde(rename = "recovery from a damaged version")]
    Recovery,
}

impl Change {
    /// Whether the active version went back to an older one (announced as a `rollback`).
    pub fn is_rollback(self) -> bool {
        matches!(self, Change::Rollback | Change::AutoRollback | Change::Recovery)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Change::Initial => "initial",
            Change::Trained => "trained",
            Change::Rollback => "rollback",
            Change::AutoRollback => "automatic rollback on divergence",
            Change::Import => "import",
            Change::Takeover => "takeover",
            Change::Recovery => "recovery from a damaged version",
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Who changed the active version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The daemon itself: training, takeover, recovery, its own rollbacks.
    Daemon,
    /// An operator: a NATS user live, user@host offline.
    Operator(String),
}

impl Actor {
    /// As the history shows it: "wmvae" for the daemon.
    pub fn name(&self) -> &str {
        match self {
            Actor::Daemon => DAEMON,
            Actor::Operator(name) => name,
        }
    }
}

/// Why, by whom and with what reason the active version changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub why: Change,
    pub by: Actor,
    pub reason: Option<String>,
}

impl Provenance {
    /// A change the daemon makes on its own, without a reason given.
    pub fn daemon(why: Change) -> Provenance {
        Provenance {
            why,
            by: Actor::Daemon,
            reason: None,
        }
    }

    /// A change an operator asked for.
    pub fn operator(why: Change, by: impl Into<String>, reason: Option<String>) -> Provenance {
        Provenance {
            why,
            by: Actor::Operator(by.into()),
            reason,
        }
    }

    /// The same, with `reason` recorded.
    pub fn because(self, reason: impl Into<String>) -> Provenance {
        Provenance {
            reason: Some(reason.into()),
            ..self
        }
    }
}
