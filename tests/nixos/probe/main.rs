//! The function the NixOS VM tests deploy on the `custom` runtime: a static
//! binary (std only) implementing FC's custom runtime contract.
//!
//! `POST /invoke` with an empty body answers `probe ok`; with the body
//! `connect HOST:PORT` it tries a TCP connection (3 s) and answers
//! `connected HOST:PORT` or `blocked HOST:PORT: <error>`, which is how the
//! tests check an instance's egress. `POST /initialize` and `GET /pre-stop`
//! answer 200.
//!
//!     rustc -O -C target-feature=+crt-static tests/nixos/probe/main.rs -o server

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Duration;

fn main() {
    let port = std::env::var("FC_CUSTOM_LISTEN_PORT").unwrap_or_else(|_| "9000".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind runtime port");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(stream);
        });
    }
}

fn probe(target: &str) -> String {
    let addrs = match target.to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => return format!("blocked {target}: {e}"),
    };
    let Some(addr) = addrs.first() else {
        return format!("blocked {target}: no address");
    };
    match TcpStream::connect_timeout(addr, Duration::from_secs(3)) {
        Ok(_) => format!("connected {target}"),
        Err(e) => format!("blocked {target}: {e}"),
    }
}

fn answer(method: &str, path: &str, body: &[u8]) -> (&'static str, Vec<u8>) {
    let text = String::from_utf8_lossy(body);
    match (method, path) {
        ("POST", "/invoke") => match text.trim().strip_prefix("connect ") {
            Some(target) => ("200 OK", probe(target.trim()).into_bytes()),
            None => ("200 OK", b"probe ok".to_vec()),
        },
        ("POST", "/initialize") | ("GET", "/pre-stop") => ("200 OK", Vec::new()),
        _ => ("404 Not Found", b"not found".to_vec()),
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let (status, out) = answer(&method, &path, &body);
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            out.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        writer.write_all(head.as_bytes())?;
        writer.write_all(&out)?;
        if close {
            return Ok(());
        }
    }
}
