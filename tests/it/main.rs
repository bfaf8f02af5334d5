//! keymeter's integration tests, one crate (one binary to build and link), one module
//! per area. `support` is the harness: real Envoy, mosquitto, Prometheus and backends,
//! each owned by a guard that kills it on drop. Run one area with
//! `scripts/test.sh <module>::` (e.g. `metering_e2e::`), one test by its name.

mod support;

mod accesslog_decoder;
mod bad_usage_input;
mod broker_acl;
mod check_e2e;
mod check_scan;
mod cli;
mod deploy_envoy_gateway;
mod deploy_istio;
mod deploy_kubernetes;
mod deploy_namespaces;
mod deploy_prometheus_operator;
mod deploy_schemas;
mod dev_standin;
mod envoy_access_log;
mod envoy_edge;
mod fail_closed;
mod faults;
mod grpc_mtls;
mod harness_smoke;
mod hostile;
mod key_sync;
mod key_update_e2e;
mod key_update_model;
mod listener_limits;
mod local_mode;
mod metering_e2e;
mod mqtt_tls;
mod no_key_in_logs;
mod outbox;
mod process;
mod prometheus;
mod properties;
mod reliability;
mod report_clients;
mod trust_boundary;
