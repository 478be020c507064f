//! `attacker`: a hostile tenant's handler. The payload picks the attack;
//! tests run each beside a well-behaved handler of another tenant and check
//! that the host stops the attack and the neighbour does not notice.
//!
//! - `spin`: an endless loop (stopped by the deadline, or by fuel).
//! - `membomb`: grows memory until refused (the allocator then aborts).
//! - `flood`: publishes as fast as it can until the host refuses; replies
//!   with the refusal.
//! - `bigpayload`: publishes a 64 MiB payload; replies with the refusal.
//! - `recurse`: unbounded recursion (stack overflow).
//! - `logflood`: writes 10,000 log lines and 10,000 stdout lines, then
//!   replies `logged`.
//! - `hold MB MS`: holds MB MiB for MS milliseconds, then replies `held`
//!   (to fill a tenant's shared memory budget).
//! - `selfrequest`: requests its own subject in a loop, so every invocation
//!   spawns another; replies with the first error it gets.
//!
//! Refusals are replies, not failures, so a test sees the exact error the
//! guest was given.

use std::hint::black_box;

use natsfn_guest::{describe, messaging, Guest, HandleResult, HandlerError, Message};

struct Attacker;

fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = black_box(x.wrapping_add(1));
    }
}

fn membomb() -> HandleResult {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used.
        hoard.push(black_box(vec![1u8; 1 << 20]));
    }
}

fn flood(subject: &str) -> HandleResult {
    let mut sent: u64 = 0;
    loop {
        if let Err(e) = messaging::publish(subject, &[], b"flood") {
            return natsfn_guest::reply(format!("after {sent} publishes: {}", describe(&e)));
        }
        sent += 1;
    }
}

fn bigpayload(subject: &str) -> HandleResult {
    let payload = vec![7u8; 64 << 20];
    match messaging::publish(subject, &[], &payload) {
        Ok(()) => natsfn_guest::reply("sent"),
        Err(e) => natsfn_guest::reply(describe(&e)),
    }
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    // black_box keeps the frame (and the recursion) from being optimised
    // into a loop.
    black_box(recurse(black_box(depth + 1)) + depth)
}

fn selfrequest(subject: &str) -> HandleResult {
    loop {
        match messaging::request(subject, &[], b"selfrequest", 60_000) {
            Ok(_) => {}
            Err(e) => return natsfn_guest::reply(describe(&e)),
        }
    }
}

fn hold(args: &str) -> HandleResult {
    let mut args = args.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
    let (mb, ms) = (args.next().unwrap_or(0), args.next().unwrap_or(0));
    let held = black_box(vec![1u8; (mb << 20) as usize]);
    std::thread::sleep(std::time::Duration::from_millis(ms));
    drop(held);
    natsfn_guest::reply("held")
}

impl Guest for Attacker {
    fn handle(msg: Message) -> HandleResult {
        let out = natsfn_guest::config_or("out", "attack.out");
        let payload = String::from_utf8_lossy(&msg.payload);
        if let Some(args) = payload.strip_prefix("hold ") {
            return hold(args);
        }
        match payload.trim() {
            "spin" => spin(),
            "membomb" => membomb(),
            "flood" => flood(&out),
            "bigpayload" => bigpayload(&out),
            "recurse" => natsfn_guest::reply(recurse(0).to_string()),
            "logflood" => {
                for i in 0..10_000 {
                    natsfn_guest::log::log(natsfn_guest::log::Level::Info, &format!("flood {i}"));
                    println!("flood {i}");
                }
                natsfn_guest::reply("logged")
            }
            "selfrequest" => selfrequest(&msg.subject),
            other => Err(HandlerError::Fail(format!("unknown attack {other:?}"))),
        }
    }
}

natsfn_guest::export_handler!(Attacker);
