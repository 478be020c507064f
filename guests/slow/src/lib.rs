//! `slow`: blocks for a configurable time before echoing, to test invocation
//! deadlines and concurrency limits. The per-message header wins over config
//! so one deployment can serve both fast and slow test cases.

use std::time::Duration;

use natsfn_guest::{acks, config, log, Guest, HandleResult, Message};

const DEFAULT_DELAY_MS: u64 = 100;

struct Slow;

fn delay_ms(msg: &Message) -> u64 {
    let from_header =
        msg.headers.iter().find(|(name, _)| name.eq_ignore_ascii_case("delay-ms")).map(|(_, value)| value.clone());
    from_header.or_else(|| config::get("delay_ms")).and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_DELAY_MS)
}

impl Guest for Slow {
    fn handle(msg: Message) -> HandleResult {
        let delay = delay_ms(&msg);
        // Lets a test see that this message is in flight.
        log::log(log::Level::Info, &format!("sleeping {delay} ms on {}", String::from_utf8_lossy(&msg.payload)));
        // On JetStream, signal progress every `progress_ms` while working,
        // so an ack wait shorter than the work does not cause a redelivery.
        let progress: u64 = config::get("progress_ms").and_then(|v| v.parse().ok()).unwrap_or(0);
        if msg.jetstream.is_some() && progress > 0 {
            let mut left = delay;
            while left > 0 {
                let step = left.min(progress);
                std::thread::sleep(Duration::from_millis(step));
                left -= step;
                let _ = acks::in_progress();
            }
        } else {
            std::thread::sleep(Duration::from_millis(delay));
        }
        natsfn_guest::reply(msg.payload)
    }
}

natsfn_guest::export_handler!(Slow);
