//! Fuzz target `ctl_reply`: ocserv control-socket replies as the native backend reads them.
//!
//! Input: one control byte, then the byte stream ocserv would send. The control byte picks the
//! decoder's body limit (the default 16 MiB, or a small one so oversize headers are hit often)
//! and seeds the chunk sizes the stream is pushed in, so frames split across reads, several
//! frames in one read, and headers cut in the middle are all exercised.
//!
//! Checks, besides "never panics": every frame taken out re-encodes to exactly the bytes it was
//! read from (nothing lost, duplicated or reordered); `buffered()` always equals the bytes not
//! yet returned; `finish()` succeeds exactly when nothing is left over. Every frame body is run
//! through every decode helper (`decode_sessions`, `decode_status`, `decode_bans`,
//! `decode_cookies`, `decode_bool`) whatever its reply code, since a confused or hostile peer can
//! put any body behind any code.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::ocserv::codec::{
    decode_bans, decode_bool, decode_cookies, decode_sessions, decode_status, encode_frame,
    FrameDecoder, HEADER_LEN,
};

/// Body limit used when the control byte's top bit is set: small, so `ReplyTooLarge` is reached
/// by short inputs as well.
const SMALL_MAX_BODY: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = if control & 0x80 != 0 {
        FrameDecoder::with_max_body(SMALL_MAX_BODY)
    } else {
        FrameDecoder::new()
    };

    // Chunk sizes from a tiny xorshift seeded by the control byte: deterministic per input, so
    // a crash reproduces from the saved file alone.
    let mut state = u32::from(control) | 0x100;
    let mut next_chunk = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        // 1..=2*HEADER_LEN+3 most of the time, occasionally a large read.
        if state % 8 == 0 {
            4096
        } else {
            1 + (state as usize % (2 * HEADER_LEN + 3))
        }
    };

    // `consumed` counts stream bytes returned as frames; `pushed` the bytes handed over.
    let mut consumed = 0usize;
    let mut pushed = 0usize;
    let mut failed = false;
    while pushed < stream.len() && !failed {
        let end = stream.len().min(pushed + next_chunk());
        decoder.push(&stream[pushed..end]);
        pushed = end;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let encoded = encode_frame(frame.code, &frame.body);
                    let expected = &stream[consumed..consumed + encoded.len()];
                    assert_eq!(
                        encoded, expected,
                        "frame does not match the bytes it came from"
                    );
                    consumed += encoded.len();
                    decode_all(&frame.body);
                    let _ = frame.reply();
                }
                Ok(None) => break,
                Err(_) => {
                    // A corrupt header poisons the stream; the backend drops the connection.
                    failed = true;
                    break;
                }
            }
        }
        assert_eq!(
            decoder.buffered(),
            pushed - consumed,
            "buffered() disagrees"
        );
    }
    if !failed {
        assert_eq!(decoder.finish().is_ok(), consumed == stream.len());
    }
});

/// Runs every reply decoder over `body`; each must return `Ok` or a `CodecError`.
fn decode_all(body: &[u8]) {
    let _ = decode_sessions(body);
    let _ = decode_status(body);
    let _ = decode_bans(body);
    let _ = decode_cookies(body);
    let _ = decode_bool(body);
}
