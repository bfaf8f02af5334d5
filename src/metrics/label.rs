//! Label values from a fixed set: an enum whose variants are the values, so a metric
//! cannot be given a string nobody pre-created, and `ALL` lists every series to create
//! at 0 (dashboards then show 0 instead of "no data").

/// Declares a `Copy` enum with `ALL` (every variant, in order) and `as_str` (the label
/// value). Attributes and doc comments on the enum and its variants are kept.
///
/// ```text
/// label_enum! {
///     /// Why a record was lost.
///     pub enum Lost {
///         /// The outbox budget is used up.
///         OutboxFull => "outbox_full",
///     }
/// }
/// ```
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label ),+
                }
            }
        }
    };
}

pub(crate) use label_enum;

// Every fixed label set of keymeter's metrics, here so that `metrics` depends on no
// module above it. The modules that report them re-export theirs
// (`accesslog::NotBilled`, `usage::Rejection`, ...) and add their own methods.

label_enum! {
    /// Why the broker refused a publish: an MQTT 5 PUBACK reason code of 0x80 or above,
    /// as a metric label.
    pub enum Refusal {
        UnspecifiedError => "unspecified_error",
        ImplementationSpecificError => "implementation_specific_error",
        NotAuthorized => "not_authorized",
        TopicNameInvalid => "topic_name_invalid",
        PacketIdentifierInUse => "packet_identifier_in_use",
        QuotaExceeded => "quota_exceeded",
        PayloadFormatInvalid => "payload_format_invalid",
    }
}

label_enum! {
    /// Why declared metadata was unusable. `as_str` is the metric label.
    pub enum MetadataProblem {
        NotUtf8 => "not_utf8",
        InvalidJson => "invalid_json",
        NotObject => "not_object",
        TooLarge => "too_large",
    }
}

label_enum! {
    /// Why a declaration was rejected. `as_str` is the metric label.
    pub enum Rejection {
        UsageMissing => "usage_missing",
        UsageNotANumber => "usage_not_a_number",
        UsageNegative => "usage_negative",
        UsageOverflow => "usage_overflow",
        ModuleMissing => "module_missing",
        ModuleInvalid => "module_invalid",
        ModelMissing => "model_missing",
        ModelInvalid => "model_invalid",
        MetadataInvalidJson => "metadata_invalid_json",
        MetadataNotObject => "metadata_not_object",
        MetadataTooLarge => "metadata_too_large",
        RecordsInvalid => "records_invalid",
        TooManyRecords => "too_many_records",
        NotUtf8 => "not_utf8",
    }
}

label_enum! {
    /// Why an HTTP entry bills nothing. `as_str` is the metric label.
    pub enum NotBilled {
        /// ext_authz (or, in local mode, Envoy's api_key_auth) denied the request, or
        /// ext_authz failed closed.
        Denied => "denied",
        /// No key in the request and no Check metadata.
        NoKey => "no_key",
        /// The key is not (or no longer) in the key store.
        UnknownKey => "unknown_key",
        /// The backend declared no usage and no route default matched.
        NoUsage => "no_usage",
        /// The Check's metadata names another app than the key store has for the key:
        /// not something Envoy's Check allowed (a forged or corrupted entry).
        AppMismatch => "app_mismatch",
    }
}

label_enum! {
    /// Why an access-log entry was skipped before it could be judged. `as_str` is the
    /// metric label.
    pub enum Skipped {
        /// The entry's bytes are not a valid `HTTPAccessLogEntry`.
        Malformed => "malformed",
    }
}

