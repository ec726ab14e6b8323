//! Detection events from per-frame class scores: pure, no I/O, no clock of its own (the
//! frame's capture time is the clock, so tests replay any timeline).
//!
//! Per camera and label: a detection *starts* when the label's score is at or above its
//! threshold for `min_frames` consecutive classified frames, *updates* at most every
//! `update_interval` while it lasts, and *ends* after `end_frames` consecutive frames below
//! `threshold - hysteresis`. The gap between the two levels is what keeps a noisy score
//! from flapping: once started, a detection survives dips into the band, and it takes
//! several frames clearly below to end it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::config::{ConfigError, Settings};

/// Validated `[detection]` settings, with labels already resolved to class indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Per class: `Some(threshold)` if the class is watched.
    pub thresholds: Vec<Option<f32>>,
    pub hysteresis: f32,
    pub min_frames: u32,
    pub end_frames: u32,
    pub update_interval: Duration,
}

impl Rules {
    /// The `[detection]` rules of `settings` for a model with `labels`, or a configuration
    /// error naming a label the model does not have (and where that label was set).
    pub fn for_model(settings: &Settings, labels: &[String]) -> Result<Rules, ConfigError> {
        Ok(Self::for_models(settings, &[labels])?.remove(0))
    }

    /// The rules for each of several models (in the order of `labels`, one list per model),
    /// or a configuration error naming a label in `[detection]` that no model has: a label
    /// only some models have is watched where it exists.
    pub fn for_models(
        settings: &Settings,
        labels: &[&[String]],
    ) -> Result<Vec<Rules>, ConfigError> {
        let d = &settings.detection;
        let known = |key: &str, l: &str| {
            if labels.iter().any(|m| m.iter().any(|x| x == l)) {
                return Ok(());
            }
            let first = labels.first().copied().unwrap_or(&[]);
            let some: Vec<&str> = first.iter().take(8).map(String::as_str).collect();
            let whose = if labels.len() > 1 {
                "any model"
            } else {
                "the model"
            };
            Err(settings.error_at(
                key,
                format!(
                    "{l:?} is not a label of {whose} (labels: {}{})",
                    some.join(", "),
                    if first.len() > 8 { ", ..." } else { "" }
                ),
            ))
        };
        for (i, l) in d.labels.iter().enumerate() {
            known(&format!("detection.labels[{i}]"), l)?;
        }
        for l in d.thresholds.keys() {
            known(&format!("detection.thresholds.{l}"), l)?;
        }
        let rules = |labels: &[String]| Rules {
            thresholds: labels
                .iter()
                .map(|l| {
                    let watched = d.labels.is_empty() || d.labels.contains(l);
                    watched.then(|| *d.thresholds.get(l).unwrap_or(&d.threshold))
                })
                .collect(),
            hysteresis: d.hysteresis,
            min_frames: d.min_frames,
            end_frames: d.end_frames,
            update_interval: Duration::from_secs_f64(d.update_interval_secs),
        };
        Ok(labels.iter().map(|l| rules(l)).collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Start,
    Update,
    End,
}

/// One detection event, before it becomes a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: Kind,
    pub class: usize,
    /// The score on the frame that caused the event.
    pub score: f32,
    pub max_score: f32,
    /// Capture time of the first frame at or above the threshold.
    pub started_at: SystemTime,
    /// `End` only: capture time of the last frame that still held the detection (at or
    /// above `threshold - hysteresis`).
    pub ended_at: Option<SystemTime>,
    /// Frames classified since the detection's first frame, this one included.
    pub frames: u64,
}

#[derive(Debug, Clone)]
struct Rising {
    count: u32,
    first_at: SystemTime,
    max_score: f32,
}

#[derive(Debug, Clone)]
struct Active {
    started_at: SystemTime,
    max_score: f32,
    frames: u64,
    below: u32,
    last_held: SystemTime,
    last_emit: SystemTime,
}

/// The detections of one camera.
#[derive(Debug, Clone)]
pub struct Tracker {
    rules: Rules,
    rising: BTreeMap<usize, Rising>,
    active: BTreeMap<usize, Active>,
}

impl Tracker {
    pub fn new(rules: Rules) -> Self {
        Tracker {
            rules,
            rising: BTreeMap::new(),
            active: BTreeMap::new(),
        }
    }

