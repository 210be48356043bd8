//! `outpost buffer stats|verify`: the outbox file read directly, on read-only connections
//! (safe while the daemon runs).

use std::path::Path;
use std::process::ExitCode;

use outpost_sync::outbox::{self, inspect};

use super::args::{BufferCommand, DataLocation};
use super::{EXIT_CONFIG, load_config};

pub fn buffer(command: BufferCommand, location: &DataLocation) -> ExitCode {
    let data_dir = match (&location.data_dir, &location.config) {
        (Some(dir), _) => dir.clone(),
        (None, config) => match load_config(config.as_deref()) {
            Ok(config) => config.data_dir(),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let path = data_dir.join(outbox::FILE_NAME);
    match command {
        BufferCommand::Stats { json } => match inspect::stats(&path) {
            Ok(stats) if json => {
                let dead = dead_letter_figures(&path);
                match serde_json::to_value(&stats) {
                    Ok(mut value) => {
                        value["dead_letters"] =
                            dead.map_or(serde_json::Value::Null, |d| d.0.into());
                        value["dead_letter_bytes"] =
                            dead.map_or(serde_json::Value::Null, |d| d.1.into());
                        print_json(&value)
                    }
                    Err(e) => {
                        eprintln!("outpost: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Ok(stats) => {
                let dead = dead_letter_figures(&path);
                print!(
                    "{}",
                    render_stats(&stats, dead, outpost_sync::outbox::now_unix_ms())
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
        BufferCommand::Verify { json } => match inspect::verify(&path) {
            Ok(report) => {
                if json {
                    let _ = print_json(&report);
                } else if report.problems.is_empty() {
                    println!("{}: ok", report.path.display());
                } else {
                    println!(
                        "{}: {} problem(s)",
                        report.path.display(),
                        report.problems.len()
                    );
                    for p in &report.problems {
                        println!("  {p}");
                    }
                }
                if report.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Records and bytes in the outbox's dead-letter table (schema 4; none in an older file), read
/// on a read-only connection like `inspect::stats`. `None` (with the error printed) when it
/// cannot be read: the other figures are still worth showing.
fn dead_letter_figures(path: &Path) -> Option<(u64, u64)> {
    let read = || -> rusqlite::Result<(u64, u64)> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let has_table: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'",
            [],
            |r| r.get(0),
        )?;
        if !has_table {
            return Ok((0, 0));
        }
        let (records, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((records.max(0) as u64, bytes.max(0) as u64))
    };
    match read() {
        Ok(figures) => Some(figures),
        Err(e) => {
            eprintln!(
                "outpost: reading the dead letters of {}: {e}",
                path.display()
            );
            None
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::FAILURE
        }
    }
}

fn render_stats(s: &inspect::Stats, dead: Option<(u64, u64)>, now_ms: i64) -> String {
    use std::fmt::Write;
    let age = |ms: Option<i64>| {
        ms.map_or_else(
            || "-".to_owned(),
            |ms| format!("{:.1}s", (now_ms - ms).max(0) as f64 / 1e3),
        )
    };
    let mut out = String::new();
    let _ = writeln!(out, "outbox:        {}", s.path.display());
    let _ = writeln!(out, "schema:        v{}", s.schema_version);
    let _ = writeln!(
        out,
        "outbox id:     {}",
        s.outbox_id
            .as_deref()
            .unwrap_or("- (assigned when the daemon next opens it)")
    );
    let _ = writeln!(out, "records:       {}", s.records);
    let _ = writeln!(out, "bytes:         {}", s.bytes);
    let _ = writeln!(out, "oldest age:    {}", age(s.oldest_received_ms));
    let _ = match dead {
        Some((0, _)) => writeln!(out, "dead letters:  0"),
        Some((records, bytes)) => writeln!(
            out,
            "dead letters:  {records} ({bytes} bytes; see `outpost dead-letters list`)"
        ),
        None => writeln!(out, "dead letters:  ? (unreadable)"),
    };
    let _ = writeln!(
        out,
        "sequence:      {}..{} (next {})",
        s.oldest_seq.map_or("-".into(), |v| v.to_string()),
        s.newest_seq.map_or("-".into(), |v| v.to_string()),
        s.next_seq
    );
    let _ = writeln!(
        out,
        "file bytes:    {} (+{} WAL)",
        s.file_bytes, s.wal_bytes
    );
    let _ = writeln!(out, "routes:");
    if s.routes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in &s.routes {
        let _ = writeln!(
            out,
            "  {:<20} priority {}  records {:>10}  bytes {:>12}  oldest age {}",
            r.route,
            r.priority,
            r.records,
            r.bytes,
            age(r.oldest_received_ms)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `outpost buffer stats` counts the dead-letter table on its own read-only connection.
    #[tokio::test]
    async fn buffer_stats_count_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (outbox, _, _writer) =
            crate::api::tests::outbox_with_dead_letters(dir.path(), 3, &[1], stop.clone()).await;
        let path = outbox.path().to_path_buf();
        let figures = dead_letter_figures(&path);
        assert_eq!(figures, Some(outbox.dead_letter_figures()));
        assert_eq!(figures.unwrap().0, 1);
        let stats = inspect::stats(&path).unwrap();
        let text = render_stats(&stats, figures, 0);
        let (_, bytes) = figures.unwrap();
        assert!(
            text.contains(&format!(
                "dead letters:  1 ({bytes} bytes; see `outpost dead-letters list`)"
            )),
            "{text}"
        );
        assert!(render_stats(&stats, Some((0, 0)), 0).contains("dead letters:  0\n"));
        assert!(render_stats(&stats, None, 0).contains("dead letters:  ? (unreadable)"));
        assert_eq!(dead_letter_figures(&dir.path().join("none.db")), None);
        stop.cancel();
    }
}
