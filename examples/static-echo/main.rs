//! A function for the `custom` runtime (an empty root filesystem): a static
//! binary that implements FC's custom runtime contract with nothing but
//! Rust's standard library, so it builds with one rustc call:
//!
//!     rustc -O -C target-feature=+crt-static examples/static-echo/main.rs -o server
//!
//! `POST /invoke` answers the request body back (or a greeting when empty);
//! `POST /initialize` and `GET /pre-stop` answer 200. It listens on
//! 0.0.0.0:$FC_CUSTOM_LISTEN_PORT (default 9000), one thread per connection with
//! keep-alive, which is plenty for a benchmark with a few dozen connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

fn main() {
    // FC passes the port in FC_CUSTOM_LISTEN_PORT (FC 3.0) and
    // FC_SERVER_PORT (earlier runtimes).
    let port = std::env::var("FC_CUSTOM_LISTEN_PORT")
        .or_else(|_| std::env::var("FC_SERVER_PORT"))
        .unwrap_or_else(|_| "9000".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind runtime port");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(stream);
        });
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
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
        let mut request_id = String::new();
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
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap_or(0),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    "x-fc-request-id" => request_id = value.to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let (status, out): (&str, Vec<u8>) = match (method.as_str(), path.as_str()) {
            ("POST", "/invoke") if body.is_empty() => ("200 OK", b"hello from a static function".to_vec()),
            ("POST", "/invoke") => ("200 OK", body),
            ("POST", "/initialize") | ("GET", "/pre-stop") => ("200 OK", Vec::new()),
            _ => ("404 Not Found", b"not found".to_vec()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nx-echo-request-id: {request_id}\r\n{}\r\n",
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
