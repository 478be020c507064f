//! The runtime a `#![no_std]` natsfn handler needs, in one dependency:
//! a global allocator, a panic handler, and the `cabi_realloc` export the
//! component model lowers arguments through (with `std`, wasi-libc
//! provides all three).
//!
//! Why bother: a guest built with Rust's standard library imports about
//! twenty WASI functions (stdio, environment, exit) whether it uses them or
//! not, and wit-component wraps those that take the guest's memory in two
//! extra core modules. wasmtime instantiates all of that for every fresh
//! instance; without it, instantiation takes about 40 % of the time
//! (BENCHMARKS.md, "Bare guests"). The price is no `std`: `alloc`'s
//! `Vec`, `String` and `format!` are there, files, clocks and printing
//! are not (natsfn's `log` interface is).
//!
//! ```ignore
//! #![no_std]
//! extern crate alloc;
//! use natsfn_guest::{Guest, HandleResult, Message};
//! use natsfn_guest_bare as _; // links the allocator and panic handler
//! ```
//!
//! A panic traps the instance (`unreachable`): the host reports it as a
//! failed invocation, as it does a `std` guest's panic, without the message.

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

use dlmalloc::{Allocator, Dlmalloc};

/// Bytes of zeroed memory reserved in the module's own data (`.bss`), so
/// the first allocations of every fresh instance need no `memory.grow`:
/// growing costs the host an `mprotect` per instance and another to
/// undo it when the instance is dropped. Pages of it the guest never
/// touches cost nothing; larger messages grow the memory as usual.
const ARENA_BYTES: usize = 256 * 1024;

/// The module's own first heap segment, handed to dlmalloc once.
#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));

/// dlmalloc's source of memory: [`ARENA`] first, then `memory.grow`.
struct System {
    arena_given: UnsafeCell<bool>,
}

/// A wasm page.
const PAGE: usize = 64 * 1024;

/// The allocator as the global one. A wasm32-wasip2 component has one
/// thread, so the `UnsafeCell`s are never touched concurrently; the
/// compile-time check below keeps it that way.
struct Global(UnsafeCell<Dlmalloc<System>>);

#[cfg(target_feature = "atomics")]
compile_error!("natsfn-guest-bare's allocator assumes a single-threaded guest");

// SAFETY: single-threaded target (checked above); see `Global`.
unsafe impl Sync for Arena {}
// SAFETY: as for `Arena`.
unsafe impl Sync for Global {}

#[global_allocator]
static GLOBAL: Global =
    Global(UnsafeCell::new(Dlmalloc::new_with_allocator(System { arena_given: UnsafeCell::new(false) })));

// SAFETY: dlmalloc upholds `GlobalAlloc`'s contract; the cell is only used
// from the one thread.
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { (*self.0.get()).malloc(layout.size(), layout.align()) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { (*self.0.get()).calloc(layout.size(), layout.align()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { (*self.0.get()).free(ptr, layout.size(), layout.align()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}

// SAFETY: hands out the arena at most once, then fresh pages from
// `memory.grow`; nothing is ever given back (wasm memories do not shrink).
unsafe impl Allocator for System {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        // SAFETY: single-threaded (see `Global`).
        let given = unsafe { &mut *self.arena_given.get() };
        if !*given && size <= ARENA_BYTES {
            *given = true;
            return (ARENA.0.get().cast(), ARENA_BYTES, 0);
        }
        let pages = size.div_ceil(PAGE);
        match core::arch::wasm32::memory_grow(0, pages) {
            usize::MAX => (ptr::null_mut(), 0, 0),
            // The new pages start where the memory used to end; a 32-bit
            // memory can never reach the top of the address space, so
            // the region does not wrap.
            old_pages => ((old_pages * PAGE) as *mut u8, pages * PAGE, 0),
        }
    }

    fn remap(&self, _: *mut u8, _: usize, _: usize, _: bool) -> *mut u8 {
        ptr::null_mut()
    }

    fn free_part(&self, _: *mut u8, _: usize, _: usize) -> bool {
        false
    }

    fn free(&self, _: *mut u8, _: usize) -> bool {
        false
    }

    fn can_release_part(&self, _: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        // The arena is `.bss`, zero in a new instance, and given out once.
        true
    }

    fn page_size(&self) -> usize {
        PAGE
    }
}

/// The canonical ABI's allocation hook: arguments and results that live
/// in the guest's memory (strings, lists) are placed through it.
///
/// # Safety
/// Called by the host per the canonical ABI: `old_ptr`/`old_len`/`align`
/// describe an allocation made through this function, or `old_len` is 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    if new_len == 0 {
        // Zero-sized: any well-aligned, non-null pointer will do.
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two `align`, and
    // `old_ptr` came from this allocator with this layout.
    let ptr = unsafe {
        if old_len == 0 {
            GLOBAL.alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            GLOBAL.realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
        }
    };
    if ptr.is_null() {
        // Out of memory (the tenant's limit or the pool's): trap, as
        // the host's limiter expects.
        core::arch::wasm32::unreachable();
    }
    ptr
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
