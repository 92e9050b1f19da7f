//! NATS headers wmvae writes. Every header value passes through [`value`],
//! which cannot fail and cannot panic: async-nats panics (in a tokio worker,
//! silently stopping whatever ran there) on a CR or LF in a header value,
//! and a frame's identity, a dead letter's reason or a service error's text
//! all come from received bytes. The header names are constants.
//!
//! Only header values: which ids to build is `frames::identity`'s.

use crate::frames::identity;
use async_nats::{HeaderMap, HeaderValue};

/// JetStream's dedup header: a message with an id seen within the stream's
/// duplicate window is dropped (and still acked).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The reason a frame was dead-lettered (`<code>: <detail>`).
pub const REASON: &str = "Wmvae-Reason";
/// The subject a dead-lettered frame was published on.
pub const SUBJECT: &str = "Wmvae-Subject";

/// `text` as a header value: every control character (CR and LF among
/// them) written `%XX`, the rest as it is. Never fails.
pub fn value(text: &str) -> HeaderValue {
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            let mut utf8 = [0u8; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                clean.push_str(&format!("%{byte:02X}"));
            }
        } else {
            clean.push(c);
        }
    }
    // Without CR and LF the value always parses; the default is never taken.
    clean.parse().unwrap_or_default()
}

/// Headers carrying `id` as the message id, plus `extra` (name, value) pairs.
pub fn with_id(id: &str, extra: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, value(id));
    for &(name, text) in extra {
        headers.insert(name, value(text));
    }
    headers
}

/// The headers of a frame's latent (or of the frame itself, published by
/// wmvae): its message id from `identity::message_id`.
pub fn frame_id(source: &str, episode: &str, step: u64) -> HeaderMap {
    with_id(&identity::message_id(source, episode, step), &[])
}

/// The headers of a dead letter: the reason and the original subject, and
/// an id from the original's stream sequence so a redelivered bad frame
/// is dead-lettered once.
pub fn dead_letter(subject: &str, stream_sequence: u64, reason: &str) -> HeaderMap {
    with_id(
        &format!("frames-{stream_sequence}"),
        &[(REASON, reason), (SUBJECT, subject)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_hostile_text_never_panic() {
        assert_eq!(value("a\nb\rc").as_str(), "a%0Ab%0Dc");
        assert_eq!(value("plain: text/ok é").as_str(), "plain: text/ok é");
        assert_eq!(value("\u{85}").as_str(), "%C2%85");
        let headers = dead_letter("wm.frames.x", 7, "bad_episode: episode holds \"a\nb\"");
        assert_eq!(
            headers.get(REASON).map(|v| v.as_str()),
            Some("bad_episode: episode holds \"a%0Ab\"")
        );
        assert_eq!(
            frame_id("s/a", "1", 3).get(MSG_ID).map(|v| v.as_str()),
            Some("s%2Fa/1/3")
        );
    }
}
