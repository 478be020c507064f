//! The virtual address space the instance pool reserves, and telling a user
//! why reserving it failed.
//!
//! The pooling allocator maps every memory slot it may ever hand out when
//! the engine is built: 4 GiB plus a guard page region per slot, so that
//! compiled guests need no bounds checks on 32-bit memories. Almost none of
//! it becomes resident, but it all counts against `RLIMIT_AS` (`ulimit -v`,
//! some container runtimes), and the memory pool is one mapping,
//! so it must fit in one free range of the process's address space (47 bits
//! on x86-64 Linux, split by the program, the heap and the libraries).
//! wasmtime's own error for either ("mmap failed to reserve 0x28502000000
//! bytes") names neither the limit nor the setting that sizes the pool, so
//! the engine reports [`Shortfall`] instead, with a max_instances that fits.
//! (valgrind keeps its own, smaller address space and refuses the mapping
//! with EINVAL; neither limit here explains that, so wasmtime's error is
//! passed on as it is.)

use std::fmt;

/// Address space each pooled memory slot reserves. These are wasmtime's
/// defaults on 64-bit hosts, set explicitly so that [`pool_bytes`] stays
/// right if the defaults change.
pub(super) const MEMORY_RESERVATION: u64 = 4 << 30;
/// Guard region after each memory slot (see [`MEMORY_RESERVATION`]).
pub(super) const MEMORY_GUARD: u64 = 32 << 20;
/// Linear memories a component may have. Rust guests have one; the room
/// for a second costs address space only.
pub(super) const MEMORIES_PER_COMPONENT: u32 = 2;

/// The top of a user process's address space on x86-64 Linux without
/// 5-level paging hints (47 bits); aarch64 with 48-bit addresses has more,
/// which only makes the estimate conservative.
const ADDRESS_SPACE_END: u64 = 1 << 47;
/// The lowest address mmap hands out by default (`vm.mmap_min_addr`).
const ADDRESS_SPACE_START: u64 = 1 << 16;

/// A bound on what one instance slot reserves besides its memories: 16
/// core instances' state of up to 1 MiB each, 16 tables of 20 000 elements,
/// the component instance (1 MiB) and a 2 MiB async stack come to about
/// 24 MiB.
const OTHER_PER_SLOT: u64 = 32 << 20;

/// Bytes the pool reserves for `slots` instance slots, nearly all of it
/// for their memories.
pub(super) fn pool_bytes(slots: u32) -> u64 {
    let memories = u64::from(MEMORIES_PER_COMPONENT) * (MEMORY_RESERVATION + MEMORY_GUARD);
    u64::from(slots) * (memories + OTHER_PER_SLOT)
}

/// What stopped a pool of `reserve` bytes ([`pool_bytes`], with `standby`
/// slots on top of max_instances) from being reserved, judged after it failed: the
/// process's `RLIMIT_AS` when what is mapped already plus the pool exceeds
/// it, else the address space when the pool is larger than its largest free
/// range. `None` when neither explains the failure.
pub(super) fn shortfall(reserve: u64, standby: u32) -> Option<Shortfall> {
    let mapped = Mapped::read();
    let (limit, room) = match rlimit_as() {
        Some(bytes) if mapped.total.saturating_add(reserve) > bytes => {
            (Limit::Rlimit(bytes), bytes.saturating_sub(mapped.total))
        }
        _ if reserve > mapped.largest_free => (Limit::FreeRange(mapped.largest_free), mapped.largest_free),
        _ => return None,
    };
    let slots_that_fit = u32::try_from(room / pool_bytes(1)).unwrap_or(u32::MAX);
    let max_instances_that_fit = slots_that_fit.checked_sub(standby).filter(|&n| n > 0);
    Some(Shortfall { limit, max_instances_that_fit, smallest_pool: pool_bytes(standby + 1) })
}

/// Why the pool's reservation failed, and what would make it fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// The limit the reservation ran into.
    pub limit: Limit,
    /// The largest max_instances whose pool would fit under the limit, if
    /// even one does.
    pub max_instances_that_fit: Option<u32>,
    /// Bytes the pool needs with max_instances 1.
    pub smallest_pool: u64,
}

/// A limit on the address space a process may map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The process's address-space limit (`RLIMIT_AS`), in bytes.
    Rlimit(u64),
    /// The largest free range of the process's address space, in bytes:
    /// the pool's memories are one mapping.
    FreeRange(u64),
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only an rlimit can be raised; a free range is what the process's
        // own mappings leave.
        let raise = match self.limit {
            Limit::Rlimit(bytes) => {
                write!(
                    f,
                    "this process may map only {} (its address-space limit, RLIMIT_AS, as set by `ulimit -v` \
                     or a container runtime)",
                    Gib(bytes)
                )?;
                " or raise the limit"
            }
            Limit::FreeRange(bytes) => {
                write!(f, "the largest free range of this process's address space is {}", Gib(bytes))?;
                ""
            }
        };
        match self.max_instances_that_fit {
            Some(n) => write!(
                f,
                ": lower max_instances to at most {n}{raise} (max_instances is --max-instances or the host \
                 config's `max_instances`; tenants' `max_instances` shares must fit in it too)"
            ),
            None if matches!(self.limit, Limit::FreeRange(_)) => {
                write!(f, ": even max_instances 1 needs {}", Gib(self.smallest_pool))
            }
            None => write!(
                f,
                ": even max_instances 1 needs {}, so raise the limit well above that",
                Gib(self.smallest_pool)
            ),
        }
    }
}

