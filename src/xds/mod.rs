//! Local enforcement: keymeter as an xDS server for one Envoy filter.
//!
//! keymeter serves Envoy's Extension Config Discovery Service (ECDS, state of the
//! world) on its gRPC listener. The one resource it serves, named by
//! `xds.resource_name`, is a `TypedExtensionConfig` holding an
//! `envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth`: every key a Check would
//! allow, as `{key, client: app_id}`. Envoy's own `api_key_auth` filter then decides
//! each request in-process, and keymeter only meters (the access log, unchanged).
//!
//! Every change of the key store (billing update, keys file, snapshot) makes a new
//! version, at most one every `xds.push_interval_ms` (changes in between are
//! coalesced into the next one), which every connected Envoy receives (`service.rs`).
//!
//! A version is encoded once, by hand, straight from the key view (no prost struct per
//! key): a million keys are one ~50 MB buffer shared by every stream, which each stream
//! frames with its own nonce without copying it.
//!
//! The resource holds raw keys: it is never logged, and no metric carries anything of
//! it but counts and sizes.

pub mod service;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckConfig, XdsConfig};
use crate::keys::{KeyStore, KeyView};
use crate::metrics::Metrics;

pub use service::XdsServer;

/// The type of an ECDS resource.
pub const TYPED_EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The type inside it: Envoy's native API-key filter.
pub const API_KEY_AUTH_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth";

/// What the pushed filter config is made of, besides the keys.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    /// The ECDS resource name Envoy subscribes to.
    pub resource_name: String,
    /// `key_sources`: one header each, in order (`check.key_headers`, then
    /// `authorization` when `check.accept_bearer`).
    pub key_headers: Vec<String>,
    /// `forwarding.header`: the app id header (`check.app_id_header`).
    pub forward_header: String,
    /// `forwarding.hide_credentials` (`check.strip_key_header`).
    pub hide_credentials: bool,
    /// More allowed keys than this are refused: the last version stays.
    pub max_keys: usize,
}

impl FilterSettings {
    pub fn new(xds: &XdsConfig, check: &CheckConfig) -> FilterSettings {
        let mut key_headers = check.key_headers.clone();
        if check.accept_bearer {
            // api_key_auth strips a leading "Bearer " from any key header.
            key_headers.push("authorization".into());
        }
        FilterSettings {
            resource_name: xds.resource_name.clone(),
            key_headers,
            forward_header: check.app_id_header.clone(),
            hide_credentials: check.strip_key_header,
            max_keys: xds.max_keys,
        }
    }
}

/// One version of the resource, encoded, shared by every stream.
#[derive(Debug)]
pub struct Version {
    /// `version_info`: a digest of the allowed keys and their app ids, the same for the
    /// same content whatever the order (so every replica names a list alike).
    pub version: String,
    /// Allowed keys in it.
    pub keys: usize,
    /// The resource (`google.protobuf.Any` of the `TypedExtensionConfig`) in two
    /// pieces: everything before the credentials, and the credentials.
    head: Bytes,
    credentials: Bytes,
    /// When the key-store change that this version answers was noticed.
    pub changed_at: Instant,
}

impl Version {
    /// Bytes of the encoded resource.
    pub fn resource_len(&self) -> usize {
        self.head.len() + self.credentials.len()
    }

    /// The encoded `Any`, contiguous (tests and tools; streams use [`Version::frame`]).
    pub fn resource(&self) -> Vec<u8> {
        [&self.head[..], &self.credentials[..]].concat()
    }

