//! Randomised decoding in the normal test suite (seeded, so failures
//! reproduce): the decoder never panics on random or mutated input, and
//! every message round-trips through encode/decode. The cargo-fuzz target
//! in `fuzz/` runs the same checks coverage-guided.

use std::collections::BTreeMap;

use bytes::Bytes;
use kiln_guest_proto::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_string(rng: &mut StdRng) -> String {
    let len = rng.gen_range(0..12);
    (0..len)
        .map(|_| match rng.gen_range(0..4) {
            0 => char::from(rng.gen_range(b'a'..=b'z')),
            1 => '"',
            2 => 'é',
            _ => char::from_u32(rng.gen_range(0x20..0x2FFF)).unwrap_or('?'),
        })
        .collect()
}

fn rand_bytes(rng: &mut StdRng) -> Bytes {
    let len = rng.gen_range(0..64);
    Bytes::from((0..len).map(|_| rng.gen()).collect::<Vec<u8>>())
}

fn rand_id(rng: &mut StdRng) -> u32 {
    rng.gen_range(1..=u32::MAX)
}

fn rand_message(rng: &mut StdRng) -> Message {
    let headers: Vec<(String, String)> = (0..rng.gen_range(0..4))
        .map(|_| (rand_string(rng), rand_string(rng)))
        .collect();
    match rng.gen_range(0..22) {
        0 => Message::Ready(Ready {
            protocol_version: rng.gen(),
            guest_version: rand_string(rng),
            configured: rng.gen(),
        }),
        1 => Message::Configure(Box::new(GuestConfig {
            instance_id: rand_string(rng),
            hostname: rng.gen::<bool>().then(|| rand_string(rng)),
            network: rng.gen::<bool>().then(|| NetworkConfig {
                interface: rand_string(rng),
                address: rng.gen::<u32>().into(),
                prefix_len: rng.gen(),
                gateway: rng.gen::<bool>().then(|| rng.gen::<u32>().into()),
                mtu: rng.gen(),
                dns: vec![std::net::IpAddr::V4(rng.gen::<u32>().into())],
            }),
            process: ProcessConfig {
                command: vec![rand_string(rng)],
                args: vec![rand_string(rng)],
                env: BTreeMap::from([(rand_string(rng), rand_string(rng))]),
                port: rng.gen(),
                working_dir: rand_string(rng),
                start_timeout_ms: rng.gen(),
            },
            disks: DiskConfig {
                runtime: Some(Disk {
                    device: rand_string(rng),
                    fs: FsType::Squashfs,
                }),
                code: None,
                scratch: None,
                layers: vec![Disk {
                    device: rand_string(rng),
                    fs: FsType::Ext4,
                }],
            },
        })),
        2 => Message::Configured(Configured {
            start_ms: rng.gen(),
        }),
        3 => Message::Call {
            call: rand_id(rng),
            kind: [CallKind::Invoke, CallKind::Initialize, CallKind::PreStop][rng.gen_range(0..3)],
            head: CallHead {
                headers,
                timeout_ms: rng.gen(),
            },
        },
        4 => Message::RequestBody {
            call: rand_id(rng),
            data: rand_bytes(rng),
        },
        5 => Message::RequestEnd { call: rand_id(rng) },
        6 => Message::ResponseHead {
            call: rand_id(rng),
            head: ResponseHead {
                status: rng.gen(),
                headers,
            },
        },
        7 => Message::ResponseBody {
            call: rand_id(rng),
            data: rand_bytes(rng),
        },
        8 => Message::ResponseEnd { call: rand_id(rng) },
        9 => Message::Cancel { call: rand_id(rng) },
        10 => Message::ExecStart {
            session: rand_id(rng),
            request: ExecRequest {
                command: vec![rand_string(rng)],
                env: BTreeMap::new(),
                tty: rng.gen(),
                size: rng.gen::<bool>().then(|| TtySize {
                    rows: rng.gen(),
                    cols: rng.gen(),
                }),
                working_dir: rng.gen::<bool>().then(|| rand_string(rng)),
            },
        },
        11 => Message::ExecStdin {
            session: rand_id(rng),
            data: rand_bytes(rng),
        },
        12 => Message::ExecStdinClose {
            session: rand_id(rng),
        },
        13 => Message::ExecStdout {
            session: rand_id(rng),
            data: rand_bytes(rng),
        },
        14 => Message::ExecStderr {
            session: rand_id(rng),
            data: rand_bytes(rng),
        },
        15 => Message::ExecResize {
            session: rand_id(rng),
            size: TtySize {
                rows: rng.gen(),
                cols: rng.gen(),
            },
        },
        16 => Message::ExecExit {
            session: rand_id(rng),
            status: ExitStatus {
                code: rng.gen(),
                signal: rng.gen(),
            },
        },
        17 => Message::Log(LogLine {
            stream: LogStream::Stderr,
            line: rand_string(rng),
        }),
        18 => Message::Error {
            stream: rng.gen(),
            error: ErrorBody::new(ErrorCode::Timeout, rand_string(rng)),
        },
        19 => Message::Ping(rand_bytes(rng)),
        20 => Message::WindowUpdate {
            stream: rand_id(rng),
            increment: rng.gen_range(1..=MAX_WINDOW),
        },
        _ => Message::Pong(rand_bytes(rng)),
    }
}

#[test]
fn messages_round_trip() {
    let mut rng = StdRng::seed_from_u64(0x6b69_6c6e);
    for _ in 0..20_000 {
        let message = rand_message(&mut rng);
        let bytes = message.encode().unwrap();
        let (decoded, used) = Message::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, message);
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..50_000 {
        let len = rng.gen_range(0..80);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // Half the time give it a valid prefix so decoding gets past the header.
        if rng.gen::<bool>() && bytes.len() >= HEADER_LEN {
            bytes[..3].copy_from_slice(&[b'K', b'G', PROTOCOL_VERSION]);
            bytes[3] = FrameType::ALL[rng.gen_range(0..FrameType::ALL.len())] as u8;
            let plen = (bytes.len() - HEADER_LEN) as u32;
            bytes[8..12].copy_from_slice(&rng.gen_range(0..=plen + 2).to_be_bytes());
        }
        let _ = Message::decode(&bytes);
    }
}

#[test]
fn mutated_frames_never_panic_and_errors_are_typed() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut errors = std::collections::HashSet::new();
    for _ in 0..50_000 {
        let mut bytes = rand_message(&mut rng).encode().unwrap().to_vec();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..4) {
                0 if !bytes.is_empty() => {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.gen();
                }
                1 if !bytes.is_empty() => {
                    let cut = rng.gen_range(0..bytes.len());
                    bytes.truncate(cut);
                }
                2 => {
                    let i = rng.gen_range(0..=bytes.len());
                    bytes.insert(i, rng.gen());
                }
                _ if bytes.len() > HEADER_LEN => {
                    let i = rng.gen_range(HEADER_LEN..bytes.len());
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        match Message::decode(&bytes) {
            Ok((m, used)) => {
                assert!(used <= bytes.len());
                // Whatever decodes re-encodes to a frame that decodes the same.
                let again = m.encode().unwrap();
                assert_eq!(Message::decode(&again).unwrap().0, m);
            }
            Err(e) => {
                errors.insert(std::mem::discriminant(&e));
            }
        }
    }
    // The mutations reach most error kinds.
    assert!(errors.len() >= 6, "only {} error kinds seen", errors.len());
}
