//! Conversions between NATS messages and the WIT `message` record.
//!
//! Headers are where untrusted guest input meets the NATS client, which
//! panics on an invalid header name or a value with a line break, so building
//! a header map from guest data always goes through the checked
//! [`headers_from_wit`].

use std::ops::Range;
use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use wasmtime::component::{ComponentType, Lower};

use crate::bindings::natsfn::host::types::{KvMeta, KvOperation};
use crate::bindings::{Message, WitError};
use crate::manifest::KvWatch;

/// Flattens a NATS header map into `(name, value)` pairs, one per value.
pub(crate) fn headers_to_wit(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    header_pairs(headers).into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect()
}

/// Builds a NATS header map from guest-supplied pairs, or `None` when there
/// are none (so the message goes out as a plain `PUB`). A malformed name or
/// value is an `invalid` error naming it.
pub(crate) fn headers_from_wit(pairs: Vec<(String, String)>) -> Result<Option<HeaderMap>, WitError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        // The client accepts an empty name, which would put a malformed
        // header line on the wire; insist on a printable token here.
        let valid_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        let header = HeaderName::from_str(&name).ok().filter(|_| valid_name).ok_or_else(|| {
            WitError::Invalid(format!("header name `{}` is not a valid NATS header name", name.escape_debug()))
        })?;
        if value.contains(['\r', '\n']) {
            return Err(WitError::Invalid(format!("header `{name}` has a line break in its value")));
        }
        let value = HeaderValue::from_str(&value)
            .map_err(|_| WitError::Invalid(format!("header `{name}` has an invalid value")))?;
        map.append(header, value);
    }
    Ok(Some(map))
}

/// What a handler is called with, taken from a received message: the
/// client's own buffers, moved out of it (nothing is copied), and the
/// delivery data of a JetStream or KV-watch message.
pub(crate) struct Received {
    pub(crate) subject: async_nats::Subject,
    /// Where a reply goes; never set for JetStream, where the message's
    /// reply subject is its ack subject and not the guest's to publish to.
    pub(crate) reply: Option<async_nats::Subject>,
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) payload: bytes::Bytes,
    /// A JetStream message's ack subject and what it says.
    jetstream: Option<(async_nats::Subject, Option<DeliveryInfo>)>,
    kv: Option<KvMeta>,
}

impl Received {
    /// A core NATS message, reply subject included.
    pub(crate) fn core(msg: async_nats::Message) -> Self {
        let async_nats::Message { subject, reply, headers, payload, .. } = msg;
        Received { subject, reply, headers, payload, jetstream: None, kv: None }
    }

    /// A JetStream message with its delivery data `info` (parsed from its
    /// ack subject), and for a KV watch the key, revision and operation.
    pub(crate) fn jetstream(msg: async_nats::Message, info: Option<DeliveryInfo>, watch: Option<&KvWatch>) -> Self {
        let kv = watch.map(|w| kv_meta(&msg, w, info.as_ref()));
        let async_nats::Message { subject, reply, headers, payload, .. } = msg;
        let jetstream = reply.map(|ack| (ack, info));
        Received { subject, reply: None, headers, payload, jetstream, kv }
    }

    /// A JetStream message's ack subject.
    pub(crate) fn ack_subject(&self) -> Option<&async_nats::Subject> {
        self.jetstream.as_ref().map(|(ack, _)| ack)
    }

    /// A JetStream message's ack subject and the delivery data parsed from
    /// it, when it could be.
    pub(crate) fn delivery(&self) -> Option<(&str, &DeliveryInfo)> {
        match &self.jetstream {
            Some((ack, Some(info))) => Some((ack.as_str(), info)),
            _ => None,
        }
    }

    /// The WIT record, borrowing from `self`.
    pub(crate) fn view(&self) -> MessageView<'_> {
        MessageView {
            subject: self.subject.as_str(),
            reply: self.reply.as_ref().map(|r| r.as_str()),
            headers: header_pairs(self.headers.as_ref()),
            payload: &self.payload,
            jetstream: self.delivery().map(|(ack, info)| info.view(ack)),
            kv: self.kv.as_ref(),
        }
    }
}

