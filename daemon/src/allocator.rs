//! The global allocator: mimalloc instead of glibc malloc.
//!
//! Under MQTT load every publish is allocated on a runtime worker and freed on the outbox
//! writer's thread; glibc serialises such cross-thread frees on its arena locks, which took a
//! quarter of the CPU time in profiles. mimalloc frees them without a lock (docs/BENCHMARKS.md,
//! "MQTT server": throughput and memory, both allocators).
//!
//! Its defaults suit a server with memory to spare, not a gateway: it commits arenas eagerly on
//! Linux and returns freed pages only after a delay *and* on a later allocator call, so memory
//! freed before the daemon goes quiet stays resident. Both are turned off here, before the
//! first allocation.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in mimalloc 3's `mi_option_e`
/// (include/mimalloc.h); `libmimalloc-sys` names only the options common to its versions.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Commit arena memory on demand and return freed pages to the kernel at once. Runs from the
/// ELF `.init_array`, before the Rust runtime allocates anything: mimalloc reads an option
/// when it first needs it, and the first allocation creates the first arena.
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE: extern "C" fn() = configure;

#[allow(unsafe_code)]
extern "C" fn configure() {
    for option in [ARENA_EAGER_COMMIT, PURGE_DELAY] {
        // SAFETY: mi_option_set only stores the value in mimalloc's option table; both ids are
        // valid options of the linked mimalloc version, and 0 is a documented value for each.
        unsafe {
            libmimalloc_sys::mi_option_set(option, 0);
        }
    }
}
