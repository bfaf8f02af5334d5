//! Route defaults: usage for requests whose backend sets no usage headers, e.g.
//! "bill 1 unit per successful GET on /v1/search".

use crate::config::RouteRule;

/// The request and response facts a rule can match on.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `:authority`; a port suffix is ignored.
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub status: u32,
}

/// The first rule matching every criterion it names.
pub fn matching<'r>(rules: &'r [RouteRule], facts: RequestFacts<'_>) -> Option<&'r RouteRule> {
    let host = strip_port(facts.host);
    rules.iter().find(|r| {
        r.host
            .as_deref()
            .is_none_or(|h| h.eq_ignore_ascii_case(host))
            && r.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(facts.method))
            && path_matches(&r.path_prefix, facts.path)
            && r.status.matches(facts.status)
    })
}

/// Prefix match on the path without its query string.
fn path_matches(prefix: &str, path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.starts_with(prefix)
}

fn strip_port(host: &str) -> &str {
    // "[::1]:8080" keeps its brackets; "example.com:443" loses the port.
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StatusClass;

    fn rule(
        path: &str,
        method: Option<&str>,
        host: Option<&str>,
        status: StatusClass,
    ) -> RouteRule {
        RouteRule {
            host: host.map(Into::into),
            path_prefix: path.into(),
            method: method.map(Into::into),
            status,
            module: "search".into(),
            model: path.into(),
            usage: 1,
        }
    }

    fn facts(
        host: &'static str,
        path: &'static str,
        method: &'static str,
        status: u32,
    ) -> RequestFacts<'static> {
        RequestFacts {
            host,
            path,
            method,
            status,
        }
    }

    #[test]
    fn first_match_on_every_named_criterion() {
        let rules = vec![
            rule(
                "/v1/search",
                Some("GET"),
                Some("api.example.com"),
                StatusClass::Success,
            ),
            rule("/v1/", None, None, StatusClass::Any),
        ];
        let m = |f| matching(&rules, f).map(|r| r.model.as_str());
        assert_eq!(
            m(facts("api.example.com:443", "/v1/search?q=x", "get", 200)),
            Some("/v1/search")
        );
        assert_eq!(
            m(facts("other.example.com", "/v1/search", "GET", 200)),
            Some("/v1/")
        );
        assert_eq!(
            m(facts("api.example.com", "/v1/search", "POST", 200)),
            Some("/v1/")
        );
        assert_eq!(m(facts("api.example.com", "/v2/x", "GET", 200)), None);
    }

    #[test]
    fn failures_do_not_bill_by_default() {
        let rules = vec![rule("/v1/search", None, None, StatusClass::Success)];
        assert!(matching(&rules, facts("h", "/v1/search", "GET", 503)).is_none());
        assert!(matching(&rules, facts("h", "/v1/search", "GET", 404)).is_none());
        assert!(matching(&rules, facts("h", "/v1/search", "GET", 204)).is_some());
    }
}
