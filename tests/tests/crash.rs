//! Acknowledged means durable: appends whose futures completed survive `kill -9` of the process at
//! random moments. A child process appends under load from many tasks and prints each completed
//! append; it is killed with SIGKILL after a random delay; the outbox is then reopened and every
//! printed append must be there, with the same sequence number, none twice, and each appender's
//! records in order and gap-free.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_sync::OutboxReader;
use outpost_sync::outbox::inspect;
use rand::RngExt;

const CYCLES: u32 = 25;
const APPENDERS: u32 = 64;

/// `(run, appender, counter)` parsed from a payload.
fn key(payload: &[u8]) -> (u32, u32, u64) {
    let text = std::str::from_utf8(payload).unwrap();
    let mut it = text.split(' ');
    let mut next = || it.next().unwrap();
    (
        next().parse().unwrap(),
        next().parse().unwrap(),
        next().parse().unwrap(),
    )
}

#[test]
fn serial_completed_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    // Every append a child reported complete, over all cycles: key -> seq.
    let mut promised: HashMap<(u32, u32, u64), u64> = HashMap::new();
    let mut rng = rand::rng();
    for run in 0..CYCLES {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-crash-child"))
            .arg(&path)
            .arg(APPENDERS.to_string())
            .arg(run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (started, ready) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in stdout.lines().map_while(Result::ok) {
                if lines.is_empty() {
                    let _ = started.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Wait until it runs (opening replays the WAL and checks the file, which takes a while
        // on a loaded machine; a kill before that would test nothing), then a random while.
        let _ = ready.recv_timeout(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(rng.random_range(50..600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert_eq!(
            lines.first().map(String::as_str),
            Some("ready"),
            "child did not start"
        );
        for line in &lines[1..] {
            let parts: Vec<&str> = line.split(' ').collect();
            // The last line may be cut by the kill.
            if let [a, c, seq] = parts[..]
                && let (Ok(a), Ok(c), Ok(seq)) = (a.parse(), c.parse(), seq.parse())
            {
                promised.insert((run, a, c), seq);
            }
        }

        let stored = OutboxReader::open(&path).unwrap().read_all().unwrap();
        let mut by_key: HashMap<(u32, u32, u64), u64> = HashMap::new();
        let mut per_appender: BTreeMap<(u32, u32), Vec<(u64, u64)>> = BTreeMap::new();
        let mut seqs = HashSet::new();
        for r in &stored {
            let k = key(&r.payload);
            assert!(
                by_key.insert(k, r.seq).is_none(),
                "record {k:?} stored twice"
            );
            assert!(seqs.insert(r.seq), "sequence {} used twice", r.seq);
            per_appender
                .entry((k.0, k.1))
                .or_default()
                .push((r.seq, k.2));
        }
        for (k, seq) in &promised {
            assert_eq!(
                by_key.get(k),
                Some(seq),
                "run {run}: completed append {k:?} (seq {seq}) missing or moved after kill -9"
            );
        }
        for ((r, a), mut records) in per_appender {
            records.sort_unstable();
            let counters: Vec<u64> = records.iter().map(|(_, c)| *c).collect();
            let expected: Vec<u64> = (0..counters.len() as u64).collect();
            assert_eq!(
                counters, expected,
                "run {r} appender {a}: out of order or with gaps"
            );
        }
        let report = inspect::verify(&path).unwrap();
        assert!(
            report.problems.is_empty(),
            "run {run}: {:?}",
            report.problems
        );
    }
    assert!(
        promised.len() > 20_000,
        "too little load to mean anything: {} appends",
        promised.len()
    );
}
