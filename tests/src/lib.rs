//! Test support for the end-to-end tests: finding the `outpost` binary and the external tools
//! the tests drive. Missing prerequisites fail the test with the command that fixes it; a test
//! never skips silently.

pub mod admin;
pub mod coap;
pub mod daemon;
pub mod http;
pub mod kafka;
pub mod modbus;
pub mod mosquitto;
pub mod mqtt_raw;
pub mod mqtt_wire;
pub mod pty;
pub mod stunnel;
pub mod tls;

use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// How to install every external tool the tests use.
pub const SETUP_HINT: &str = "run `bash scripts/setup-test-deps.sh` (or `bash scripts/test.sh`, \
                              which runs it) to install the test dependencies";

/// The `outpost` binary under test: `$OUTPOST_BIN` if set, else `<target>/<profile>/outpost`
/// next to this test executable (`<target>/<profile>/deps/<test>-<hash>`).
///
/// Cargo does not build another package's binaries for a test run, so `cargo build --workspace
/// --bins` must run first (scripts/test.sh does). Panics with that advice if the binary is missing.
pub fn outpost_bin() -> PathBuf {
    if let Some(bin) = env::var_os("OUTPOST_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "OUTPOST_BIN={} is not an executable file",
            bin.display()
        );
        return bin;
    }
    let exe =
        env::current_exe().unwrap_or_else(|e| panic!("cannot locate the test executable: {e}"));
    let mut dir = exe.parent().unwrap_or_else(|| Path::new("/"));
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let bin = dir.join(format!("outpost{}", env::consts::EXE_SUFFIX));
    assert!(
        is_executable(&bin),
        "the outpost binary is not built: expected {}. Run `cargo build --workspace --bins` \
         first (scripts/test.sh does), or point OUTPOST_BIN at a binary",
        bin.display()
    );
    bin
}

/// The path of `name` on `$PATH`. Panics with [`SETUP_HINT`] if it is not installed.
pub fn require_command(name: &str) -> PathBuf {
    find_command(name).unwrap_or_else(|| panic!("`{name}` is not installed: {SETUP_HINT}"))
}

/// The path of `name` on `$PATH`, if it is there.
pub fn find_command(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// This package's directory, as the test runner reports it when the test runs (cargo and
/// nextest set it): a test binary reused from a build in another checkout must not read that
/// checkout's files, which may be gone.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
