//! `bench_tool backend`: a minimal HTTP/1.1 backend behind Envoy in scenario 2. Every
//! request (keep-alive, pipelined, by content-length or chunked) gets 200 and the
//! x-billing-* headers.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Result, find};

const BACKEND_BODY: &str = "{\"id\":\"cmpl-bench\",\"choices\":[{\"text\":\"ok\"}]}";

fn backend_response() -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-billing-module: llm\r\nx-billing-model: gpt-4\r\nx-billing-usage: 150\r\n\r\n{}",
        BACKEND_BODY.len(),
        BACKEND_BODY
    ))
}

pub async fn backend(port: u16) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let response = backend_response();
    eprintln!("backend listening on 127.0.0.1:{port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let response = response.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, response).await {
                eprintln!("backend connection: {e}");
            }
        });
    }
}

/// How a request body is framed.
enum BodyFraming {
    Length(usize),
    Chunked,
}

/// Serves keep-alive (and pipelined) HTTP/1.1 requests: headers, then a body by
/// content-length or chunked encoding, answered with `response`.
async fn serve_connection(mut stream: tokio::net::TcpStream, response: Bytes) -> Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    let mut out = BytesMut::with_capacity(8192);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut close = false;
        while let Some((consumed, wants_close)) = complete_request(&buf)? {
            buf.advance(consumed);
            out.extend_from_slice(&response);
            if wants_close {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            return Ok(());
        }
        if buf.len() > 1 << 20 {
            return Err("request larger than 1 MiB".into());
        }
    }
}

/// The length of the first complete request in `buf` and whether it asked to close.
fn complete_request(buf: &[u8]) -> Result<Option<(usize, bool)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "non-UTF-8 request head")?;
    let mut framing = BodyFraming::Length(0);
    let mut close = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = BodyFraming::Length(value.parse().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = BodyFraming::Chunked;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let body_start = head_end + 4;
    let end = match framing {
        BodyFraming::Length(n) => (buf.len() >= body_start + n).then_some(body_start + n),
        BodyFraming::Chunked => chunked_end(&buf[body_start..]).map(|n| body_start + n),
    };
    Ok(end.map(|e| (e, close)))
}

/// The length of a complete chunked body (with an empty trailer section), if complete.
fn chunked_end(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let line_end = pos + find(&buf[pos..], b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[pos..line_end]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line.
            let end = find(&buf[pos..], b"\r\n\r\n")
                .map(|i| pos + i + 4)
                .or_else(|| buf[pos..].starts_with(b"\r\n").then_some(pos + 2))?;
            return Some(end);
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        pos += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_complete_requests() {
        let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET /";
        assert_eq!(complete_request(get).unwrap(), Some((27, false)));
        let post = b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nab";
        assert_eq!(complete_request(post).unwrap(), None);
        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            complete_request(chunked).unwrap(),
            Some((chunked.len(), false))
        );
    }
}
