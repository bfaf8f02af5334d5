//! An in-process HTTP/1.1 upstream that records what reaches it.
//!
//! It answers with [`Backend::echo`] by default, with any axum `Response`
//! ([`Backend::start_with`]), or with a [`Reply`] described as data: status,
//! headers, body chunks and HTTP/1.1 trailers ([`Backend::start_replying`]).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio_stream::wrappers::ReceiverStream;

/// One request as the backend received it (i.e. after Envoy).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/chat?x=1`.
    pub path: String,
    /// In arrival order; names lower-case; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `{"path": ..., "headers": {name: value}}`; repeated headers are joined with ", ".
    pub fn echo_json(&self) -> serde_json::Value {
        let mut headers = serde_json::Map::new();
        for (name, value) in &self.headers {
            let joined = match headers.get(name).and_then(|v| v.as_str()) {
                Some(prev) => format!("{prev}, {value}"),
                None => value.clone(),
            };
            headers.insert(name.clone(), joined.into());
        }
        serde_json::json!({ "path": self.path, "headers": headers })
    }
}

/// A backend's answer, described as data.
///
/// - Without trailers and with at most one chunk, the body is sent with a
///   `content-length`.
/// - With trailers or several chunks it is streamed: `transfer-encoding:
///   chunked`, one chunk per entry of `chunks` (with `chunk_delay` before each
///   chunk after the first), then the trailers. A `trailer` header naming
///   them is added, as HTTP/1.1 requires.
///
/// hyper (the server under axum) sends HTTP/1.1 trailers only when the request
/// carried `te: trailers`; the deployed Envoy config adds that header to every
/// request it forwards to the backend, so trailers work through Envoy
/// whatever the client sent. A client calling the backend directly must send
/// it itself.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<Vec<u8>>,
    pub trailers: Vec<(String, String)>,
    pub chunk_delay: Duration,
}

impl Reply {
    /// `200`, no headers, empty body.
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
            chunk_delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Appends one body chunk (call once for a plain body).
    pub fn chunk(mut self, data: impl Into<Vec<u8>>) -> Reply {
        self.chunks.push(data.into());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Reply {
        self.trailers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Pause before each chunk after the first (a slow stream).
    pub fn chunk_delay(mut self, delay: Duration) -> Reply {
        self.chunk_delay = delay;
        self
    }

    fn is_streamed(&self) -> bool {
        !self.trailers.is_empty() || self.chunks.len() > 1
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut builder = Response::builder().status(self.status);
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if !self.is_streamed() {
            let body = self.chunks.into_iter().next().unwrap_or_default();
            return builder.body(Body::from(body)).expect("valid reply");
        }
        if !self.trailers.is_empty() {
            let names: Vec<&str> = self.trailers.iter().map(|(n, _)| n.as_str()).collect();
            builder = builder.header(header::TRAILER, names.join(", "));
        }
        let mut trailers = HeaderMap::new();
        for (name, value) in &self.trailers {
            trailers.append(
                HeaderName::try_from(name.as_str()).expect("valid trailer name"),
                HeaderValue::try_from(value.as_str()).expect("valid trailer value"),
            );
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let (chunks, delay) = (self.chunks, self.chunk_delay);
        tokio::spawn(async move {
            for (i, chunk) in chunks.into_iter().enumerate() {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(Ok(Frame::data(chunk.into()))).await.is_err() {
                    return; // the client went away
                }
            }
            if !trailers.is_empty() {
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            }
        });
        builder
            .body(Body::new(StreamBody::new(ReceiverStream::new(rx))))
            .expect("valid reply")
    }
}

/// A response as an HTTP client received it, trailers included.
#[derive(Debug, Clone)]
pub struct ReceivedResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Empty when the response had none.
    pub trailers: HeaderMap,
}

impl ReceivedResponse {
    /// Reads all of `response`, trailers included (reqwest's `text()` and
    /// `bytes()` drop trailers).
    pub async fn read(response: reqwest::Response) -> ReceivedResponse {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let collected = axum::http::Response::<reqwest::Body>::from(response)
            .into_body()
            .collect()
            .await
            .expect("read response body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        ReceivedResponse {
            status,
            headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builds the backend's answer to a request.
pub type Responder = dyn Fn(&RecordedRequest) -> Response + Send + Sync;

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    responder: Arc<Responder>,
}

/// Serves on 127.0.0.1:<random> until dropped.
pub struct Backend {
    port: u16,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Answers every request with 200 and [`RecordedRequest::echo_json`].
    pub async fn start() -> Backend {
        Self::start_with(Backend::echo).await
    }

    /// Answers with `responder`, e.g. to add usage headers the way a real
    /// backend would. Requests are recorded either way.
    pub async fn start_with(
        responder: impl Fn(&RecordedRequest) -> Response + Send + Sync + 'static,
    ) -> Backend {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            requests: requests.clone(),
            responder: Arc::new(responder),
        };
        let app = Router::new().fallback(handle).with_state(shared);
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind backend");
        let port = listener.local_addr().expect("backend address").port();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("backend server");
        });
        Backend {
            port,
            requests,
            task,
        }
    }

    /// Answers with the [`Reply`] that `reply` builds for each request.
    pub async fn start_replying(
        reply: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        Self::start_with(move |request| reply(request).into_response()).await
    }

    /// The default responder: 200 with the echo JSON.
    pub fn echo(request: &RecordedRequest) -> Response {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(request.echo_json().to_string()))
            .expect("valid response")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL for calling the backend directly (bypassing Envoy).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Read the whole request before answering, as a real backend does.
    let _ = axum::body::to_bytes(body, 16 * 1024 * 1024).await;
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let response = (shared.responder)(&recorded);
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(recorded);
    response
}
