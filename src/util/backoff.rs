//! Capped exponential back-off: the one used by camera reopens, MQTT reconnects and the
//! outbox sender.

use std::time::Duration;

/// Capped exponential back-off: `min`, `2 min`, `4 min` ... up to `max`; `reset` after a
/// success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait now; doubles the next one, up to `max`.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// The delay [`step`](Self::step) would return, without advancing.
    pub fn peek(&self) -> Duration {
        self.next
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(1), s(5));
        let steps: Vec<Duration> = (0..5).map(|_| b.step()).collect();
        assert_eq!(steps, [s(1), s(2), s(4), s(5), s(5)]);
        b.reset();
        assert_eq!(b.step(), s(1));
        // A huge cap does not overflow.
        let mut big = Backoff::new(Duration::MAX / 2 + s(1), Duration::MAX);
        big.step();
        assert_eq!(big.step(), Duration::MAX);
    }
}
