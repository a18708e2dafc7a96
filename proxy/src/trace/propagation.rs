//! The trace context a request carries upstream: extracted from the
//! client's headers when they hold a valid one, else a new trace, in the
//! provider's own header format.

use super::config::{OtelSampler, Provider};
use pingora_http::RequestHeader;

#[derive(Debug, Clone, PartialEq)]
enum Style {
    /// OpenTelemetry: `traceparent` and `tracestate`.
    W3c { tracestate: String },
    /// Zipkin: `x-b3-*`; whether the trace id is 128 bits, and whether the
    /// span is the client's own (`shared_span_context`).
    B3 { wide: bool, shared: bool },
    /// Datadog's headers and W3C: the sampling priority and whether the
    /// decision mechanism (`-0`, the default sampler) is recorded.
    Datadog { priority: i32, mechanism: bool },
}

/// The connection manager's span, as far as propagation needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanContext {
    style: Style,
    trace_hi: u64,
    trace_lo: u64,
    span: u64,
    /// Its parent's id (B3 writes it).
    parent: Option<u64>,
    sampled: bool,
}

impl SpanContext {
    /// The trace id as 16 bytes (a 64-bit one zero-padded).
    pub fn trace_id(&self) -> [u8; 16] {
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&self.trace_hi.to_be_bytes());
        trace[8..].copy_from_slice(&self.trace_lo.to_be_bytes());
        trace
    }

    /// This proxy's span id.
    pub fn span_id(&self) -> u64 {
        self.span
    }

    /// The span this one continues, if the request named one.
    pub fn parent_id(&self) -> Option<u64> {
        self.parent
    }

    /// Whether the trace is sampled (its spans exported).
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// Zipkin's shared span: this proxy's server span is the client's.
    pub fn shared(&self) -> bool {
        matches!(self.style, Style::B3 { shared: true, .. })
    }

    /// Whether the trace id is 128 bits (Zipkin's may be 64).
    pub fn wide(&self) -> bool {
        !matches!(self.style, Style::B3 { wide: false, .. })
    }

    /// The W3C `tracestate` received with the parent, if any.
    pub fn tracestate(&self) -> &str {
        match &self.style {
            Style::W3c { tracestate } => tracestate,
            _ => "",
        }
    }

    /// The trace and span ids a log record names (the trace id as 16
    /// bytes, a 64-bit one zero-padded as Envoy pads it), when the request
    /// is traced: Envoy's span for an untraced request has no ids.
    pub fn log_ids(&self) -> Option<([u8; 16], [u8; 8])> {
        if !self.sampled {
            return None;
        }
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&self.trace_hi.to_be_bytes());
        trace[8..].copy_from_slice(&self.trace_lo.to_be_bytes());
        Some((trace, self.span.to_be_bytes()))
    }
}

fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn hex64(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// A valid `traceparent`: (trace hi, trace lo, parent span, sampled).
fn traceparent(v: &str) -> Option<(u64, u64, u64, bool)> {
    let parts: Vec<&str> = v.split('-').collect();
    if v.len() != 55 || parts.len() != 4 || parts[0].len() != 2 || parts[3].len() != 2 {
        return None;
    }
    u8::from_str_radix(parts[0], 16).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    let trace = parts[1];
    if trace.len() != 32 {
        return None;
    }
    let (hi, lo) = (hex64(&trace[..16])?, hex64(&trace[16..])?);
    let parent = hex64(parts[2])?;
    if (hi == 0 && lo == 0) || parent == 0 {
        return None;
    }
    Some((hi, lo, parent, flags & 1 == 1))
}

/// Starts the connection manager's span. None: the client sent a context
/// the provider cannot read, and Envoy then propagates nothing.
pub fn start(
    p: &Provider,
    traced: bool,
    req: &RequestHeader,
    ingress: bool,
) -> Option<SpanContext> {
    match p {
        Provider::OpenTelemetry { sampler, .. } => otel(sampler.as_ref(), traced, req),
        Provider::Zipkin {
            trace_id_128bit,
            shared_span_context,
            ..
        } => zipkin(
            *trace_id_128bit,
            *shared_span_context && ingress,
            traced,
            req,
        ),
        Provider::Datadog => Some(datadog(traced, req)),
    }
}

fn otel(sampler: Option<&OtelSampler>, traced: bool, req: &RequestHeader) -> Option<SpanContext> {
    let (hi, lo, parent) = match header(req, "traceparent") {
        Some(v) => {
            let (hi, lo, span, sampled) = traceparent(v)?;
            (hi, lo, Some((span, sampled)))
        }
        None => (rand::random(), rand::random(), None),
    };
    let sampled = match sampler {
        Some(s) => sample(s, parent.map(|p| p.1), hi),
        None => parent.map_or(traced, |p| p.1),
    };
    let tracestate = match parent {
        Some(_) => header(req, "tracestate").unwrap_or_default().to_string(),
        None => String::new(),
    };
    Some(SpanContext {
        style: Style::W3c { tracestate },
        trace_hi: hi,
        trace_lo: lo,
        span: rand::random(),
        parent: parent.map(|p| p.0),
        // Envoy's own decision not to trace wins over a parent or sampler.
        sampled: sampled && traced,
    })
}

fn sample(s: &OtelSampler, parent: Option<bool>, trace_hi: u64) -> bool {
    match s {
        OtelSampler::AlwaysOn => true,
        // The trace id's first eight bytes, read as a little-endian number.
        OtelSampler::Ratio(f) => f.admits(trace_hi.swap_bytes()),
        OtelSampler::ParentBased(w) => parent.unwrap_or_else(|| sample(w, None, trace_hi)),
    }
}

fn zipkin(wide: bool, share: bool, traced: bool, req: &RequestHeader) -> Option<SpanContext> {
    let sampled_header = header(req, "x-b3-sampled").map(|s| s == "1" || s == "true");
    let Some(t) = header(req, "x-b3-traceid") else {
        let span: u64 = rand::random();
        return Some(SpanContext {
            style: Style::B3 {
                wide,
                shared: false,
            },
            trace_hi: if wide { rand::random() } else { 0 },
            trace_lo: span,
            span,
            parent: None,
            sampled: sampled_header.unwrap_or(traced),
        });
    };
    let (hi, lo, wide) = match t.len() {
        16 => (0, hex64(t)?, false),
        32 => (hex64(&t[..16])?, hex64(&t[16..])?, true),
        _ => return None,
    };
    let incoming = hex64(header(req, "x-b3-spanid")?)?;
    let incoming_parent = match header(req, "x-b3-parentspanid") {
        Some(p) => Some(hex64(p)?),
        None => None,
    };
    let (span, parent) = if share {
        (incoming, incoming_parent)
    } else {
        (rand::random(), Some(incoming))
    };
    Some(SpanContext {
        style: Style::B3 {
            wide,
            shared: share,
        },
        trace_hi: hi,
        trace_lo: lo,
        span,
        parent,
        sampled: sampled_header.unwrap_or(traced),
    })
}

/// Datadog's 63-bit span ids.
fn dd_id() -> u64 {
    rand::random::<u64>() >> 1
}

fn datadog(traced: bool, req: &RequestHeader) -> SpanContext {
    let incoming = header(req, "x-datadog-trace-id").and_then(|t| t.parse::<u64>().ok());
    if let Some(lo) = incoming {
        let hi = header(req, "x-datadog-tags")
            .and_then(|t| t.split(',').find_map(|kv| kv.strip_prefix("_dd.p.tid=")))
            .and_then(hex64)
            .unwrap_or(0);
        let priority = header(req, "x-datadog-sampling-priority")
            .and_then(|p| p.parse().ok())
            .unwrap_or(if traced { 1 } else { -1 });
        return SpanContext {
            style: Style::Datadog {
                priority,
                mechanism: false,
            },
            trace_hi: hi,
            trace_lo: lo,
            span: dd_id(),
            parent: header(req, "x-datadog-parent-id").and_then(|p| p.parse().ok()),
            sampled: priority > 0,
        };
    }
    let (hi, lo, parent, priority) = match header(req, "traceparent").and_then(traceparent) {
        Some((hi, lo, p, sampled)) => (hi, lo, Some(p), i32::from(sampled)),
        None => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            (
                secs << 32,
                rand::random(),
                None,
                if traced { 1 } else { -1 },
            )
        }
    };
    // Envoy's decision to trace leaves the choice to Datadog's sampler,
    // which keeps (priority 1, mechanism 0) until an agent says otherwise.
    let (priority, mechanism) = match (parent, traced) {
        (Some(_), _) => (priority, false),
        (None, true) => (1, true),
        (None, false) => (-1, false),
    };
    SpanContext {
        style: Style::Datadog {
            priority,
            mechanism,
        },
        trace_hi: hi,
        trace_lo: lo,
        span: if parent.is_some() { dd_id() } else { lo },
        parent,
        sampled: priority > 0,
    }
}

impl SpanContext {
    /// Writes the context into an upstream attempt's headers: the manager's
    /// span, or with `spawn` a new child span of it.
    /// A new child span id, in this provider's id space.
    pub fn child_id(&self) -> u64 {
        match self.style {
            Style::Datadog { .. } => dd_id(),
            _ => rand::random(),
        }
    }

