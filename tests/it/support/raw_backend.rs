//! An HTTP/1.1 upstream that answers with exactly the bytes it is given, for backends
//! no HTTP library would be: header values that are not UTF-8 (Latin-1, as Python's
//! `http.server` sends them), NUL or CR bytes, headers of any size.

use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The raw response for a request path.
pub type Responder = dyn Fn(&str) -> Vec<u8> + Send + Sync;

pub struct RawBackend {
    port: u16,
    stop: CancellationToken,
}

impl RawBackend {
    /// Serves on a free loopback port until dropped. Connections are kept alive for
    /// further requests; requests are read as Envoy sends them (a body only with a
    /// `content-length`).
    pub async fn start(respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let respond: Arc<Responder> = Arc::new(respond);
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let socket = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(_) => continue,
                    },
                };
                let respond = respond.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = serve(socket, respond) => {}
                    }
                });
            }
        });
        RawBackend { port, stop }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(socket: tokio::net::TcpStream, respond: Arc<Responder>) {
    let (read, mut write) = socket.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        if write.write_all(&respond(&path)).await.is_err() {
            return;
        }
    }
}

/// Appends `name: value` lines, the values as given.
fn push_fields(out: &mut Vec<u8>, fields: &[(&str, &[u8])]) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
}

/// A `200` response with `headers` (raw bytes, written as given) and a small body.
pub fn with_headers(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    push_fields(&mut out, headers);
    out.extend_from_slice(b"\r\nok");
    out
}

/// A chunked `200` response with `trailers` (raw bytes) after its body.
pub fn with_trailers(trailers: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<&str> = trailers.iter().map(|(n, _)| *n).collect();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: {}\r\n\r\n2\r\nok\r\n0\r\n",
        names.join(", ")
    )
    .into_bytes();
    push_fields(&mut out, trailers);
    out.extend_from_slice(b"\r\n");
    out
}
