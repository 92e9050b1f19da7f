//! Progress for long CLI work (encode, export, benches): a bar redrawn in
//! place on a terminal, plain lines at every tenth otherwise (logs, CI).
//! Writes to stderr only; stdout stays clean for JSON.

use std::io::{IsTerminal, Write};

/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    terminal: bool,
    /// Last tenth reported as a plain line.
    reported_tenth: u64,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        Progress { label: label.into(), total: total.max(1), done: 0, terminal: std::io::stderr().is_terminal(), reported_tenth: 0 }
    }

    /// Records `n` more units done.
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        let mut err = std::io::stderr();
        if self.terminal {
            let filled = (self.done as usize * BAR_WIDTH) / self.total as usize;
            let _ = write!(err, "\r{} [{}{}] {}/{}", self.label, "#".repeat(filled), " ".repeat(BAR_WIDTH - filled), self.done, self.total);
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let tenth = self.done * 10 / self.total;
            if tenth > self.reported_tenth {
                self.reported_tenth = tenth;
                let _ = writeln!(err, "{}: {}/{} ({}%)", self.label, self.done, self.total, tenth * 10);
            }
        }
    }
}
