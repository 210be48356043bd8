//! The global allocator: mimalloc instead of glibc malloc, for the Rust code *and* the C
//! libraries (librdkafka, SQLite, OpenSSL, zstd): libmimalloc-sys's `override` feature defines
//! `malloc`, `free` and the rest in the executable, which glibc supports ("Replacing malloc" in
//! its manual).
//!
//! Why: under MQTT load every publish is allocated on a runtime worker and freed on the outbox
//! writer's thread; glibc serialises such cross-thread frees on its arena locks, which took a
//! quarter of the CPU time in profiles. mimalloc frees them without a lock (docs/BENCHMARKS.md,
//! "MQTT server"). librdkafka does the same with every forwarded record: about a dozen blocks
//! allocated by the pump's thread and freed a batch later by the polling thread, a fifth of the
//! daemon's CPU in a backlog drain under glibc (docs/BENCHMARKS.md, "A rate-limited backlog
//! drain").
//!
//! Its defaults suit a server with memory to spare, not a gateway:
//! - It commits arenas eagerly on Linux: turned off here, before the first allocation.
//! - It returns freed pages to the kernel after a delay (`purge_delay`, 10 ms; 100 ms for arena
//!   ranges), and only on a later allocator call of a thread that owns them: memory freed
//!   before the daemon goes quiet would stay resident. The delay itself is kept: purging at
//!   once made librdkafka's zstd workspace (created and freed for every compressed batch) fault
//!   in again each time. Instead [`collect_periodically`] forces a collection once a second.
//!
//! An operator's own `MIMALLOC_ARENA_EAGER_COMMIT` / `MIMALLOC_PURGE_DELAY` environment
//! settings win over these.

use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in mimalloc 3's `mi_option_e`
/// (include/mimalloc.h); `libmimalloc-sys` names only the options common to its versions.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How often [`collect_periodically`] returns freed memory to the kernel.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Commit arena memory on demand. Runs from the ELF `.init_array`, before the Rust runtime
/// allocates anything: mimalloc reads an option when it first needs it, and the first
/// allocation creates the first arena.
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE: extern "C" fn() = configure;

#[allow(unsafe_code)]
unsafe extern "C" {
    /// The C library's `getenv`: it allocates nothing, where `std::env::var_os` would.
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

#[allow(unsafe_code)]
extern "C" fn configure() {
    // SAFETY: getenv reads the environment the loader set up; mi_option_set only stores the
    // value in mimalloc's option table; the id is a valid option of the linked mimalloc
    // version, and 0 a documented value for it.
    unsafe {
        if getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        }
    }
}

/// Returns freed memory to the kernel once a second, also when the daemon makes no allocator
/// call of its own (idle). Runs on the runtime's workers (the task moves between them), so
/// each worker's own heap is collected too. Forced: every free range is purged, not only those
/// past their delay; a range about to be reused costs its page faults at most once a second.
/// Nothing to do with no delay (an operator's `MIMALLOC_PURGE_DELAY=0`: purged at once).
pub async fn collect_periodically() {
    #[allow(unsafe_code)]
    // SAFETY: reads mimalloc's option table.
    let delay = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
    if delay <= 0 {
        return;
    }
    let mut every = tokio::time::interval(COLLECT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        #[allow(unsafe_code)]
        // SAFETY: collects the calling thread's heap and the process's arenas; no pointer is
        // involved.
        unsafe {
            libmimalloc_sys::mi_collect(true);
        }
    }
}
