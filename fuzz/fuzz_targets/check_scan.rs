//! The Check scanner against prost on arbitrary bytes: it never panics, every input is
//! answered, and a key it reads is one prost decodes from the same bytes (or the
//! unreadable marker, for a header sent twice or not UTF-8).
#![no_main]

use envoy_types::ext_authz::v3::pb::CheckRequest;
use keymeter::authz::wire::{UNREADABLE, scan};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = scan(data) else {
        return;
    };
    let Ok(decoded) = CheckRequest::decode(data) else {
        return;
    };
    let http = decoded
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    for name in ["api-key", "apikey", "authorization"] {
        let Some(value) = view.header(name) else {
            continue;
        };
        if value == UNREADABLE {
            continue;
        }
        let from_map = http.and_then(|h| h.headers.get(name)).map(String::as_str);
        let from_raw = http
            .and_then(|h| h.header_map.as_ref())
            .and_then(|m| m.headers.iter().find(|h| h.key == name))
            .map(|h| {
                if h.raw_value.is_empty() {
                    h.value.as_bytes()
                } else {
                    h.raw_value.as_slice()
                }
            });
        assert!(
            from_map == Some(value) || from_raw == Some(value.as_bytes()),
            "{name}: scanner read {value:?}, prost {from_map:?} / {from_raw:?}"
        );
    }
});
