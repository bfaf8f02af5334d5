//! A sample paid API behind Envoy + keymeter, used by `scripts/demo.sh`: an LLM, text
//! to speech, and streamed speech recognition.
//!
//! It has no billing code and no billing SDK. Envoy forwards only requests whose API
//! key keymeter allowed, and keymeter names the caller in `x-billing-app-id`. To be
//! paid, a handler says what its answer costs in response headers:
//!
//! | header | value |
//! | --- | --- |
//! | `x-billing-module` | what kind of service: `llm`, `tts`, `asr`, ... |
//! | `x-billing-model` | which model |
//! | `x-billing-usage` | a non-negative integer (tokens, characters, seconds, ...) |
//! | `x-billing-metadata` | optional JSON object, passed on to the billing system |
//! | `x-billing-records` | instead of the four above: a JSON array of `{"module", "model", "usage", "metadata"?}` when one answer bills several things |
//!
//! A streamed answer whose usage is known only at the end sends the same names as
//! HTTP trailers. Envoy removes the headers before the client sees them and streams
//! them, with the caller's key, to keymeter, which publishes the billing records.
//! Keep `x-billing-metadata` and `x-billing-records` well under 8 KiB: Envoy drops
//! longer values.
//!
//! Run: `cargo run --example sample_backend -- 127.0.0.1:8080`

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body::Frame;
use http_body_util::StreamBody;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/audio/speech", post(speech))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .route("/v1/chat/speech", post(chat_speech))
        .fallback(hello);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("sample backend listening on http://{addr}");
    axum::serve(listener, app).await
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    content: String,
}

#[derive(Deserialize)]
struct SpeechRequest {
    input: String,
}

/// Bills `llm`/`demo-llm`: prompt + completion tokens (here: words).
async fn chat_completions(headers: HeaderMap, Json(request): Json<ChatRequest>) -> Response {
    let (answer, prompt_tokens, completion_tokens) = complete(&request.messages);
    let billing = [
        ("x-billing-module", "llm".to_string()),
        ("x-billing-model", "demo-llm".to_string()),
        (
            "x-billing-usage",
            (prompt_tokens + completion_tokens).to_string(),
        ),
        (
            "x-billing-metadata",
            json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
                .to_string(),
        ),
    ];
    let body = json!({"app_id": app_id(&headers), "answer": answer});
    (billing, Json(body)).into_response()
}

/// Bills `tts`/`demo-tts`: characters of the input text.
async fn speech(headers: HeaderMap, Json(request): Json<SpeechRequest>) -> Response {
    let characters = request.input.chars().count();
    let billing = [
        ("x-billing-module", "tts".to_string()),
        ("x-billing-model", "demo-tts".to_string()),
        ("x-billing-usage", characters.to_string()),
    ];
    let app = [("x-app-id", app_id(&headers))];
    let audio = synthesize(&request.input);
    (billing, app, [(header::CONTENT_TYPE, "audio/wav")], audio).into_response()
}

/// Bills `asr`/`demo-asr`: seconds of audio, sent in trailers after the streamed transcript.
async fn transcriptions(headers: HeaderMap, audio: Bytes) -> Response {
    // Pretend the upload is 16 kB/s audio (8 kHz, 16-bit mono).
    let seconds = audio.len().div_ceil(16_000).max(1);
    let app_id = app_id(&headers);
    let (frames, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for second in 1..=seconds.min(3) {
            let line = format!("[{app_id}] transcript of second {second}\n");
            if frames.send(Ok(Frame::data(line.into()))).await.is_err() {
                return; // the client went away
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The usage is known now, at the end: send it as trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("x-billing-module", HeaderValue::from_static("asr"));
        trailers.insert("x-billing-model", HeaderValue::from_static("demo-asr"));
        trailers.insert("x-billing-usage", HeaderValue::from(seconds));
        let _ = frames.send(Ok(Frame::trailers(trailers))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        // HTTP/1.1 wants trailers announced. (Rust's hyper also sends them only when
        // the request said `te: trailers`; the deployed Envoy config always does.)
        .header(
            header::TRAILER,
            "x-billing-module, x-billing-model, x-billing-usage",
        )
        .body(Body::new(StreamBody::new(ReceiverStream::new(body))))
        .expect("valid response")
}

/// Bills two records: `llm`/`demo-llm` tokens and `tts`/`demo-tts` characters of the spoken answer.
async fn chat_speech(headers: HeaderMap, Json(request): Json<ChatRequest>) -> Response {
    let (answer, prompt_tokens, completion_tokens) = complete(&request.messages);
    let records = json!([
        {
            "module": "llm",
            "model": "demo-llm",
            "usage": prompt_tokens + completion_tokens,
            "metadata": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        },
        {"module": "tts", "model": "demo-tts", "usage": answer.chars().count()},
    ]);
    let billing = [("x-billing-records", records.to_string())];
    let body = json!({
        "app_id": app_id(&headers),
        "answer": answer,
        "audio_bytes": synthesize(&answer).len(),
    });
    (billing, Json(body)).into_response()
}

/// Free: anything else (also what `scripts/demo.sh` polls until the backend is up).
async fn hello(headers: HeaderMap) -> Json<serde_json::Value> {
    Json(json!({
        "answer": "hello from the sample backend",
        "app_id_from_keymeter": app_id(&headers),
    }))
}

/// The caller, as keymeter identified it from the API key.
fn app_id(headers: &HeaderMap) -> String {
    headers
        .get("x-billing-app-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string()
}

/// A stand-in model: returns the answer and the prompt and completion token counts.
fn complete(messages: &[Message]) -> (String, usize, usize) {
    let prompt_tokens: usize = messages.iter().map(|m| words(&m.content)).sum();
    let answer = format!("You wrote {prompt_tokens} words. This is a demo answer.");
    let completion_tokens = words(&answer);
    (answer, prompt_tokens, completion_tokens)
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// A stand-in speech synthesizer: silence, 100 bytes per character.
fn synthesize(text: &str) -> Vec<u8> {
    vec![0; text.chars().count() * 100]
}