    /// Classes with an open detection.
    pub fn active(&self) -> impl Iterator<Item = usize> + '_ {
        self.active.keys().copied()
    }

    /// Feed one classified frame's probabilities (captured `at`); the events it causes, in
    /// class order.
    pub fn observe(&mut self, probs: &[f32], at: SystemTime) -> Vec<Event> {
        let mut out = Vec::new();
        let r = &self.rules;
        for (class, thr) in r.thresholds.iter().enumerate() {
            let (Some(thr), Some(&score)) = (*thr, probs.get(class)) else {
                continue;
            };
            if let Some(a) = self.active.get_mut(&class) {
                a.frames += 1;
                a.max_score = a.max_score.max(score);
                if score >= thr - r.hysteresis {
                    a.below = 0;
                    a.last_held = at;
                } else {
                    a.below += 1;
                }
                let event = |kind, ended_at| Event {
                    kind,
                    class,
                    score,
                    max_score: a.max_score,
                    started_at: a.started_at,
                    ended_at,
                    frames: a.frames,
                };
                if a.below >= r.end_frames {
                    out.push(event(Kind::End, Some(a.last_held)));
                    self.active.remove(&class);
                } else if at.duration_since(a.last_emit).unwrap_or_default() >= r.update_interval {
                    out.push(event(Kind::Update, None));
                    a.last_emit = at;
                }
                continue;
            }
            if score < thr {
                self.rising.remove(&class);
                continue;
            }
            let e = self.rising.entry(class).or_insert(Rising {
                count: 0,
                first_at: at,
                max_score: score,
            });
            e.count += 1;
            e.max_score = e.max_score.max(score);
            if e.count >= r.min_frames {
                let e = self.rising.remove(&class).unwrap_or_else(|| unreachable!());
                out.push(Event {
                    kind: Kind::Start,
                    class,
                    score,
                    max_score: e.max_score,
                    started_at: e.first_at,
                    ended_at: None,
                    frames: u64::from(e.count),
                });
                self.active.insert(
                    class,
                    Active {
                        started_at: e.first_at,
                        max_score: e.max_score,
                        frames: u64::from(e.count),
                        below: 0,
                        last_held: at,
                        last_emit: at,
                    },
                );
            }
        }
        out
    }