label_enum! {
    /// Why one entry of a key update was skipped; `as_str` is the metric label
    /// (`keymeter_key_entries_skipped_total{reason}`).
    pub enum SkipReason {
        /// The entry is not a JSON object (the SDK loses the rest of its message there).
        NotAnObject => "not_an_object",
        /// `api_key` is missing, `null`, not a string or empty.
        NoApiKey => "no_api_key",
        /// `api_key` is longer than [`MAX_FIELD_BYTES`].
        ApiKeyTooLong => "api_key_too_long",
        /// `api_key` holds a control character or starts or ends with a space: no request
        /// can present it (see [`check_api_key`]).
        ApiKeyNotHeaderSafe => "api_key_not_header_safe",
        /// An `ok` entry whose `app_id` is missing, `null`, not a string or empty.
        NoAppId => "no_app_id",
        /// An `ok` entry whose `app_id` is longer than [`MAX_FIELD_BYTES`].
        AppIdTooLong => "app_id_too_long",
        /// An `ok` entry whose `app_id` holds a control character: it could not be sent to
        /// the backend in the `x-billing-app-id` header.
        AppIdNotHeaderSafe => "app_id_not_header_safe",
    }
}

label_enum! {
    /// The services an allow-list guards. `as_str` is the metric label.
    pub enum Guarded {
        Check => "check",
        AccessLog => "access_log",
        Report => "report",
        /// Envoy's ECDS subscription to the key list (local mode): it carries raw keys.
        KeyList => "key_list",
    }
}

label_enum! {
    /// Where a key list came from; shown in logs and `/readyz`, and the `source` label
    /// of `keymeter_key_source_last_update_timestamp_seconds`.
    pub enum Source {
        Snapshot => "snapshot",
        File => "file",
        Billing => "billing",
    }
}

label_enum! {
    /// Why a key list (billing message, snapshot or keys file) is rejected whole: the
    /// `reason` label of `keymeter_key_updates_rejected_total`. `InvalidEntry` is for
    /// files only: a message skips its bad entries one by one
    /// (`keymeter_key_entries_skipped_total`).
    pub enum ListRejection {
        TooLarge => "too_large",
        BadJson => "bad_json",
        WrongShape => "wrong_shape",
        InvalidEntry => "invalid_entry",
        FileUnreadable => "file_unreadable",
        SnapshotUnreadable => "snapshot_unreadable",
    }
}

label_enum! {
    /// Why the recorder (not the header contract) could not take records: unlike
    /// contract reasons these are records a backend declared correctly, and they are
    /// lost. The `reason` label of `keymeter_usage_records_rejected_total`, beside the
    /// contract's reasons.
    pub enum Lost {
        /// The outbox budget is used up (the broker is behind).
        OutboxFull => "outbox_full",
        /// A record is larger than the outbox's frame limit.
        RecordTooLarge => "record_too_large",
        /// The disk failed.
        OutboxError => "outbox_error",
        /// keymeter is stopping.
        ShuttingDown => "shutting_down",
    }
}

label_enum! {
    /// Why a well-formed billing key update is not applied: the `reason` label of
    /// `keymeter_key_updates_ignored_total`.
    pub enum Ignored {
        /// A retained message: the broker's copy of an old list, not the billing
        /// system speaking now.
        Retained => "retained",
    }
}

label_enum! {
    /// What a refused publish carried: the `message` label of
    /// `keymeter_publish_refused_total`.
    pub enum Published {
        Report => "report",
        KeysRequest => "keys_request",
    }
}

label_enum! {
    /// keymeter's listeners: the `listener` label of
    /// `keymeter_connections_refused_total`.
    pub enum Listener {
        Grpc => "grpc",
        Admin => "admin",
        /// `listen.report`, when the Report API has its own.
        Report => "report",
    }
}

impl Listener {
    /// The configuration key of the listener's connection cap.
    pub fn cap_key(self) -> &'static str {
        match self {
            Listener::Grpc | Listener::Report => "listen.grpc_max_connections",
            Listener::Admin => "listen.admin_max_connections",
        }
    }
}

#[cfg(test)]
mod tests {
    label_enum! {
        /// A test enum.
        enum Colour {
            /// The first.
            Red => "red",
            DarkBlue => "dark_blue",
        }
    }

    #[test]
    fn all_lists_every_variant_in_order_with_its_label() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        let labels: Vec<_> = Colour::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, ["red", "dark_blue"]);
    }
}
