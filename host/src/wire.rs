//! Conversions between NATS messages and the WIT `message` record.
//!
//! Headers are where untrusted guest input meets the NATS client, which
//! panics on an invalid header name or a value with a line break, so building
//! a header map from guest data always goes through the checked
//! [`headers_from_wit`].

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use wasmtime::component::{ComponentType, Lower};

use crate::bindings::natsfn::host::types::{JetstreamMeta, KvMeta, KvOperation};
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
/// client's own buffers (reference-counted, so taking them copies nothing),
/// and the delivery data of a JetStream or KV-watch message.
pub(crate) struct Received {
    pub(crate) subject: async_nats::Subject,
    /// Where a reply goes; never set for JetStream, where it is the ack
    /// subject and not the guest's to publish to.
    pub(crate) reply: Option<async_nats::Subject>,
    headers: Option<HeaderMap>,
    payload: bytes::Bytes,
    jetstream: Option<JetstreamMeta>,
    kv: Option<KvMeta>,
}

impl Received {
    /// A core NATS message, reply subject included.
    pub(crate) fn core(msg: async_nats::Message) -> Self {
        let async_nats::Message { subject, reply, headers, payload, .. } = msg;
        Received { subject, reply, headers, payload, jetstream: None, kv: None }
    }

    /// A JetStream message with its stream position `jetstream`, and for a
    /// KV watch the key, revision and operation. The message itself stays
    /// with its ack; its buffers are shared.
    pub(crate) fn jetstream(
        msg: &async_nats::jetstream::Message,
        jetstream: Option<JetstreamMeta>,
        watch: Option<&KvWatch>,
    ) -> Self {
        Received {
            subject: msg.subject.clone(),
            reply: None,
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
            kv: watch.map(|w| kv_meta(msg, w, jetstream.as_ref())),
            jetstream,
        }
    }

    /// The WIT record, borrowing from `self`.
    pub(crate) fn view(&self) -> MessageView<'_> {
        MessageView {
            subject: self.subject.as_str(),
            reply: self.reply.as_ref().map(|r| r.as_str()),
            headers: header_pairs(self.headers.as_ref()),
            payload: &self.payload,
            jetstream: self.jetstream.as_ref(),
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
    jetstream: Option<&'a JetstreamMeta>,
    kv: Option<&'a KvMeta>,
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

/// The delivery data JetStream encodes in a message's reply subject,
/// parsed once per delivery: the span, the guest and the settlement all
/// read it from here.
pub(crate) fn jetstream_meta(msg: &async_nats::jetstream::Message) -> Option<JetstreamMeta> {
    msg.info().ok().map(|info| JetstreamMeta {
        stream: info.stream.to_owned(),
        consumer: info.consumer.to_owned(),
        stream_sequence: info.stream_sequence,
        consumer_sequence: info.consumer_sequence,
        delivered: info.delivered.max(0) as u64,
        pending: info.pending,
        timestamp_ns: i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
    })
}

/// Where a KV-watch delivery comes from: the bucket stream stores key `k`
/// under `$KV.<bucket>.k`, and a delete or purge is a marker message with a
/// `KV-Operation` header.
fn kv_meta(msg: &async_nats::jetstream::Message, w: &KvWatch, jetstream: Option<&JetstreamMeta>) -> KvMeta {
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
}
