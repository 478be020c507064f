//! `fanout`: republishes each message to every subject in config `targets`,
//! to test outbound publishing and the publish permission list.

use natsfn_guest::messaging;
use natsfn_guest::{Guest, HandleResult, Message};

struct Fanout;

impl Guest for Fanout {
    fn handle(msg: Message) -> HandleResult {
        let targets = natsfn_guest::config_or("targets", "");
        let mut published = 0u32;
        for subject in targets.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            messaging::publish(subject, &msg.headers, &msg.payload).map_err(|err| natsfn_guest::fail(&err))?;
            published += 1;
        }
        natsfn_guest::reply(published.to_string())
    }
}

natsfn_guest::export_handler!(Fanout);
