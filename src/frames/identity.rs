//! A frame's identity, (source, episode, step), and the one way it becomes
//! text others see: the `Nats-Msg-Id` of its frame and its latent
//! (PROTOCOL.md, "Identity").
//!
//! Which bytes an identity may hold is checked here ([`check_source`],
//! [`check_episode`], called by the wire decoder before anything else
//! reads them); [`message_id`] builds the id by an escaping that is
//! injective, so no two distinct triples share an id and the id holds only
//! printable ASCII; [`series_file_name`] names its episode's series file.
//! Pure functions: no NATS (the header values themselves are
//! `bus`'s), no store.

use std::fmt::Write as _;

/// Longest `episode`: it goes into every store key and latent id of its
/// frames; ids people write (UUIDs, paths) fit with room to spare.
pub const MAX_EPISODE_BYTES: usize = 256;
/// Longest source (the subject after `wm.frames.`): the same bound as an
/// episode, for the same keys and ids.
pub const MAX_SOURCE_BYTES: usize = 256;

/// Why an identity field was refused, in words for the dead letter.
pub type Refusal = String;

/// A control character (C0, DEL or C1): never in an identity. NUL would
/// let two (source, episode) pairs share a store key (they are joined by
/// NUL there); CR and LF would break a header.
fn control(text: &str) -> Option<char> {
    text.chars().find(|c| c.is_control())
}

/// The source, the subject's part after `wm.frames.`: 1..=[`MAX_SOURCE_BYTES`]
/// bytes, no control character, and no token that is a NATS wildcard
/// (`*`, `>`: its latents' subject `wm.latents.<source>` could not be
/// published to). NATS itself keeps whitespace out of subjects.
pub fn check_source(source: &str) -> Result<(), Refusal> {
    if source.is_empty() {
        return Err("subject has no source after the prefix".into());
    }
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!("source is {} bytes, at most {MAX_SOURCE_BYTES}", source.len()));
    }
    if let Some(c) = control(source) {
        return Err(format!("source holds the control character {:?}", c));
    }
    if source
        .split('.')
        .any(|token| token.is_empty() || token == "*" || token == ">")
    {
        return Err("source has an empty or wildcard subject token".into());
    }
    Ok(())
}

/// The episode: 1..=[`MAX_EPISODE_BYTES`] bytes of UTF-8 (MessagePack
/// strings are) without a control character. Any other character, `/`
/// and spaces included, is fine: ids escape them.
pub fn check_episode(episode: &str) -> Result<(), Refusal> {
    if episode.is_empty() || episode.len() > MAX_EPISODE_BYTES {
        return Err(format!(
            "episode is {} bytes, expected 1..={MAX_EPISODE_BYTES}",
            episode.len()
        ));
    }
    if let Some(c) = control(episode) {
        return Err(format!("episode holds the control character {:?}", c));
    }
    Ok(())
}

/// `text` with every byte outside printable ASCII (0x21..=0x7E), and `%`
/// and `/`, written `%XX` (upper-case hex): injective, and its output has
/// no `/` and no byte a header could choke on.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'%' | b'/' => {
                let _ = write!(out, "%{byte:02X}");
            }
            0x21..=0x7E => out.push(byte as char),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// The `Nats-Msg-Id` of a frame and of its latent:
/// `<escape(source)>/<escape(episode)>/<step>`. Distinct triples get
/// distinct ids (each part is escaped injectively and holds no `/`); an
/// identity of plain printable ASCII without `%` or `/` reads as itself.
pub fn message_id(source: &str, episode: &str, step: u64) -> String {
    format!("{}/{}/{step}", escape(source), escape(episode))
}

/// Characters of a series file name taken from its source and episode:
/// enough to read which episode it is, far under any file system's 255.
const FILE_NAME_READABLE_CHARS: usize = 64;
/// Hex digits of the hash in a series file name: 80 bits, so two episodes
/// whose readable parts agree still get distinct names.
const FILE_NAME_HASH_HEX: usize = 20;

