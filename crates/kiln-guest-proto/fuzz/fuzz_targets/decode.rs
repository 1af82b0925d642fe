//! Arbitrary bytes as a stream of frames from a peer: the decoder must
//! return a typed error or a message, never panic, and every message it
//! accepts must re-encode to bytes that decode to the same message. The
//! streaming reader must agree with the slice decoder.
#![no_main]

use std::sync::OnceLock;

use kiln_guest_proto::{frame::read_frame, Frame, Message};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut decoded = Vec::new();
    let mut rest = data;
    while let Ok((frame, used)) = Frame::decode(rest) {
        assert!(used <= rest.len());
        rest = &rest[used..];
        decoded.push(frame.clone());
        if let Ok(message) = Message::from_frame(frame) {
            let again = message.encode().expect("a decoded message re-encodes");
            assert_eq!(
                Message::decode(&again).expect("re-encoded bytes decode").0,
                message
            );
        }
    }
    runtime().block_on(async {
        let mut reader = data;
        for expected in &decoded {
            let frame = read_frame(&mut reader)
                .await
                .expect("reader agrees with decoder")
                .unwrap();
            assert_eq!(&frame, expected);
        }
        let _ = read_frame(&mut reader).await;
    });
});
