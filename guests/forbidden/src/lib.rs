//! `forbidden`: makes host calls that should be refused, one per payload, and
//! replies with how the host refused it, so tests can assert on the exact
//! error rather than on a generic failure.

use natsfn_guest::{describe, messaging, Error, Guest, HandleResult, Header, Message};

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