/// The one name of (source, episode)'s file in a series directory:
/// `<readable>-<hash>.npz`. The readable part is `source_episode` with
/// every character but ASCII letters, digits, `-` and `_` made `_`, cut to
/// [`FILE_NAME_READABLE_CHARS`]; the hash (sha256 of the exact pair,
/// length-prefixed) tells apart pairs that read the same. Whatever the
/// names hold, the result has no path separator, no `..`, no control
/// character and no leading dot.
pub fn series_file_name(source: &str, episode: &str) -> String {
    use sha2::{Digest, Sha256};
    let readable: String = format!("{source}_{episode}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(FILE_NAME_READABLE_CHARS)
        .collect();
    let mut hash = Sha256::new();
    hash.update((source.len() as u64).to_le_bytes());
    hash.update(source.as_bytes());
    hash.update(episode.as_bytes());
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{readable}-{}.npz", &hex[..FILE_NAME_HASH_HEX])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_identities_read_as_themselves() {
        assert_eq!(message_id("car-1", "ep-7", 42), "car-1/ep-7/42");
        assert_eq!(message_id("s/a", "1", 0), "s%2Fa/1/0");
        assert_eq!(message_id("s", "a/1", 0), "s/a%2F1/0");
        assert_eq!(message_id("s", "a b%é", 3), "s/a%20b%25%C3%A9/3");
    }

    #[test]
    fn control_characters_and_wildcards_are_refused() {
        for bad in ["a\nb", "a\rb", "\0", "x\u{7f}", "x\u{85}"] {
            assert!(check_episode(bad).is_err(), "{bad:?}");
            assert!(check_source(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "*", "a.>", "a..b", "a."] {
            assert!(check_source(bad).is_err(), "{bad:?}");
        }
        assert!(check_episode("").is_err());
        assert!(check_episode(&"e".repeat(MAX_EPISODE_BYTES + 1)).is_err());
        assert!(check_episode("runs/2026-12-07 #3 é").is_ok());
        assert!(check_source("worker-1.gpu").is_ok());
    }

    #[test]
    fn series_file_names_are_safe_and_readable() {
        let name = series_file_name("car-1", "ep 7");
        assert!(name.starts_with("car-1_ep_7-") && name.ends_with(".npz"), "{name}");
        for (source, episode) in [
            ("s", "../x"),
            ("..", ".."),
            ("a/b", "c\\d"),
            ("s", "\u{0}\n\u{85}é"),
            ("", ""),
        ] {
            let name = series_file_name(source, episode);
            assert!(
                !name.contains(['/', '\\']) && !name.starts_with('.') && !name.contains(".."),
                "{name}"
            );
            assert!(name.chars().all(|c| c.is_ascii_graphic()), "{name}");
        }
        let long = "e".repeat(MAX_EPISODE_BYTES);
        assert!(series_file_name(&long, &long).len() < 100);
    }

    proptest! {
        /// No two distinct (source, episode, step) share an id, and an id
        /// is printable ASCII.
        #[test]
        fn ids_are_injective_and_printable(a in (".{0,6}", ".{0,6}", 0u64..3), b in (".{0,6}", ".{0,6}", 0u64..3)) {
            let (ia, ib) = (message_id(&a.0, &a.1, a.2), message_id(&b.0, &b.1, b.2));
            prop_assert_eq!(ia == ib, a == b);
            prop_assert!(ia.bytes().all(|c| (0x21..=0x7E).contains(&c)));
        }

        /// Slashes and percent signs are where collisions would hide.
        #[test]
        fn slashes_and_percents_do_not_collide(a in ("[s/%a]{0,4}", "[s/%a1]{0,4}"), b in ("[s/%a]{0,4}", "[s/%a1]{0,4}")) {
            prop_assert_eq!(message_id(&a.0, &a.1, 1) == message_id(&b.0, &b.1, 1), a == b);
        }

        /// Pairs whose readable parts agree (`_` stands for `/`, `.`, `_`) still get distinct file names.
        #[test]
        fn series_file_names_are_injective(a in ("[s/_.a]{0,4}", "[s/_.a]{0,4}"), b in ("[s/_.a]{0,4}", "[s/_.a]{0,4}")) {
            prop_assert_eq!(series_file_name(&a.0, &a.1) == series_file_name(&b.0, &b.1), a == b);
        }
    }
}
