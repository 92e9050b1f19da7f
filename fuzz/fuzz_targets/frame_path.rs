//! The path a received frame takes to every header the daemon builds from
//! it: arbitrary bytes as a source (the subject's last part) and a frame
//! message, decoded and checked; a valid frame's latent message and its
//! `Nats-Msg-Id` headers, a rejected one's dead-letter headers. A rejection
//! is fine; a panic (async-nats panics on a CR or LF in a header value,
//! which once stopped every later latent) is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wmvae::bus::headers;
use wmvae::bus::messages::LatentMessage;
use wmvae::frames::identity::message_id;
use wmvae::frames::preprocess::Policy;
use wmvae::frames::wire::decode_frame;

fuzz_target!(|data: &[u8]| {
    let Some((&source_len, rest)) = data.split_first() else {
        return;
    };
    let (source, payload) = rest.split_at((source_len as usize).min(rest.len()));
    let source = String::from_utf8_lossy(source);
    let payload = bytes::Bytes::copy_from_slice(payload);
    match decode_frame(&source, &payload, Policy::WorldModels) {
        Ok(frame) => {
            let latent = LatentMessage::of(&frame, 1, vec![0.0; 32], vec![0.0; 32]);
            let back: LatentMessage = rmp_serde::from_slice(&latent.to_msgpack()).expect("a latent reads back");
            assert_eq!((back.episode.as_str(), back.step), (frame.episode.as_str(), frame.step));
            let id = message_id(&frame.source, &frame.episode, frame.step);
            assert!(id.bytes().all(|b| (0x21..=0x7E).contains(&b)), "{id:?}");
            let _ = headers::frame_id(&frame.source, &latent.episode, latent.step);
        }
        Err(rejection) => {
            let _ = headers::dead_letter(&format!("wm.frames.{source}"), 1, &rejection.to_string());
        }
    }
    // Whatever the bytes, a header value made from them never panics.
    let _ = headers::value(&String::from_utf8_lossy(&payload));
});
