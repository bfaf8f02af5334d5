//! A sample paid API behind Envoy + keymeter, used by `scripts/demo.sh`.
//!
//! It has no billing code: Envoy only forwards requests that keymeter allowed, and
//! keymeter tells it who the caller is in the `x-billing-app-id` header.
//!
//! Run: `cargo run --example sample_backend -- 127.0.0.1:8080`

use axum::Json;
use axum::Router;
use axum::http::HeaderMap;
use axum::routing::any;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let app = Router::new().fallback(any(answer));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("sample backend listening on http://{addr}");
    axum::serve(listener, app).await
}

async fn answer(headers: HeaderMap) -> Json<serde_json::Value> {
    let app_id = headers
        .get("x-billing-app-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)");
    Json(serde_json::json!({
        "answer": "hello from the sample backend",
        "app_id_from_keymeter": app_id,
    }))
}
