//! `forbidden`: makes host calls that should be refused, one per payload, and
//! replies with how the host refused it, so tests can assert on the exact
//! error rather than on a generic failure.

use natsfn_guest::{describe, kv, messaging, object, Error, Guest, HandleResult, Header, Message};

struct Forbidden;

fn publish_with_header(name: &str, value: &str) -> Result<(), Error> {
    let subject = natsfn_guest::config_or("allowed", "allowed.ok");
    let headers: Vec<Header> = vec![(name.to_string(), value.to_string())];
    messaging::publish(&subject, &headers, b"probe")
}

fn probe(which: &str) -> Result<(), Error> {
    match which {
        "publish" => messaging::publish(&natsfn_guest::config_or("target", "secret.stuff"), &[], b"probe"),
        "request" => {
            messaging::request(&natsfn_guest::config_or("target", "secret.stuff"), &[], b"probe", 500).map(drop)
        }
        "wildcard" => messaging::publish("allowed.*", &[], b"probe"),
        "header" => publish_with_header("bad name", "v"),
        "header-value" => publish_with_header("x-probe", "bad\r\nvalue"),
        "empty" => messaging::publish("", &[], b"probe"),
        "kv-denied" => kv::get("secret", "k").map(drop),
        "kv-read-only" => kv::put("readonly", "k", b"v").map(drop),
        "kv-bad-key" => kv::put("writable", "bad key", b"v").map(drop),
        "kv-bad-bucket" => kv::put("bad.bucket", "k", b"v").map(drop),
        "kv-delete-read-only" => kv::delete("readonly", "k"),
        "kv-bad-filter" => kv::keys("writable", Some("a..b")).map(drop),
        "object-denied" => object::put("secret", "o", b"v").map(drop),
        "object-read-only" => object::put("objects-ro", "o", b"v").map(drop),
        "object-bad-name" => object::put("objects-rw", "", b"v").map(drop),
        "object-missing" => object::info("objects-rw", "missing").map(drop),
        "object-writer-denied" => object::open_writer("objects-ro", "o").map(drop),
        // Not a host error: the test itself sent something this guest doesn't know.
        other => Err(Error::Invalid(format!("unknown probe {other:?}"))),
    }
}

impl Guest for Forbidden {
    fn handle(msg: Message) -> HandleResult {
        let which = String::from_utf8_lossy(&msg.payload);
        match probe(which.trim()) {
            Ok(()) => natsfn_guest::reply("ok"),
            Err(err) => natsfn_guest::reply(describe(&err)),
        }
    }
}

natsfn_guest::export_handler!(Forbidden);
