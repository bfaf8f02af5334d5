//! Inputs: key lists and snapshots (`keys`), the gRPC-framed Check body (`check-body`),
//! configs rendered from templates (`render`).

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::Timestamp;
use prost::Message;
use serde::Deserialize;

use crate::common::{Result, app_name, key_name, now_ms, socket};

/// `bench_tool keys`: `{"keys": [...], "saved_at": ...}` with N keys, all `ok`.
pub fn write_keys(n: usize, out: &Path) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    w.write_all(b"{\"keys\":[")?;
    for i in 0..n {
        if i > 0 {
            w.write_all(b",")?;
        }
        write!(
            w,
            "{{\"app_id\":\"{}\",\"api_key\":\"{}\",\"status\":\"ok\",\"reason\":\"\"}}",
            app_name(i),
            key_name(i)
        )?;
    }
    write!(w, "],\"saved_at\":{}}}", now_ms())?;
    w.flush()?;
    Ok(())
}

/// `bench_tool check-body`: writes the Check body for `key` to `out`.
pub fn write_check_body(key: &str, out: &Path) -> Result<()> {
    let body = check_body(key);
    std::fs::write(out, &body)?;
    eprintln!("{}: {} bytes", out.display(), body.len());
    Ok(())
}

/// What Envoy's ext_authz filter sends for a typical API call (encode_raw_headers off:
/// the `headers` map), framed for gRPC: a zero byte, a big-endian length, the message.
fn check_body(key: &str) -> Vec<u8> {
    let headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("api-key", key),
        ("content-length", "187"),
        ("content-type", "application/json"),
        ("user-agent", "python-httpx/0.27.0"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "5d3c8e1a-7b2f-4c9d-a1e0-3f6b9c2d8e41"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(socket("10.42.7.19", 51724)),
                ..Default::default()
            }),
            destination: Some(Peer {
                address: Some(socket("10.42.0.5", 10000)),
                ..Default::default()
            }),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: now_ms() / 1000,
                    nanos: 0,
                }),
                http: Some(HttpRequest {
                    id: "11400852117834829375".into(),
                    method: "POST".into(),
                    headers,
                    path: "/v1/chat/completions".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    size: 187,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    let message = request.encode_to_vec();
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// `bench_tool render`: see `Cmd::Render`.
pub fn render(
    input: &Path,
    out: &Path,
    replace: &[String],
    credentials: Option<&Path>,
) -> Result<()> {
    let mut text = std::fs::read_to_string(input)
        .map_err(|e| format!("cannot read {}: {e}", input.display()))?;
    for r in replace {
        let (from, to) = r
            .split_once('=')
            .ok_or_else(|| format!("--replace {r}: expected FROM=TO"))?;
        let n = text.matches(from).count();
        if n != 1 {
            return Err(format!(
                "{}: `{from}` occurs {n} times, expected once",
                input.display()
            )
            .into());
        }
        text = text.replacen(from, to, 1);
    }
    if let Some(keys) = credentials {
        #[derive(Deserialize)]
        struct Entry {
            app_id: String,
            api_key: String,
        }
        #[derive(Deserialize)]
        struct List {
            keys: Vec<Entry>,
        }
        let list: List = serde_json::from_slice(&std::fs::read(keys)?)?;
        // A JSON flow sequence is valid YAML wherever the placeholder stands.
        let creds: Vec<serde_json::Value> = list
            .keys
            .iter()
            .map(|e| serde_json::json!({"key": e.api_key, "client": e.app_id}))
            .collect();
        let n = text.matches("@CREDENTIALS@").count();
        if n != 1 {
            return Err(format!("{}: @CREDENTIALS@ occurs {n} times", input.display()).into());
        }
        text = text.replacen("@CREDENTIALS@", &serde_json::to_string(&creds)?, 1);
    }
    if let Some(left) = text.find('@').and_then(|i| {
        let rest = &text[i + 1..];
        let end = rest.find('@')?;
        let name = &rest[..end];
        (!name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .then(|| name.to_string())
    }) {
        return Err(format!("{}: placeholder @{left}@ left unreplaced", input.display()).into());
    }
    std::fs::write(out, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_body_is_grpc_framed() {
        let body = check_body("sk-bench-00000001");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(body[0], 0);
        assert_eq!(len + 5, body.len());
        let req = CheckRequest::decode(&body[5..]).unwrap();
        let http = req.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.headers["api-key"], "sk-bench-00000001");
    }
}
