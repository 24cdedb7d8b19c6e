//! `eventually`: poll a check until it passes or a deadline passes. Scenarios never assert after
//! a fixed sleep; they state what they wait for, and the reason ends up in the error.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

/// Env var scaling every timeout (e.g. `WGMESH_TEST_PATIENCE=3` on a slow CI machine).
pub const ENV_PATIENCE: &str = "WGMESH_TEST_PATIENCE";

/// The timeout `Testbed::eventually` uses.
pub const DEFAULT_EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The patience factor from `WGMESH_TEST_PATIENCE` (default 1, at least 0.1).
pub fn patience() -> f64 {
    std::env::var(ENV_PATIENCE)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| p.is_finite())
        .map_or(1.0, |p| p.max(0.1))
}

/// `timeout` scaled by the patience factor.
pub fn scaled(timeout: Duration) -> Duration {
    timeout.mul_f64(patience())
}

/// Calls `check` until it returns `Ok`, at most until `timeout` (scaled by
/// `WGMESH_TEST_PATIENCE`) has passed. The first attempt is immediate; then it polls every 50 ms,
/// backing off to 500 ms. The error names `reason` and carries the last failure.
pub fn eventually<T>(
    reason: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let timeout = scaled(timeout);
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(anyhow!(
                    "timed out after {:.1}s ({attempts} attempts) waiting until {reason}",
                    start.elapsed().as_secs_f64()
                )));
            }
            Err(_) => {
                let left = timeout.saturating_sub(start.elapsed());
                thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use anyhow::bail;

    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut n = 0;
        let v = eventually("n reaches 3", Duration::from_secs(5), || {
            n += 1;
            if n < 3 { bail!("n is {n}") } else { Ok(n) }
        })
        .expect("reaches 3");
        assert_eq!(v, 3);
    }

    #[test]
    fn times_out_with_reason_and_last_error() {
        let err = eventually("pigs fly", Duration::from_millis(120), || -> Result<()> {
            bail!("pigs are on the ground")
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("waiting until pigs fly"), "{msg}");
        assert!(msg.contains("pigs are on the ground"), "{msg}");
    }
}
