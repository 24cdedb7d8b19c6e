//! Exit codes. They are part of the interface (scripts and probes branch on them), so they are
//! named here once and listed in every `--help` ([`crate::cli::EXIT_CODES`]).

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// Everything fine.
    Ok,
    /// A check found a problem, or a rotation failed.
    CheckFailed,
    /// Usage or runtime error. clap exits with 2 on usage errors itself.
    Error,
    /// A rotation was refused because one is already pending.
    Refused,
    /// A rotation did not finish in time.
    TimedOut,
}

impl Exit {
    pub const fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::CheckFailed => 1,
            Self::Error => 2,
            Self::Refused => 3,
            Self::TimedOut => 4,
        }
    }

    /// The exit status of several outcomes together: the most serious one, where a failure
    /// outranks a refusal and a refusal a timeout (a failure needs attention, a timeout may
    /// only need patience).
    pub fn worst(self, other: Self) -> Self {
        let rank = |e: Self| match e {
            Self::Ok => 0,
            Self::TimedOut => 1,
            Self::Refused => 2,
            Self::CheckFailed => 3,
            Self::Error => 4,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        Self::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones() {
        let all = [
            (Exit::Ok, 0),
            (Exit::CheckFailed, 1),
            (Exit::Error, 2),
            (Exit::Refused, 3),
            (Exit::TimedOut, 4),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            assert!(
                crate::cli::EXIT_CODES.contains(&format!("  {code}  ")),
                "{code} undocumented"
            );
        }
    }

    #[test]
    fn the_worst_outcome_wins() {
        assert_eq!(Exit::Ok.worst(Exit::TimedOut), Exit::TimedOut);
        assert_eq!(Exit::TimedOut.worst(Exit::CheckFailed), Exit::CheckFailed);
        assert_eq!(Exit::CheckFailed.worst(Exit::Refused), Exit::CheckFailed);
        assert_eq!(Exit::Refused.worst(Exit::Ok), Exit::Refused);
    }
}
