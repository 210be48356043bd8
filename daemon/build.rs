//! Link settings of the `outpost` binary.
//!
//! With `OUTPOST_SYMBOL_ORDER` set to a file of symbol names (one per line), the binary is linked
//! with LLVM's lld, functions in that order first in the code section, and packed relative
//! relocations. `cross/build.sh` does this for the `dist` profile with the functions a start and
//! a few idle seconds ran, so that the code an idle daemon keeps mapped sits together instead of
//! on pages spread over the whole binary (docs/BENCHMARKS.md, "Idle RSS"). Without the variable
//! (every other build) the link is the toolchain's default.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_SYMBOL_ORDER");
    let Some(order) = env::var_os("OUTPOST_SYMBOL_ORDER").filter(|order| !order.is_empty()) else {
        return;
    };
    let order = PathBuf::from(order);
    println!("cargo:rerun-if-changed={}", order.display());

    // GNU ld 2.40 (Debian 12's, which the cross compilers use) cannot order symbols; the lld
    // that ships with the Rust toolchain can, for every target. gcc finds it as `ld.lld` in the
    // toolchain's gcc-ld directory, the same way rustc links with it on x86_64 by default.
    let gcc_ld = rustc_sysroot()
        .join("lib/rustlib")
        .join(env::var("HOST").expect("cargo sets HOST"))
        .join("bin/gcc-ld");
    println!("cargo:rustc-link-arg-bins=-B{}", gcc_ld.display());
    println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the recording saw but this link does not define (ld.so's, the C libraries'): fine.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR, glibc 2.36 = Debian 12, the oldest supported): the
    // table the dynamic loader reads at every start shrinks from ~400 KB to ~7 KB.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}

fn rustc_sysroot() -> PathBuf {
    let rustc = env::var_os("RUSTC").expect("cargo sets RUSTC");
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("rustc --print sysroot");
    assert!(output.status.success(), "rustc --print sysroot failed");
    PathBuf::from(
        String::from_utf8(output.stdout)
            .expect("UTF-8 sysroot")
            .trim(),
    )
}
