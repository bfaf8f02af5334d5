//! An in-process HTTP/1.1 upstream that records what reaches it.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;

/// One request as the backend received it (i.e. after Envoy).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/chat?x=1`.
    pub path: String,
    /// In arrival order; names lower-case; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
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
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
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
        body,
    };
    let response = (shared.responder)(&recorded);
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(recorded);
    response
}
