//! Prometheus text exposition, parsed just enough to assert on: sample name, labels, value.
//! Owns parsing and label matching; scraping is `Agent::metrics`.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format; comment lines and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Metrics {
        Metrics { samples: text.lines().filter_map(parse_line).collect() }
    }

    /// Samples named `name` whose labels include every `(key, value)` of `want`.
    pub fn find<'a>(&'a self, name: &'a str, want: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the matching samples' values (0 when none match).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want).map(|s| s.value).sum()
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        after
    } else {
        rest
    };
    // `value [timestamp]`
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// Parses `k="v",k2="v2"}` (the part after `{`), with `\"`, `\\` and `\n` escapes; returns the
/// labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut out = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((out, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut val = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                c => val.push(c),
            }
        };
        out.insert(key, val);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_tcp_connections_opened_total Total TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",source_principal="spiffe://cluster.local/ns/demo/sa/client",destination_principal="spiffe://cluster.local/ns/demo/sa/server",connection_security_policy="mutual_tls"} 3
istio_tcp_connections_opened_total{reporter="source",source_principal="spiffe://cluster.local/ns/demo/sa/client",connection_security_policy="unknown"} 2
istio_tcp_sent_bytes_total{reporter="destination",weird="a \"quoted\" \\ value, with {brace}"} 1.5e3 1700000000
process_start_time_seconds 12
"#;

    #[test]
    fn parses_labels_values_and_escapes() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.samples.len(), 4);
        let dest: Vec<_> = m.find("istio_tcp_connections_opened_total", &[("reporter", "destination")]).collect();
        assert_eq!(dest.len(), 1);
        assert_eq!(dest[0].value, 3.0);
        assert_eq!(dest[0].labels["source_principal"], "spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(
            m.sum(
                "istio_tcp_connections_opened_total",
                &[("source_principal", "spiffe://cluster.local/ns/demo/sa/client")]
            ),
            5.0
        );
        let sent = m.find("istio_tcp_sent_bytes_total", &[]).next().unwrap();
        assert_eq!(sent.value, 1500.0);
        assert_eq!(sent.labels["weird"], r#"a "quoted" \ value, with {brace}"#);
        assert_eq!(m.sum("process_start_time_seconds", &[]), 12.0);
        assert_eq!(m.sum("nope", &[]), 0.0);
    }
}
