//! Progress for long CLI work (encode, export, benches): an indicatif bar
//! redrawn in place on a terminal, plain lines at every tenth otherwise
//! (logs, CI). Writes to stderr only; stdout stays clean for JSON.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// How the progress shows.
enum Shown {
    /// A bar on the terminal.
    Bar(ProgressBar),
    /// A line per tenth done, and the last tenth reported.
    Lines { reported_tenth: u64 },
}

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    shown: Shown,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        let (label, total) = (label.into(), total.max(1));
        let shown = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("#> "));
            bar.set_message(label.clone());
            Shown::Bar(bar)
        } else {
            Shown::Lines { reported_tenth: 0 }
        };
        Progress {
            label,
            total,
            done: 0,
            shown,
        }
    }

    /// Records `n` more units done.
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        match &mut self.shown {
            Shown::Bar(bar) => {
                bar.set_position(self.done);
                if self.done == self.total {
                    bar.finish();
                }
            }
            Shown::Lines { reported_tenth } => {
                let tenth = self.done * 10 / self.total;
                if tenth > *reported_tenth {
                    *reported_tenth = tenth;
                    eprintln!("{}: {}/{} ({}%)", self.label, self.done, self.total, tenth * 10);
                }
            }
        }
    }
}
