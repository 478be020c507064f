//! `kvcounter`: increments a counter in a KV bucket with compare-and-set,
//! retrying on `conflict`, so concurrent invocations never lose an update.
//! Replies with the new value. Config: `bucket` (default `counters`), `key`
//! (default `counter`).
//!
//! Two inspection commands let tests read the bucket through the guest API:
//! payload `keys <filter>` replies with the matching keys, sorted and
//! comma-separated; `history <key> <max>` replies with `revision=value` pairs.
//! `bench <n>` makes n puts and then n gets, for the KV benchmark.

use natsfn_guest::{config_or, fail, kv, Error, Guest, HandleResult, Message};

struct KvCounter;

/// One attempt: read, then write only if nobody wrote in between.
fn try_increment(bucket: &str, key: &str) -> Result<u64, Error> {
    match kv::get(bucket, key)? {
        None => kv::create(bucket, key, b"1").map(|_| 1),
        Some(entry) => {
            let current: u64 = String::from_utf8_lossy(&entry.value).parse().unwrap_or(0);
            kv::update(bucket, key, (current + 1).to_string().as_bytes(), entry.revision).map(|_| current + 1)
        }
    }
}

impl Guest for KvCounter {
    fn handle(msg: Message) -> HandleResult {
        let bucket = config_or("bucket", "counters");
        let command = String::from_utf8_lossy(&msg.payload).into_owned();
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["keys", filter] => {
                let mut keys = kv::keys(&bucket, Some(filter)).map_err(|e| fail(&e))?;
                keys.sort();
                return natsfn_guest::reply(keys.join(","));
            }
            ["history", key, max] => {
                let entries = kv::history(&bucket, key, max.parse().unwrap_or(10)).map_err(|e| fail(&e))?;
                let pairs: Vec<String> =
                    entries.iter().map(|e| format!("{}={}", e.revision, String::from_utf8_lossy(&e.value))).collect();
                return natsfn_guest::reply(pairs.join(","));
            }
            // For the benchmark: n puts, then n gets, one host call each.
            ["bench", n] => {
                let n: u32 = n.parse().unwrap_or(0);
                for i in 0..n {
                    kv::put(&bucket, &format!("bench.{i}"), b"0123456789abcdef").map_err(|e| fail(&e))?;
                }
                for i in 0..n {
                    kv::get(&bucket, &format!("bench.{i}")).map_err(|e| fail(&e))?;
                }
                return natsfn_guest::reply("ok");
            }
            _ => {}
        }
        let key = config_or("key", "counter");
        loop {
            match try_increment(&bucket, &key) {
                Ok(value) => return natsfn_guest::reply(value.to_string()),
                // Someone else won this round: read again and retry.
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(fail(&e)),
            }
        }
    }
}

natsfn_guest::export_handler!(KvCounter);