    /// Sends this span's context, or with `child` a child span's (an
    /// upstream attempt's, from [`Self::child_id`]).
    pub fn inject(&self, child: Option<u64>, req: &mut RequestHeader) {
        let (span, parent) = match child {
            Some(id) => (id, Some(self.span)),
            None => (self.span, self.parent),
        };
        let flags = if self.sampled { "01" } else { "00" };
        let tp = format!(
            "00-{:016x}{:016x}-{span:016x}-{flags}",
            self.trace_hi, self.trace_lo
        );
        let mut set = |k: &'static str, v: String| {
            let _ = req.insert_header(k, v);
        };
        match &self.style {
            Style::W3c { tracestate } => {
                set("traceparent", tp);
                set("tracestate", tracestate.clone());
            }
            Style::B3 { wide, .. } => {
                let trace = if *wide {
                    format!("{:016x}{:016x}", self.trace_hi, self.trace_lo)
                } else {
                    format!("{:016x}", self.trace_lo)
                };
                set("x-b3-traceid", trace);
                set("x-b3-spanid", format!("{span:016x}"));
                if let Some(p) = parent {
                    set("x-b3-parentspanid", format!("{p:016x}"));
                }
                set("x-b3-sampled", if self.sampled { "1" } else { "0" }.into());
            }
            Style::Datadog {
                priority,
                mechanism,
            } => {
                set("x-datadog-trace-id", self.trace_lo.to_string());
                set("x-datadog-parent-id", span.to_string());
                set("x-datadog-sampling-priority", priority.to_string());
                let mut tags = Vec::new();
                if self.trace_hi != 0 {
                    tags.push(format!("_dd.p.tid={:016x}", self.trace_hi));
                }
                if *mechanism {
                    tags.push("_dd.p.dm=-0".into());
                }
                if !tags.is_empty() {
                    set("x-datadog-tags", tags.join(","));
                }
                set("traceparent", tp);
                let dm = if *mechanism { ";t.dm:-0" } else { "" };
                set("tracestate", format!("dd=s:{priority};p:{span:016x}{dm}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn get(r: &RequestHeader, k: &str) -> String {
        r.headers
            .get(k)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_w3c_parent_keeps_its_trace_and_state() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let r = req(&[("traceparent", tp), ("tracestate", "a=1")]);
        let p = Provider::OpenTelemetry {
            sampler: None,
            exporter: None,
        };
        let c = start(&p, true, &r, true).unwrap();
        let mut up = req(&[]);
        c.inject(None, &mut up);
        let sent = get(&up, "traceparent");
        assert!(
            sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01") && !sent.contains("b7ad6b7169203331"));
        assert_eq!(get(&up, "tracestate"), "a=1");
        // Not traced by Envoy: the flag says so whatever the parent said.
        let c = start(&p, false, &r, true).unwrap();
        let mut up = req(&[]);
        c.inject(None, &mut up);
        assert!(get(&up, "traceparent").ends_with("-00"));
        // A malformed one: nothing is propagated.
        assert!(start(&p, true, &req(&[("traceparent", "00-zz")]), true).is_none());
    }

    #[test]
    fn a_zipkin_root_span_is_the_trace_ids_low_half() {
        let p = Provider::Zipkin {
            trace_id_128bit: true,
            shared_span_context: true,
            exporter: None,
        };
        let c = start(&p, true, &req(&[]), true).unwrap();
        let mut up = req(&[]);
        c.inject(Some(c.child_id()), &mut up);
        let trace = get(&up, "x-b3-traceid");
        assert_eq!(trace.len(), 32);
        assert_eq!(get(&up, "x-b3-parentspanid"), trace[16..]);
        assert_eq!(get(&up, "x-b3-sampled"), "1");
        assert_ne!(get(&up, "x-b3-spanid"), trace[16..]);
    }

    #[test]
    fn datadog_writes_its_headers_and_w3c() {
        let c = start(&Provider::Datadog, true, &req(&[]), true).unwrap();
        let mut up = req(&[]);
        c.inject(Some(c.child_id()), &mut up);
        let parent: u64 = get(&up, "x-datadog-parent-id").parse().unwrap();
        assert_eq!(get(&up, "x-datadog-sampling-priority"), "1");
        assert_eq!(
            get(&up, "tracestate"),
            format!("dd=s:1;p:{parent:016x};t.dm:-0")
        );
        assert!(get(&up, "x-datadog-tags").ends_with(",_dd.p.dm=-0"));
        let tp = get(&up, "traceparent");
        assert!(tp.ends_with(&format!("{parent:016x}-01")), "{tp}");
        assert_eq!(
            &tp[11..19],
            "00000000",
            "the high half's low 32 bits are zero"
        );
    }
}
