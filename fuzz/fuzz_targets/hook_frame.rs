//! Fuzz target `hook_frame`: bytes arriving on the agent's hook socket, as the HookListener
//! reads them (`hook_proto::frame_len` on the first four bytes, `parse_request` on the payload)
//! and as the hook reads the agent's answers (`read_frame`, `parse_response`).
//!
//! Input: the raw byte stream a peer would send. Checks, besides "never panics": `frame_len`
//! accepts exactly the lengths 1..=MAX_FRAME; `read_frame` returns a payload exactly when the
//! header is valid and the stream holds that many bytes; every refusal's `cause()` is one of the
//! fixed metric labels; a request that parses re-encodes to a frame that parses back to the same
//! request (nothing accepted is lost or changed by the hook's own encoding).
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::hook_proto::{
    frame_len, parse_request, parse_response, read_frame, HEADER_LEN, MAX_FRAME,
};

const REQUEST_CAUSES: &[&str] = &[
    "frame_too_large",
    "not_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_reason",
    "empty_username",
    "invalid_field",
];

fuzz_target!(|data: &[u8]| {
    // The whole input as one payload (the listener parses whatever a valid header framed).
    check_payload(data);

    // The input as a stream: header, then payload.
    if data.len() >= HEADER_LEN {
        let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        let announced = u32::from_be_bytes(header) as usize;
        match frame_len(header) {
            Ok(len) => {
                assert!(len == announced && (1..=MAX_FRAME).contains(&len));
                let body = &data[HEADER_LEN..];
                let read = read_frame(&mut &data[..]);
                if body.len() >= len {
                    assert_eq!(read.unwrap(), &body[..len]);
                    check_payload(&body[..len]);
                } else {
                    assert_eq!(read.unwrap_err().cause(), "frame_truncated");
                }
            }
            Err(e) => {
                let expected = if announced == 0 {
                    "frame_empty"
                } else {
                    "frame_too_large"
                };
                assert_eq!(e.cause(), expected);
                assert_eq!(read_frame(&mut &data[..]).unwrap_err().cause(), expected);
            }
        }
    } else {
        assert_eq!(
            read_frame(&mut &data[..]).unwrap_err().cause(),
            "frame_truncated"
        );
    }
});

fn check_payload(payload: &[u8]) {
    match parse_request(payload) {
        Ok(request) => {
            let frame = request
                .to_frame()
                .expect("an accepted request fits in a frame");
            assert_eq!(parse_request(&frame[HEADER_LEN..]).unwrap(), request);
        }
        Err(e) => assert!(REQUEST_CAUSES.contains(&e.cause()), "{e}"),
    }
    if let Err(e) = parse_response(payload) {
        assert_eq!(e.cause(), "invalid_response");
    }
}
