//! How addresses and times are written in the NDJSON contract.
/// IP addresses as text; IPv4 without the formatting machinery (two per
/// record).
pub(crate) mod ip_text {
    use std::net::IpAddr;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(ip: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
        let IpAddr::V4(v4) = ip else {
            return s.collect_str(ip);
        };
        let mut buf = [0u8; 15];
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            let mut digits = itoa::Buffer::new();
            let text = digits.format(octet).as_bytes();
            buf[len..len + text.len()].copy_from_slice(text);
            len += text.len();
        }
        // Only ASCII digits and dots were written.
        s.serialize_str(std::str::from_utf8(&buf[..len]).unwrap_or_default())
    }

    #[cfg(test)]
    mod tests {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

        #[test]
        fn writes_addresses_as_display_does() {
            for ip in [
                IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
                IpAddr::V4(Ipv4Addr::new(10, 244, 1, 255)),
                IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                let mut out = Vec::new();
                super::serialize(&ip, &mut serde_json::Serializer::new(&mut out)).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), format!("\"{ip}\""));
            }
        }
    }
}

/// RFC 3339 UTC timestamps with microseconds.
pub mod rfc3339 {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};

    /// Bytes of "YYYY-MM-DDTHH:MM:SS.ffffffZ".
    const LEN: usize = 27;

    pub fn format(t: SystemTime) -> String {
        let mut buf = [0u8; LEN];
        write(t, &mut buf).to_string()
    }

    /// Formats into `buf` without allocating (serialization runs per record).
    fn write(t: SystemTime, buf: &mut [u8; LEN]) -> &str {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let micros = since.as_micros();
        let secs = (micros / 1_000_000) as i64;
        let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        // 1970..=9999: earlier times count from the epoch, later ones fail
        // from_unix_timestamp and fall back to it.
        let year = dt.year() as u32;
        let fields: [(usize, u32, usize); 7] = [
            (0, year, 4),
            (5, u32::from(dt.month() as u8), 2),
            (8, u32::from(dt.day()), 2),
            (11, u32::from(dt.hour()), 2),
            (14, u32::from(dt.minute()), 2),
            (17, u32::from(dt.second()), 2),
            (20, (micros % 1_000_000) as u32, 6),
        ];
        for (at, mut value, width) in fields {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        for (at, sep) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (26, b'Z'),
        ] {
            buf[at] = sep;
        }
        // Only ASCII digits and separators were written.
        std::str::from_utf8(buf).unwrap_or("1970-01-01T00:00:00.000000Z")
    }

    pub fn parse(s: &str) -> Option<SystemTime> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        let nanos = dt.unix_timestamp_nanos();
        if nanos < 0 {
            return None;
        }
        Some(UNIX_EPOCH + Duration::from_nanos(nanos as u64))
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; LEN];
        s.serialize_str(write(*t, &mut buf))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| D::Error::custom(format!("not an RFC 3339 time: {s}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn formats_utc_with_micros_and_parses_back() {
            let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
            let s = format(t);
            assert_eq!(s, "2023-11-14T22:13:20.123456Z");
            assert_eq!(parse(&s), Some(t));
            assert_eq!(
                format(UNIX_EPOCH + Duration::from_micros(7)),
                "1970-01-01T00:00:00.000007Z"
            );
        }
    }
}
