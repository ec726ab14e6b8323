//! Change gating: classify a frame only when the scene changed (or a heartbeat passed).

use std::time::{Duration, Instant};

use crate::frame::Pixels;

/// Change gating for one camera: classify a frame only when its thumbnail differs from
/// the last classified one by at least `threshold` (mean grey level, 0..255), or when
/// `heartbeat` has passed since. Comparing with the last *classified* frame, not the
/// previous one, means a slow drift still adds up to a change.
#[derive(Debug, Clone)]
pub struct Gate {
    threshold: f32,
    heartbeat: Duration,
    last: Option<(Vec<f32>, Instant)>,
}

impl Gate {
    pub fn new(threshold: f32, heartbeat: Duration) -> Self {
        Gate {
            threshold,
            heartbeat,
            last: None,
        }
    }

    /// Whether to classify `pixels` (captured `at`); remembered when so.
    pub fn admit(&mut self, pixels: &Pixels, at: Instant) -> bool {
        if self.threshold <= 0.0 {
            return true;
        }
        let thumb = pixels.thumbnail();
        let pass = match &self.last {
            None => true,
            Some((prev, t)) => {
                at.saturating_duration_since(*t) >= self.heartbeat
                    || change_score(prev, &thumb) >= self.threshold
            }
        };
        if pass {
            self.last = Some((thumb, at));
        }
        pass
    }
}

/// Mean absolute difference of two thumbnails, in grey levels.
pub fn change_score(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len().max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(level: f32) -> Pixels {
        Pixels {
            width: 32,
            height: 32,
            rgb: vec![level; 32 * 32 * 3],
        }
    }

    /// Data-driven: (seconds since start, grey level of the frame, classified?) with a
    /// threshold of 4 levels and a 10 s heartbeat.
    #[test]
    fn gate_passes_changes_and_heartbeats_only() {
        let steps: &[(u64, f32, bool)] = &[
            (0, 100.0, true),  // the first frame always
            (1, 101.0, false), // noise
            (2, 103.0, false), // drift: 3 levels from the last classified
            (3, 104.5, true),  // drift adds up past 4
            (4, 104.5, false),
            (14, 104.5, true), // heartbeat: 10 s since the last classified
            (15, 80.0, true),  // a real change
        ];
        let t0 = Instant::now();
        let mut g = Gate::new(4.0, Duration::from_secs(10));
        for &(t, level, want) in steps {
            let at = t0 + Duration::from_secs(t);
            assert_eq!(g.admit(&flat(level), at), want, "t={t} level={level}");
        }
        // Threshold 0: gating off, everything passes.
        let mut off = Gate::new(0.0, Duration::from_secs(10));
        assert!((0..5).all(|_| off.admit(&flat(1.0), t0)));
    }

    #[test]
    fn change_score_is_the_mean_absolute_difference() {
        assert_eq!(change_score(&[0.0, 10.0], &[4.0, 6.0]), 4.0);
        let a = flat(10.0).thumbnail();
        assert_eq!(a.len(), crate::frame::THUMB * crate::frame::THUMB);
        assert_eq!(change_score(&a, &flat(13.0).thumbnail()), 3.0);
    }
}
