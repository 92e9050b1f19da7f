//! How the CLI prints answers: one line of JSON with `--json`, tables and
//! lines for people otherwise. Printing only: the answers come from
//! [`super::backend`] and the tools; nothing here reaches a service.

use crate::store::{HistoryEntry, Stats};
use crate::versions::{Listed, Shown};
use anyhow::Result;

/// With `--json`, `value` as one line of JSON; otherwise `human` prints it for people.
fn print_as<T: serde::Serialize>(value: T, json: bool, human: impl FnOnce(T) -> Result<()>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(&value)?);
        Ok(())
    } else {
        human(value)
    }
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// `wmvae buffer stats`.
pub fn stats(stats: &Stats, json: bool) -> Result<()> {
    print_as(stats, json, |stats| {
        println!(
            "frames      {} of {} ({} train, {} validation)",
            stats.frames, stats.capacity, stats.train_frames, stats.validation_frames
        );
        println!("episodes    {}", stats.episodes);
        println!("sources     {}", stats.sources);
        println!(
            "ingested    {} (duplicates {}, evicted {})",
            stats.frames_ingested, stats.duplicates, stats.evicted
        );
        println!("disk bytes  {}", stats.bytes_on_disk);
        for (reason, n) in &stats.rejected {
            println!("rejected    {reason}: {n}");
        }
        Ok(())
    })
}

/// `wmvae checkpoint list`.
pub fn list(rows: Vec<Listed>, json: bool) -> Result<()> {
    print_as(rows, json, |rows| {
        println!(
            "{:>8} {:>8} {:>10}  {:<25} {:>12}  marks",
            "version", "parent", "step", "created", "eval_loss"
        );
        for r in rows {
            let marks: Vec<&str> = [(r.active, "active"), (r.pinned, "pinned"), (r.best, "best")]
                .iter()
                .filter(|m| m.0)
                .map(|m| m.1)
                .collect();
            let loss = r.eval_loss.map_or_else(|| "-".into(), |l| format!("{l:.3}"));
            println!(
                "{:>8} {:>8} {:>10}  {:<25} {:>12}  {}",
                r.version,
                opt(r.parent),
                r.step,
                r.created_at,
                loss,
                marks.join(",")
            );
        }
        Ok(())
    })
}

/// `wmvae checkpoint show`.
pub fn shown(shown: Shown, json: bool) -> Result<()> {
    print_as(shown, json, |shown| {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        Ok(())
    })
}

/// `wmvae checkpoint history`.
pub fn history(entries: Vec<HistoryEntry>, json: bool) -> Result<()> {
    print_as(entries, json, |entries| {
        println!(
            "{:<25} {:>6} {:>6}  {:<34} {:<20} reason",
            "at", "from", "to", "why", "by"
        );
        for h in entries {
            println!(
                "{:<25} {:>6} {:>6}  {:<34} {:<20} {}",
                h.at,
                opt(h.from),
                h.to,
                h.why,
                h.by,
                h.reason.unwrap_or_default()
            );
        }
        Ok(())
    })
}

/// The previously active version, as the rollback line prints it.
pub fn version_or_dash(version: Option<u64>) -> String {
    opt(version)
}

/// A bench's figures: the JSON object, or `key=value` pairs on one line.
pub fn bench(result: serde_json::Value, json: bool) {
    if json {
        println!("{result}");
    } else {
        let fields: Vec<String> = result
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("{}", fields.join(" "));
    }
}