/// The WIT `message` record a handler is called with, borrowed from a
/// [`Received`]: wasmtime lowers it into the guest straight from the
/// client's buffers, with no owned copy made per message in between
/// (`engine::guest`). Field for field the record of the generated bindings,
/// whose types the export is checked against.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct MessageView<'a> {
    subject: &'a str,
    reply: Option<&'a str>,
    /// Allocates only when the message has headers.
    headers: Vec<(&'a str, &'a str)>,
    payload: &'a [u8],
    jetstream: Option<JetstreamMetaView<'a>>,
    kv: Option<&'a KvMeta>,
}

/// The WIT `jetstream-meta` record, its names borrowed from the ack
/// subject.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct JetstreamMetaView<'a> {
    stream: &'a str,
    consumer: &'a str,
    #[component(name = "stream-sequence")]
    stream_sequence: u64,
    #[component(name = "consumer-sequence")]
    consumer_sequence: u64,
    delivered: u64,
    pending: u64,
    #[component(name = "timestamp-ns")]
    timestamp_ns: i64,
}

/// A header map as borrowed `(name, value)` pairs, one per value.
fn header_pairs(headers: Option<&HeaderMap>) -> Vec<(&str, &str)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(headers.len());
    for (name, values) in headers.iter() {
        for value in values {
            out.push((name.as_ref(), value.as_str()));
        }
    }
    out
}

/// Turns a received NATS message into an owned WIT record: what a guest's
/// `request` gets back.
pub(crate) fn message_to_wit(msg: async_nats::Message) -> Message {
    Message {
        headers: headers_to_wit(msg.headers.as_ref()),
        subject: msg.subject.to_string(),
        reply: msg.reply.map(|r| r.to_string()),
        payload: msg.payload.into(),
        jetstream: None,
        kv: None,
    }
}

/// The delivery data JetStream encodes in a message's ack subject, parsed
/// once per delivery: the span, the guest and the settlement all read it
/// from here. The stream and consumer names stay in the ack subject, as
/// byte ranges of it: a message's names are not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeliveryInfo {
    stream: Range<usize>,
    consumer: Range<usize>,
    /// How many times the message has been delivered, this time included.
    pub(crate) delivered: u64,
    pub(crate) stream_sequence: u64,
    pub(crate) consumer_sequence: u64,
    pub(crate) pending: u64,
    pub(crate) timestamp_ns: i64,
}

