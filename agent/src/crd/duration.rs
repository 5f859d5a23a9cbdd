//! Durations as the resources spell them: protobuf JSON (`"1.5s"`, `"0.100s"`), Istio's shorthand
//! (`"100ms"`, `"5m"`) and Go / Gateway API (`"1h2m3s4ms"`).
//!
//! Owns the string → [`Duration`] conversion only; which fields are durations and what a zero or
//! missing one means is up to the code reading the resource.

use std::time::Duration;

/// Parses a non-negative duration made of one or more `<number><unit>` parts, the number possibly
/// fractional, the unit one of `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`. A bare `0` is zero (Go accepts
/// it). The error says what was wrong, for a message naming the field.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. \"1.5s\", \"100ms\" or \"1h2m3s\"".to_owned());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("negative duration {text:?}; durations must be >= 0"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(num_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(format!("invalid duration {text:?}: expected a number at {rest:?}"));
        }
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            "" => {
                return Err(format!("invalid duration {text:?}: missing unit after {number:?} (h, m, s, ms, us, ns)"));
            }
            other => return Err(format!("invalid duration {text:?}: unknown unit {other:?} (h, m, s, ms, us, ns)")),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| format!("invalid duration {text:?}: number {number:?} too large"))?
        };
        let mut part = int.checked_mul(unit_nanos).ok_or_else(|| format!("duration {text:?} is too large"))?;
        // Fraction digits beyond nanosecond precision are dropped, as Go does.
        let mut scale = unit_nanos;
        for digit in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            part += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos.checked_add(part).ok_or_else(|| format!("duration {text:?} is too large"))?;
        rest = tail;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| format!("duration {text:?} is too large"))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protobuf_istio_and_go_forms() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("1.5s", ms(1500)),
            ("0.100s", ms(100)),
            ("100ms", ms(100)),
            ("5m", ms(300_000)),
            ("1h2m3s4ms", ms(3_723_004)),
            ("1.5h", ms(5_400_000)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("1.000000001s", Duration::new(1, 1)),
            (".5s", ms(500)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_durations_with_a_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("10", "missing unit"),
            ("-1s", "negative"),
            ("1d", "unknown unit \"d\""),
            ("s", "expected a number"),
            ("1..2s", "expected a number"),
            ("abc", "expected a number"),
            ("99999999999999999999999999999999999999999h", "too large"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }
}