    /// A `DiscoveryResponse` carrying this version with `nonce`, as pieces to write
    /// one after the other (the credentials are shared, not copied).
    pub fn frame(&self, nonce: &str) -> [Bytes; 3] {
        let mut before = Vec::with_capacity(self.head.len() + self.version.len() + 16);
        put_str(&mut before, 1, &self.version);
        put_key(&mut before, 2, LEN);
        put_varint(&mut before, self.resource_len() as u64);
        before.extend_from_slice(&self.head);
        let mut after = Vec::with_capacity(TYPED_EXTENSION_CONFIG_TYPE.len() + nonce.len() + 8);
        put_str(&mut after, 4, TYPED_EXTENSION_CONFIG_TYPE);
        put_str(&mut after, 5, nonce);
        [before.into(), self.credentials.clone(), after.into()]
    }
}

/// Why a version was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "{keys} allowed keys are more than xds.max_keys ({max}): not pushed; Envoy keeps enforcing the last version"
    )]
    TooManyKeys { keys: usize, max: usize },
}

const LEN: u8 = 2;
const VARINT: u8 = 0;

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_str(out: &mut Vec<u8>, field: u32, s: &str) {
    put_key(out, field, LEN);
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A length-delimited field header for `len` bytes that follow.
fn put_len_header(out: &mut Vec<u8>, field: u32, len: usize) {
    put_key(out, field, LEN);
    put_varint(out, len as u64);
}

/// Length of a string field with a one-byte tag.
fn str_field_len(s: &str) -> usize {
    1 + varint_len(s.len() as u64) + s.len()
}

/// The credentials of a version as they are added, with their count and digest.
struct Credentials {
    bytes: Vec<u8>,
    count: usize,
    digest: u64,
    max: usize,
    hasher: foldhash::fast::FixedState,
}

impl Credentials {
    fn new(max: usize, capacity: usize) -> Credentials {
        Credentials {
            bytes: Vec::with_capacity(capacity),
            count: 0,
            digest: 0,
            max,
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    fn push(&mut self, key: &str, app: &str) {
        self.count += 1;
        if self.count > self.max {
            return;
        }
        self.digest = self.digest.wrapping_add(self.hasher.hash_one((key, app)));
        // ApiKeyAuth.credentials (1): Credential { key (1), client (2) }
        let b = &mut self.bytes;
        put_len_header(b, 1, str_field_len(key) + str_field_len(app));
        put_str(b, 1, key);
        put_str(b, 2, app);
    }
}

/// Encodes `keys` (key, app id) as the resource. `changed_at` is carried along.
pub fn encode<'a>(
    settings: &FilterSettings,
    keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    changed_at: Instant,
) -> Result<Version, Refused> {
    let mut credentials = Credentials::new(settings.max_keys, 0);
    for (key, app) in keys {
        credentials.push(key, app);
    }
    finish(settings, credentials, changed_at)
}

/// The resource for every key `view` allows.
pub fn encode_view(
    settings: &FilterSettings,
    view: &KeyView,
    changed_at: Instant,
) -> Result<Version, Refused> {
    // About 40 bytes a key (a 32-character key and a short app id) saves regrowing.
    let capacity = view.len().min(settings.max_keys).saturating_mul(40);
    let mut credentials = Credentials::new(settings.max_keys, capacity);
    view.for_each_allowed(|k, a| credentials.push(k, a));
    finish(settings, credentials, changed_at)
}

fn finish(
    settings: &FilterSettings,
    credentials: Credentials,
    changed_at: Instant,
) -> Result<Version, Refused> {
    let Credentials {
        bytes: credentials,
        count,
        digest,
        hasher,
        ..
    } = credentials;
    if count > settings.max_keys {
        return Err(Refused::TooManyKeys {
            keys: count,
            max: settings.max_keys,
        });
    }
    // ApiKeyAuth: key_sources (2) and forwarding (3) first; fields may come in any order.
    let mut config = Vec::new();
    for header in &settings.key_headers {
        // KeySource { header (1) }
        put_len_header(&mut config, 2, str_field_len(header));
        put_str(&mut config, 1, header);
    }
    let mut forwarding = Vec::new();
    if !settings.forward_header.is_empty() {
        put_str(&mut forwarding, 1, &settings.forward_header);
    }
    if settings.hide_credentials {
        put_key(&mut forwarding, 2, VARINT);
        forwarding.push(1);
    }
    put_len_header(&mut config, 3, forwarding.len());
    config.extend_from_slice(&forwarding);
    let api_key_auth_len = config.len() + credentials.len();
    // Any { type_url (1), value (2): ApiKeyAuth }
    let filter_any_len = str_field_len(API_KEY_AUTH_TYPE)
        + 1
        + varint_len(api_key_auth_len as u64)
        + api_key_auth_len;
    // TypedExtensionConfig { name (1), typed_config (2): Any }
    let extension_len = str_field_len(&settings.resource_name)
        + 1
        + varint_len(filter_any_len as u64)
        + filter_any_len;
    // The resource: Any { type_url (1), value (2): TypedExtensionConfig }
    let mut head = Vec::with_capacity(256 + config.len());
    put_str(&mut head, 1, TYPED_EXTENSION_CONFIG_TYPE);
    put_len_header(&mut head, 2, extension_len);
    put_str(&mut head, 1, &settings.resource_name);
    put_len_header(&mut head, 2, filter_any_len);
    put_str(&mut head, 1, API_KEY_AUTH_TYPE);
    put_len_header(&mut head, 2, api_key_auth_len);
    head.put_slice(&config);
    let settings_digest = hasher.hash_one((
        &settings.resource_name,
        &settings.key_headers,
        &settings.forward_header,
        settings.hide_credentials,
    ));
    Ok(Version {
        version: format!("{:016x}", digest ^ settings_digest ^ count as u64),
        keys: count,
        head: head.into(),
        credentials: credentials.into(),
        changed_at,
    })
}

/// The newest version, for every stream; `None` until the first is built.
pub type Versions = watch::Receiver<Option<Arc<Version>>>;

/// Builds a version after every key-store change, at most one per `interval`, until
/// `shutdown`. Nothing is built before a key list is loaded: an Envoy that kept its
/// last version through a keymeter restart keeps it until keymeter knows keys again.
pub async fn run_pusher(
    keys: Arc<KeyStore>,
    settings: Arc<FilterSettings>,
    interval: Duration,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Option<Arc<Version>>>,
    shutdown: CancellationToken,
) {
    let mut changes = keys.changes();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = keys.wait_loaded() => {}
    }
    let mut changed_at = Instant::now();
    loop {
        changes.mark_unchanged();
        let started = Instant::now();
        let view = arc_swap::Guard::into_inner(keys.view());
        let s = settings.clone();
        // A million keys take a moment: off the runtime that answers Checks.
        let built = tokio::task::spawn_blocking(move || encode_view(&s, &view, changed_at)).await;
        let build_secs = started.elapsed().as_secs_f64();
        match built {
            Ok(Ok(version)) => {
                metrics.xds.build_duration.observe(build_secs);
                let same = publish
                    .borrow()
                    .as_ref()
                    .is_some_and(|v| v.version == version.version);
                if !same {
                    metrics.xds.keys.set(version.keys as i64);
                    metrics.xds.version_bytes.set(version.resource_len() as i64);
                    tracing::info!(
                        version = %version.version,
                        keys = version.keys,
                        bytes = version.resource_len(),
                        build_ms = build_secs * 1000.0,
                        "xDS: new api_key_auth version"
                    );
                    publish.send_replace(Some(Arc::new(version)));
                }
            }
            Ok(Err(refused)) => {
                metrics.xds.refused.inc();
                tracing::error!(error = %refused, "xDS: key list not pushed");
            }
            Err(e) => tracing::error!(error = %e, "xDS: building a version failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        changed_at = Instant::now();
        // Coalesce: whatever else changes until the interval is over joins this version.
        let next = started + interval;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::extensions::filters::http::api_key_auth::v3::ApiKeyAuth;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    pub(crate) fn settings() -> FilterSettings {
        FilterSettings {
            resource_name: "keymeter.api_key_auth".into(),
            key_headers: vec!["api-key".into(), "apikey".into()],
            forward_header: "x-billing-app-id".into(),
            hide_credentials: true,
            max_keys: 10,
        }
    }

    fn decode(v: &Version) -> (TypedExtensionConfig, ApiKeyAuth) {
        let any = Any::decode(&v.resource()[..]).unwrap();
        assert_eq!(any.type_url, TYPED_EXTENSION_CONFIG_TYPE);
        let ext = TypedExtensionConfig::decode(&any.value[..]).unwrap();
        let inner = ext.typed_config.clone().unwrap();
        assert_eq!(inner.type_url, API_KEY_AUTH_TYPE);
        (ext, ApiKeyAuth::decode(&inner.value[..]).unwrap())
    }

    #[test]
    fn the_hand_encoding_is_what_prost_decodes() {
        let long = "k".repeat(300);
        let keys = [("sk-1", "app-1"), ("sk-2", "app-2"), (long.as_str(), "a")];
        let v = encode(&settings(), keys, Instant::now()).unwrap();
        let (ext, auth) = decode(&v);
        assert_eq!(ext.name, "keymeter.api_key_auth");
        let creds: Vec<(&str, &str)> = auth
            .credentials
            .iter()
            .map(|c| (c.key.as_str(), c.client.as_str()))
            .collect();
        assert_eq!(creds, keys);
        let headers: Vec<&str> = auth.key_sources.iter().map(|s| s.header.as_str()).collect();
        assert_eq!(headers, ["api-key", "apikey"]);
        let fwd = auth.forwarding.unwrap();
        assert_eq!(
            (fwd.header.as_str(), fwd.hide_credentials),
            ("x-billing-app-id", true)
        );
        assert_eq!(v.keys, 3);

        let framed: Vec<u8> = v.frame("7").iter().flat_map(|b| b.to_vec()).collect();
        let response = DiscoveryResponse::decode(&framed[..]).unwrap();
        assert_eq!(response.version_info, v.version);
        assert_eq!(response.nonce, "7");
        assert_eq!(response.type_url, TYPED_EXTENSION_CONFIG_TYPE);
        assert_eq!(response.resources.len(), 1);
        assert_eq!(
            response.resources[0].value,
            Any::decode(&v.resource()[..]).unwrap().value
        );
    }

    #[test]
    fn an_empty_list_still_names_its_sources_and_the_version_follows_content_not_order() {
        let v = encode(&settings(), [], Instant::now()).unwrap();
        let (_, auth) = decode(&v);
        assert!(auth.credentials.is_empty());
        assert_eq!(auth.key_sources.len(), 2);
        let a = encode(&settings(), [("k1", "a"), ("k2", "b")], Instant::now()).unwrap();
        let b = encode(&settings(), [("k2", "b"), ("k1", "a")], Instant::now()).unwrap();
        let c = encode(&settings(), [("k2", "a"), ("k1", "b")], Instant::now()).unwrap();
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version, "app ids are part of the content");
        assert_ne!(a.version, v.version);
        let mut other = settings();
        other.hide_credentials = false;
        let d = encode(&other, [("k1", "a"), ("k2", "b")], Instant::now()).unwrap();
        assert_ne!(a.version, d.version, "settings are part of the content");
    }

    #[test]
    fn more_keys_than_the_limit_are_refused() {
        let keys: Vec<(String, String)> = (0..11)
            .map(|i| (format!("k{i}"), "a".to_string()))
            .collect();
        let err = encode(
            &settings(),
            keys.iter().map(|(k, a)| (k.as_str(), a.as_str())),
            Instant::now(),
        )
        .unwrap_err();
        assert_eq!(err, Refused::TooManyKeys { keys: 11, max: 10 });
        assert!(!err.to_string().contains("k1"));
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, 1 << 21, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