impl DeliveryInfo {
    /// Parses an ack subject in either form of ADR-15:
    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`,
    /// or with `<domain>.<account hash>.` before the stream and any tokens
    /// after the pending count. `None` for anything else.
    pub(crate) fn parse(ack: &str) -> Option<Self> {
        const PREFIX: &str = "$JS.ACK.";
        const KNOWN: usize = 10;
        let bytes = ack.as_bytes();
        if !bytes.starts_with(PREFIX.as_bytes()) {
            return None;
        }
        // Token boundaries, from the bytes: splitting the `str` on a
        // `char` took nearly twice as long (75 against 130 ns a subject).
        let mut tokens = [(0, 0); KNOWN];
        let mut count = 0;
        let mut start = PREFIX.len();
        for token in bytes[PREFIX.len()..].split(|&b| b == b'.') {
            if count < KNOWN {
                tokens[count] = (start, start + token.len());
            }
            count += 1;
            start += token.len() + 1;
        }
        let first = match count {
            7 => 0,
            9.. => 2,
            _ => return None,
        };
        let [stream, consumer, delivered, stream_sequence, consumer_sequence, timestamp, pending] =
            tokens[first..first + 7].try_into().ok()?;
        // A function, not a closure: the timestamp is signed, the rest not.
        fn number<T: std::str::FromStr>(ack: &str, (from, to): (usize, usize)) -> Option<T> {
            ack.get(from..to)?.parse().ok()
        }
        Some(DeliveryInfo {
            stream: stream.0..stream.1,
            consumer: consumer.0..consumer.1,
            delivered: number(ack, delivered)?,
            stream_sequence: number(ack, stream_sequence)?,
            consumer_sequence: number(ack, consumer_sequence)?,
            timestamp_ns: number(ack, timestamp)?,
            pending: number(ack, pending)?,
        })
    }

    /// The stream's name, from `ack`, the subject this was parsed from.
    pub(crate) fn stream<'a>(&self, ack: &'a str) -> &'a str {
        ack.get(self.stream.clone()).unwrap_or_default()
    }

    /// The WIT record, with names from `ack`, the subject this was parsed
    /// from.
    fn view<'a>(&self, ack: &'a str) -> JetstreamMetaView<'a> {
        JetstreamMetaView {
            stream: self.stream(ack),
            consumer: ack.get(self.consumer.clone()).unwrap_or_default(),
            stream_sequence: self.stream_sequence,
            consumer_sequence: self.consumer_sequence,
            delivered: self.delivered,
            pending: self.pending,
            timestamp_ns: self.timestamp_ns,
        }
    }
}

/// Where a KV-watch delivery comes from: the bucket stream stores key `k`
/// under `$KV.<bucket>.k`, and a delete or purge is a marker message with a
/// `KV-Operation` header.
fn kv_meta(msg: &async_nats::Message, w: &KvWatch, jetstream: Option<&DeliveryInfo>) -> KvMeta {
    let prefix_len = "$KV.".len() + w.bucket.as_str().len() + 1;
    let operation = match msg.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str()) {
        Some("DEL") => KvOperation::Delete,
        Some("PURGE") => KvOperation::Purge,
        _ => KvOperation::Put,
    };
    KvMeta {
        bucket: w.bucket.to_string(),
        key: msg.subject.as_str().get(prefix_len..).unwrap_or_default().to_owned(),
        revision: jetstream.map_or(0, |j| j.stream_sequence),
        operation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_keeps_repeated_names() {
        let pairs = vec![("A".into(), "1".into()), ("A".into(), "2".into()), ("B".into(), "x y".into())];
        let map = headers_from_wit(pairs).unwrap().unwrap();
        let mut back = headers_to_wit(Some(&map));
        back.sort();
        assert_eq!(back, vec![("A".into(), "1".into()), ("A".into(), "2".into()), ("B".into(), "x y".into())]);
    }

    #[test]
    fn bad_headers_are_invalid_not_panics() {
        for (name, value) in
            [("bad name", "v"), ("", "v"), ("ok", "line\r\nbreak"), ("ok", "line\nbreak"), ("a:b", "v")]
        {
            let got = headers_from_wit(vec![(name.into(), value.into())]);
            assert!(matches!(got, Err(WitError::Invalid(_))), "{name:?}={value:?} gave {got:?}");
        }
        assert!(headers_from_wit(Vec::new()).unwrap().is_none());
    }

    #[test]
    fn delivery_info_reads_both_ack_subject_forms() {
        let short = "$JS.ACK.ORDERS.worker.3.1042.17.1764288000123456789.5";
        let info = DeliveryInfo::parse(short).unwrap();
        assert_eq!((info.stream(short), info.view(short).consumer), ("ORDERS", "worker"));
        assert_eq!(
            (info.delivered, info.stream_sequence, info.consumer_sequence, info.timestamp_ns, info.pending),
            (3, 1042, 17, 1_764_288_000_123_456_789, 5)
        );
        // With domain and account hash in front, and a token after: the same.
        for long in [
            "$JS.ACK.hub.ACCHASH.ORDERS.worker.3.1042.17.1764288000123456789.5",
            "$JS.ACK._.ACCHASH.ORDERS.worker.3.1042.17.1764288000123456789.5.rand0m.more",
        ] {
            let other = DeliveryInfo::parse(long).unwrap();
            assert_eq!((other.stream(long), other.view(long).consumer), ("ORDERS", "worker"), "{long}");
            assert_eq!(other.stream_sequence, 1042, "{long}");
        }
    }

    #[test]
    fn delivery_info_refuses_what_is_not_an_ack_subject() {
        for bad in [
            "_INBOX.abc",
            "$JS.ACK.ORDERS.worker.3.1042.17.1764288000123456789",
            "$JS.ACK.a.b.ORDERS.worker.3.1042.17.1764288000123456789",
            "$JS.ACK.ORDERS.worker.x.1042.17.1764288000123456789.5",
            "$JS.ACK.ORDERS.worker.-1.1042.17.1764288000123456789.5",
        ] {
            assert_eq!(DeliveryInfo::parse(bad), None, "{bad}");
        }
    }
}
