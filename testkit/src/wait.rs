//! Polling with a limit: wait until a condition holds, or fail naming what was awaited.
//! Tokio's clock, so paused-time tests work.

use std::future::Future;
use std::time::Duration;

/// How often the helpers here poll.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls the async predicate `f` every [`POLL`] until it holds, or panics naming `what`
/// after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` every [`POLL`] until it returns `Some`, or panics naming `what` after `secs`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_until_returns_once_it_holds() {
        let mut n = 0;
        wait_until("three polls", Duration::from_secs(1), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for never")]
    async fn wait_until_fails_naming_what() {
        wait_until("never", Duration::from_secs(1), || async { false }).await;
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_returns_the_value() {
        let mut n = 0;
        let v = eventually(1, "a value", || {
            n += 1;
            (n == 4).then_some(n * 10)
        })
        .await;
        assert_eq!(v, 40);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for: nothing")]
    async fn eventually_fails_naming_what() {
        eventually(1, "nothing", || None::<()>).await;
    }
}
