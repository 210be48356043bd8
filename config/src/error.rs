//! What can go wrong loading a configuration, and how each problem names its key.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a configuration, located by its key path (`outbox.max_bytes`,
/// `routes[1].when_full`, `drivers[0].interval`; array indices count from 0 in file order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path of the offending key, as written in the file.
    pub path: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a configuration could not be loaded. The daemon refuses to start on any of these; the
/// operator fixes the file (or its permissions) and restarts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: check the path and its permissions.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The text is not TOML; nothing else can be checked until this is fixed.
    #[error("invalid TOML{}: {message}", in_file(path.as_deref()))]
    Syntax {
        /// The file, when loaded from one.
        path: Option<PathBuf>,
        /// The parser's message, starting with `line L, column C:`.
        message: String,
    },
    /// The TOML is well formed but some keys are unknown, mistyped or out of range. Every
    /// problem found is listed; fix them all before retrying.
    #[error("{}", invalid_summary(path.as_deref(), problems))]
    Invalid {
        /// The file, when loaded from one.
        path: Option<PathBuf>,
        /// Every problem, sorted by key path.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`] error; empty for the other variants.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            Self::Read { .. } | Self::Syntax { .. } => &[],
        }
    }

    /// Attaches the file the configuration came from.
    pub(crate) fn in_file(self, file: &Path) -> Self {
        match self {
            Self::Syntax { message, .. } => Self::Syntax {
                path: Some(file.to_owned()),
                message,
            },
            Self::Invalid { problems, .. } => Self::Invalid {
                path: Some(file.to_owned()),
                problems,
            },
            read @ Self::Read { .. } => read,
        }
    }
}

fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn invalid_summary(path: Option<&Path>, problems: &[Problem]) -> String {
    let count = problems.len();
    let noun = if count == 1 { "problem" } else { "problems" };
    let mut out = format!("{count} {noun} in config{}:", in_file(path));
    for problem in problems {
        out.push_str("\n  ");
        out.push_str(&problem.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lists_every_problem_one_per_line() {
        let err = ConfigError::Invalid {
            path: Some(PathBuf::from("/etc/outpost.toml")),
            problems: vec![
                Problem {
                    path: "a.b".into(),
                    message: "bad".into(),
                },
                Problem {
                    path: "c".into(),
                    message: "worse".into(),
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "2 problems in config in /etc/outpost.toml:\n  a.b: bad\n  c: worse"
        );
        assert_eq!(err.problems().len(), 2);
    }
}
