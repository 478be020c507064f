//! `kvmirror`: triggered by a KV watch, applies every change of the watched
//! bucket to the bucket named by config `target`: puts, deletes and purges
//! alike, so the target ends up identical.

use natsfn_guest::types::KvOperation;
use natsfn_guest::{config_or, fail, kv, Guest, HandleResult, HandlerError, Message};

struct KvMirror;

impl Guest for KvMirror {
    fn handle(msg: Message) -> HandleResult {
        let Some(change) = &msg.kv else {
            return Err(HandlerError::Fail("kvmirror only handles KV-watch deliveries".into()));
        };
        let target = config_or("target", "mirror");
        let applied = match change.operation {
            KvOperation::Put => kv::put(&target, &change.key, &msg.payload).map(drop),
            KvOperation::Delete => kv::delete(&target, &change.key),
            KvOperation::Purge => kv::purge(&target, &change.key),
        };
        applied.map_err(|e| fail(&e))?;
        Ok(None)
    }
}

natsfn_guest::export_handler!(KvMirror);