    /// End every open detection (shutdown): consumers must not be left with a detection
    /// that never ends. `ended_at` is the last frame that held it.
    pub fn end_all(&mut self) -> Vec<Event> {
        self.rising.clear();
        std::mem::take(&mut self.active)
            .into_iter()
            .map(|(class, a)| Event {
                kind: Kind::End,
                class,
                score: 0.0,
                max_score: a.max_score,
                started_at: a.started_at,
                ended_at: Some(a.last_held),
                frames: a.frames,
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A detection's id: the same for its start, updates and end, unique across devices,
/// cameras, regions, labels and restarts (two detections of one label on one camera cannot
/// start on the same frame). `scope` is the camera, or `camera/region` (a camera name
/// holds no '/').
pub fn event_id(device: &str, scope: &str, class: usize, started_at: SystemTime) -> String {
    format!("{device}:{scope}:{class}:{}", unix_ms(started_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(classes: usize) -> Rules {
        Rules {
            thresholds: vec![Some(0.6); classes],
            hysteresis: 0.2,
            min_frames: 3,
            end_frames: 2,
            update_interval: Duration::from_secs(10),
        }
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    /// Feed class 0's score one frame per second; collect (second, kind, frames).
    fn run(tr: &mut Tracker, scores: &[f32]) -> Vec<(u64, Kind, u64)> {
        let mut out = vec![];
        for (s, &p) in scores.iter().enumerate() {
            for e in tr.observe(&[p, 1.0 - p], t(s as u64)) {
                if e.class == 0 {
                    out.push((s as u64, e.kind, e.frames));
                }
            }
        }
        out
    }

    /// (what, class 0's score per second, the (second, kind, frames) events expected).
    type Case<'a> = (&'a str, &'a [f32], &'a [(u64, Kind, u64)]);

    /// Data-driven: score sequences and the events they must (and must not) cause.
    #[test]
    fn start_update_end_by_the_rules() {
        use Kind::*;
        let cases: &[Case] = &[
            ("two frames are not enough", &[0.9, 0.9, 0.1, 0.9, 0.9], &[]),
            (
                "three start, two clearly below end",
                &[0.7, 0.8, 0.9, 0.3, 0.3, 0.9],
                &[(2, Start, 3), (4, End, 5)],
            ),
            (
                "dips into the band (0.4..0.6) never end it",
                &[0.7, 0.7, 0.7, 0.45, 0.5, 0.41, 0.45, 0.3, 0.2],
                &[(2, Start, 3), (8, End, 9)],
            ),
            (
                "one frame below is not an end",
                &[0.7, 0.7, 0.7, 0.1, 0.7, 0.1, 0.7],
                &[(2, Start, 3)],
            ),
            (
                "exactly at the threshold counts",
                &[0.6, 0.6, 0.6],
                &[(2, Start, 3)],
            ),
        ];
        for (what, scores, want) in cases {
            let mut tr = Tracker::new(rules(2));
            assert_eq!(&run(&mut tr, scores), want, "{what}");
        }
    }

    #[test]
    fn updates_at_most_every_interval() {
        let mut tr = Tracker::new(rules(2));
        let ev = run(&mut tr, &[0.9; 35]);
        let kinds: Vec<(u64, Kind)> = ev.iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (2, Kind::Start),
                (12, Kind::Update),
                (22, Kind::Update),
                (32, Kind::Update)
            ]
        );
    }

    /// A score that wobbles around the threshold every frame: with hysteresis, one
    /// detection; the same noise without hysteresis or persistence would flap.
    #[test]
    fn noisy_score_does_not_flap() {
        // Deterministic noise: 0.6 +/- 0.15 with a pseudo-random sign.
        let mut x: u32 = 12345;
        let scores: Vec<f32> = (0..500)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                0.6 + if (x >> 16) & 1 == 0 { 0.15 } else { -0.15 }
            })
            .collect();
        let mut tr = Tracker::new(rules(2));
        let ev = run(&mut tr, &scores);
        let starts = ev.iter().filter(|e| e.1 == Kind::Start).count();
        assert_eq!(starts, 1, "{ev:?}");
        assert!(!ev.iter().any(|e| e.1 == Kind::End), "{ev:?}");
        let mut flappy = Tracker::new(Rules {
            hysteresis: 0.0,
            min_frames: 1,
            end_frames: 1,
            ..rules(2)
        });
        let flaps = run(&mut flappy, &scores)
            .iter()
            .filter(|e| e.1 == Kind::Start)
            .count();
        assert!(
            flaps > 50,
            "the noise is real: {flaps} starts without hysteresis"
        );
    }

    #[test]
    fn per_label_thresholds_and_unwatched_labels() {
        let mut tr = Tracker::new(Rules {
            thresholds: vec![Some(0.9), None, Some(0.3)],
            ..rules(3)
        });
        let mut kinds = vec![];
        for s in 0..3 {
            for e in tr.observe(&[0.8, 0.99, 0.35], t(s)) {
                kinds.push((e.class, e.kind));
            }
        }
        assert_eq!(
            kinds,
            vec![(2, Kind::Start)],
            "0.8 < 0.9; class 1 unwatched"
        );
        assert_eq!(tr.active().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn end_carries_the_detection_and_end_all_closes_everything() {
        let mut tr = Tracker::new(rules(2));
        for s in 0..3 {
            tr.observe(&[0.7, 0.0], t(s));
        }
        tr.observe(&[0.95, 0.0], t(3));
        let ends = tr.end_all();
        assert_eq!(ends.len(), 1);
        let e = &ends[0];
        assert_eq!((e.kind, e.frames, e.max_score), (Kind::End, 4, 0.95));
        assert_eq!((e.started_at, e.ended_at), (t(0), Some(t(3))));
        assert_eq!(tr.active().count(), 0);
        assert_eq!(event_id("pi", "front", 7, t(0)), "pi:front:7:1700000000000");
    }
}