/// Bytes shown in GiB, rounded up, so a reservation is never understated.
pub(super) struct Gib(pub(super) u64);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} GiB", self.0.div_ceil(1 << 30))
    }
}

/// The soft `RLIMIT_AS`, or `None` when unlimited.
fn rlimit_as() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The process's address space as `/proc/self/maps` shows it.
struct Mapped {
    /// Bytes mapped (what `RLIMIT_AS` counts).
    total: u64,
    /// The largest range below [`ADDRESS_SPACE_END`] that nothing maps.
    largest_free: u64,
}

impl Mapped {
    /// Reads `/proc/self/maps`; where it cannot be read (not Linux), nothing
    /// is taken to be mapped.
    fn read() -> Mapped {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        Mapped::parse(&maps)
    }

    fn parse(maps: &str) -> Mapped {
        let mut ranges: Vec<(u64, u64)> = maps
            .lines()
            .filter_map(|line| {
                let (start, end) = line.split_whitespace().next()?.split_once('-')?;
                Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?))
            })
            .collect();
        ranges.sort_unstable();
        let total = ranges.iter().map(|(start, end)| end.saturating_sub(*start)).sum();
        let mut largest_free = 0;
        let mut free_from = ADDRESS_SPACE_START;
        for (start, end) in ranges.into_iter().chain([(ADDRESS_SPACE_END, ADDRESS_SPACE_END)]) {
            let start = start.min(ADDRESS_SPACE_END);
            largest_free = largest_free.max(start.saturating_sub(free_from));
            free_from = free_from.max(end);
        }
        Mapped { total, largest_free }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_four_gib_and_a_guard_per_memory() {
        assert_eq!(pool_bytes(320), 640 * ((4 << 30) + (32 << 20)) + 320 * (32 << 20));
        assert_eq!(Gib(pool_bytes(320)).to_string(), "2590 GiB");
        assert_eq!(Gib(1).to_string(), "1 GiB");
    }

    #[test]
    fn a_pool_larger_than_any_free_range_says_what_fits() {
        // Only when RLIMIT_AS is unlimited, as it is for tests run normally;
        // with a limit the rlimit is (correctly) what gets blamed.
        if rlimit_as().is_none() {
            let short = shortfall(pool_bytes(20_064), 64).expect("160 TiB cannot be mapped");
            let Limit::FreeRange(free) = short.limit else { panic!("{short:?}") };
            let fit = short.max_instances_that_fit.expect("some pool fits");
            assert!(pool_bytes(fit + 64) <= free && pool_bytes(fit + 65) > free, "{fit} in {free}");
            let text = short.to_string();
            assert!(text.contains(&format!("lower max_instances to at most {fit} (")), "{text}");
            assert!(!text.contains("raise the limit"), "{text}");
            assert_eq!(shortfall(pool_bytes(72), 64), None);
        }
    }

    #[test]
    fn the_largest_free_range_is_between_mappings_or_above_them() {
        let maps = "555555554000-555555556000 r-xp 00000000 08:01 1 /bin/x\n\
                    7ffff7dd0000-7ffff7e00000 rw-p 00000000 00:00 0\n\
                    555555556000-555555560000 rw-p 00000000 00:00 0 [heap]\n";
        let mapped = Mapped::parse(maps);
        assert_eq!(mapped.total, 0x2000 + 0x30000 + 0xa000);
        assert_eq!(mapped.largest_free, 0x555555554000 - ADDRESS_SPACE_START);
        let mapped = Mapped::parse("10000-20000 r--p 0 0:0 0\n");
        assert_eq!(mapped.largest_free, ADDRESS_SPACE_END - 0x20000);
        assert_eq!(Mapped::parse("").largest_free, ADDRESS_SPACE_END - ADDRESS_SPACE_START);
    }

    #[test]
    fn a_limit_too_small_for_any_pool_says_to_raise_it() {
        let short =
            Shortfall { limit: Limit::Rlimit(4 << 30), max_instances_that_fit: None, smallest_pool: pool_bytes(65) };
        let text = short.to_string();
        for needle in ["may map only 4 GiB", "ulimit -v", "even max_instances 1 needs 527 GiB", "raise the limit"] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
    }
}
