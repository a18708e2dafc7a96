//! Known gaps: differences from Envoy that are understood and not yet
//! closed. Each is reported on every run as "NOT YET SUPPORTED" with its
//! reason; a gap that stops occurring is reported as a failure, so this list
//! can only shrink honestly.

pub struct Gap {
    pub tier: &'static str,
    /// Scenario (file stem) or case name.
    pub scenario: &'static str,
    /// Request name within the scenario, or "*" for all of it.
    pub request: &'static str,
    pub reason: &'static str,
}

/// Both refuse the request; pingora's parser refuses with 400 (or, for
/// obs-fold, refuses where Envoy unfolds) before any Legate hook can run.
const PARSER: &str = "pingora's HTTP/1 parser answers 400 before any Legate hook runs (Envoy: 501/426, or accepts obs-fold)";

/// An upstream response head Envoy refuses (502) that pingora's HTTP/1
/// client reads as RFC 9112 allows, before Legate's response hook sees it.
const UPSTREAM_PARSER: &str = "pingora's HTTP/1 client drops Content-Length beside Transfer-Encoding and collapses identical Content-Lengths before any Legate hook sees the head (framed as RFC 9112 says, so no desync); Envoy refuses the response with 502";

/// Every other name is written as Envoy writes it; the one pingora adds
/// itself is not.
const DATE_CASE: &str = "pingora's HTTP/1 writer adds the Date header after Legate's last response hook, title-cased (Envoy writes `date` unless proper_case_words or PROPER_CASE envoy headers ask for `Date`)";

/// The buffer filter's limit as Envoy applies it, per DATA frame.
const H2_WHOLE_BODY: &str = "Envoy's buffer filter does not hold (so does not limit) an HTTP/2 body that arrives whole in one DATA frame with END_STREAM; Legate limits every body";

pub static GAPS: &[Gap] = &[
    Gap { tier: "routing", scenario: "filter-buffer", request: "h2-over-the-limit", reason: H2_WHOLE_BODY },
    Gap { tier: "routing", scenario: "filter-buffer", request: "stats", reason: H2_WHOLE_BODY },
    Gap {
        tier: "routing",
        scenario: "filter-buffer",
        request: "access-log",
        reason: "besides the HTTP/2 body above: a body whose stated content-length is over the limit is refused before it is read (%BYTES_RECEIVED% 0), where Envoy reads what has arrived first",
    },
    Gap {
        tier: "routing",
        scenario: "filter-grpc-web",
        request: "upstream-reply-not-grpc",
        reason: "an upstream's non-gRPC answer to a gRPC-Web request: Envoy holds its headers until the body is in and sends the body as grpc-message; Legate's engine writes the headers first, so the status, grpc-status and empty body match but grpc-message is missing",
    },
    Gap {
        tier: "routing",
        scenario: "filter-api-key-auth",
        request: "query-rebuilt-with-a-space",
        reason: "hiding a query key rebuilds the query from decoded parameters; Envoy writes a decoded space into the request line as it is (the upstream refuses it with 400), Legate cannot send an invalid request line and encodes it as %20",
    },
    Gap {
        tier: "routing",
        scenario: "cluster-circuit-breakers",
        request: "max-pending-0-needs-a-new-connection",
        reason: "Envoy counts a request as pending while its pool opens a connection for it; Legate counts only requests waiting for a max_connections slot (pingora's pool does not say whether an idle connection is ready), so max_pending_requests 0 refuses nothing until max_connections is reached",
    },
    Gap {
        tier: "validate",
        scenario: "corpus",
        request: "accept-tls-1-0-minimum.yaml",
        reason: "TLS 1.0 and 1.1 are refused naming tls_params.tls_minimum_protocol_version: rustls implements TLS 1.2 and 1.3 only, and serving fewer versions than configured would change traffic (principle 1)",
    },
    Gap {
        tier: "istio",
        scenario: "sidecar-interception-none-sotw",
        request: "ratings-fault-delay",
        reason: "max_requests_per_connection (ratings' maxRequestsPerConnection: 1): Legate marks the connection's last request 'connection: close' so pingora does not pool it; Envoy sends no such header and closes the connection itself after the response",
    },
    Gap {
        tier: "http",
        scenario: "http1-framing",
        request: "absolute-uri-other-host",
        reason: "pingora's HTTP/1 parser refuses an absolute-form target whose authority differs from Host (400) before any Legate hook runs; Envoy serves it with the target's authority as the host",
    },
    Gap { tier: "http", scenario: "http1-header-case", request: "lowercase-both-ways-date", reason: DATE_CASE },
    Gap { tier: "http", scenario: "http1-header-case", request: "preserve-case-both-date", reason: DATE_CASE },
    Gap { tier: "http", scenario: "http1-header-case", request: "preserve-case-connection-manager-date", reason: DATE_CASE },
    Gap { tier: "http", scenario: "http1-header-case", request: "preserve-case-cluster-date", reason: DATE_CASE },
    Gap { tier: "http", scenario: "http1-framing", request: "te-gzip-last", reason: PARSER },
    Gap { tier: "http", scenario: "upstream-framing", request: "cl-and-te", reason: UPSTREAM_PARSER },
    Gap { tier: "http", scenario: "upstream-framing", request: "two-equal-cl", reason: UPSTREAM_PARSER },
    Gap { tier: "http", scenario: "http1-framing", request: "te-unknown", reason: PARSER },
    Gap { tier: "http", scenario: "http1-framing", request: "obs-fold", reason: PARSER },
    Gap { tier: "http", scenario: "http1-framing", request: "bad-version", reason: PARSER },
    Gap {
        tier: "validate",
        scenario: "corpus",
        request: "accept-bad-header-name-in-request-headers-to-add.yaml",
        reason: "Legate rejects header names that are not HTTP tokens (a space here): it could not send them on HTTP/1",
    },
    Gap {
        tier: "http",
        scenario: "keepalive-after-5xx",
        request: "same-connection",
        reason: "pingora-proxy's proxy loop reports the client connection as not reusable after a failed upstream attempt (connection refused, timeout), whatever the reply Legate wrote, so the client's keep-alive connection ends there; Envoy keeps it",
    },
    Gap {
        tier: "validate",
        scenario: "corpus",
        request: "accept-no-http-filters.yaml",
        reason: "an HTTP connection manager without the router filter is rejected until Legate implements Envoy's behaviour without one",
    },
    Gap {
        tier: "validate",
        scenario: "corpus",
        request: "accept-max-request-headers-kb-limit.yaml",
        reason: "max_request_headers_kb above 64 is rejected: pingora's HTTP/2 server caps the header list at 64 KiB, so a larger limit could not be honoured",
    },
];

pub fn find(tier: &str, scenario: &str, request: &str) -> Option<&'static Gap> {
    GAPS.iter().chain(crate::corpus::gaps()).find(|g| {
        g.tier == tier
            && (g.scenario == "*" || g.scenario == scenario)
            && (g.request == "*" || g.request == request)
    })
}
