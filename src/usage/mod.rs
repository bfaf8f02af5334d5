//! Usage: what backends declare (the header contract), route defaults for those that
//! declare nothing, and the record published to `billing/report`.

pub mod contract;
pub mod record;
pub mod recorder;
pub mod routes;

pub use contract::{Declared, Field, FieldNames, Limits, MetadataProblem, Rejection, Usage};
pub use record::UsageRecord;
