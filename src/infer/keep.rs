//! What the inference stage keeps of a frame: an event snapshot when one of a view's
//! detections starts (published as JPEG on `<camera>[/<region>]/snapshot` and/or saved),
//! and hard examples for retraining (a view's unsure or flipping classifications, saved
//! as JPEG plus a JSON sidecar). Both are opt-in per camera or region; the folders are
//! the daemon's (`keep::Folder`, bounded), handed in through the context.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use image::RgbImage;
use rumqttc::QoS;
use serde_json::json;
use tracing::warn;

use crate::capture::Frame;
use crate::config::{Rect, SnapshotMode};
use crate::frame::snapshot::snapshot_jpeg;
use crate::infer::{Classified, Inference};
use crate::keep::{Folder, stem};
use crate::mqtt::topics::view_topic;
use crate::stats::switches::FRAME;
use crate::util::{rfc3339_ms, worth_logging};

/// The folders, when any view saves into them.
#[derive(Debug, Default)]
pub struct Folders {
    pub snapshots: Option<Folder>,
    pub hard_examples: Option<Folder>,
}

/// A view's keeping: its settings and what it remembers between frames.
#[derive(Debug, Clone, Default)]
pub(super) struct Keeping {
    pub snapshots: SnapshotMode,
    pub hard_examples: bool,
    /// The top class of the view's previous classification (a flip is a change of it).
    pub previous: Option<usize>,
    /// When the view last kept a hard example (capture time).
    pub last_hard: Option<Instant>,
}

/// The frame as RGB, decoded at most once per step, and only if a view wants a picture.
pub(super) struct Picture<'a> {
    frame: &'a Frame,
    rgb: Option<Option<RgbImage>>,
}

impl<'a> Picture<'a> {
    pub fn new(frame: &'a Frame) -> Self {
        Picture { frame, rgb: None }
    }

    /// The frame, or `rect` of it, at full resolution as a JPEG of at most `max` bytes;
    /// None if it does not decode (or encode).
    fn jpeg(&mut self, rect: Option<Rect>, max: usize) -> Option<Vec<u8>> {
        let rgb = self.rgb.get_or_insert_with(|| self.frame.raw.to_rgb().ok());
        let rgb = rgb.as_ref()?;
        let Some(r) = rect else {
            return snapshot_jpeg(rgb, max).ok();
        };
        // A JPEG may decode smaller than its mode: crop what is there.
        let (w, h) = rgb.dimensions();
        let (x, y) = (r.x.min(w.saturating_sub(1)), r.y.min(h.saturating_sub(1)));
        let (cw, ch) = (r.width.min(w - x), r.height.min(h - y));
        let crop = image::imageops::crop_imm(rgb, x, y, cw, ch).to_image();
        snapshot_jpeg(&crop, max).ok()
    }
}

/// Why a classification is a hard example.
fn why_hard(
    top: Option<(usize, f32)>,
    previous: Option<usize>,
    h: &crate::config::HardExampleSettings,
) -> Vec<&'static str> {
    let Some((class, score)) = top else {
        return vec![];
    };
    let mut why = Vec::new();
    if (h.min_score..=h.max_score).contains(&score) {
        why.push("unsure");
    }
    if h.flips && previous.is_some_and(|p| p != class) {
        why.push("flip");
    }
    why
}

impl Inference {
    /// View `v` of camera `i` started a detection of `label` on `frame`: its snapshot, as
    /// the view's `snapshots` says.
    pub(super) fn snapshot(
        &mut self,
        (i, v): (usize, usize),
        frame: &Frame,
        rect: Option<Rect>,
        label: &str,
        picture: &mut Picture,
    ) {
        let mode = self.views[i][v].keeping.snapshots;
        if mode == SnapshotMode::Off {
            return;
        }
        let s = &self.ctx.settings;
        let (cam, scope) = (&s.camera[i], &self.views[i][v].scope);
        let region = self.views[i][v].region_name(cam);
        let Some(jpeg) = picture.jpeg(rect, s.snapshots.jpeg_max_bytes) else {
            if let Some(c) = self.ctx.stats.snapshots.get() {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            warn!(
                "{scope}: no snapshot of frame {}: it does not decode",
                frame.number
            );
            return;
        };
        if mode.publishes() {
            let topic = view_topic(s, &cam.name, region, "snapshot");
            let sent = self
                .ctx
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, jpeg.clone());
            if sent.is_err() {
                let n = self
                    .ctx
                    .stats
                    .snapshots_dropped
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if worth_logging(n) {
                    warn!("{scope}: snapshot not published: MQTT queue full; {n} so far");
                }
            }
        }
        if mode.saves()
            && let Some(folder) = &mut self.ctx.folders.snapshots
        {
            let name = stem(
                frame.captured_at,
                &[&cam.name, region.unwrap_or(FRAME), label],
            );
            if let Err(e) = folder.save(&name, &[("jpg", &jpeg)]) {
                warn!(
                    "{scope}: snapshot not saved in {}: {e}",
                    folder.dir().display()
                );
            }
        }
    }

    /// Keep view `v`'s classification `c` of `frame` as a hard example when its top score
    /// is in the unsure band or its top label flipped, at most once per
    /// `hard_examples.min_interval_secs`.
    pub(super) fn hard_example(
        &mut self,
        (i, v): (usize, usize),
        frame: &Frame,
        rect: Option<Rect>,
        c: &Classified,
        picture: &mut Picture,
    ) {
        let view = &mut self.views[i][v];
        // A view that keeps none, or a folder that did not open: nothing to make.
        let Some(folder) = self.ctx.folders.hard_examples.as_mut() else {
            return;
        };
        if !view.keeping.hard_examples {
            return;
        }
        let s = &self.ctx.settings;
        let top = c.top.first().map(|p| (p.class, p.score));
        let previous = std::mem::replace(&mut view.keeping.previous, top.map(|t| t.0));
        let why = why_hard(top, previous, &s.hard_examples);
        let every = Duration::from_secs_f64(s.hard_examples.min_interval_secs);
        let recent = view
            .keeping
            .last_hard
            .is_some_and(|t| frame.captured.saturating_duration_since(t) < every);
        if why.is_empty() || recent {
            return;
        }
        view.keeping.last_hard = Some(frame.captured);
        let cam = &s.camera[i];
        let region = view.region_name(cam);
        let model = &self.ctx.models[view.model];
        let labels = model.labels();
        let sidecar = json!({
            "v": 1,
            "camera": cam.name,
            "region": region,
            "ts": rfc3339_ms(frame.captured_at),
            "model": s.models[view.model].name,
            "model_file": model.file_name(),
            "why": why,
            "previous": previous.and_then(|p| labels.get(p)),
            "top": c.top,
            "frame": frame.number,
            "rect": rect,
        });
        let Some(jpeg) = picture.jpeg(rect, s.snapshots.jpeg_max_bytes) else {
            folder.counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let top_label = c.top.first().map_or("none", |p| p.label.as_str());
        let name = stem(
            frame.captured_at,
            &[&cam.name, region.unwrap_or(FRAME), top_label],
        );
        let text = serde_json::to_vec_pretty(&sidecar).unwrap_or_default();
        if let Err(e) = folder.save(&name, &[("jpg", &jpeg), ("json", &text)]) {
            warn!(
                "{}: hard example not saved in {}: {e}",
                view.scope,
                folder.dir().display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data-driven: a top score in the band is unsure; a changed top class is a flip (when
    /// flips count); a first classification flips nothing.
    #[test]
    fn hard_examples_are_unsure_or_flipping() {
        let h = crate::config::HardExampleSettings {
            min_score: 0.4,
            max_score: 0.7,
            flips: true,
            min_interval_secs: 1.0,
            max_files: 1,
            max_bytes: 1 << 20,
        };
        let no_flips = crate::config::HardExampleSettings {
            flips: false,
            ..h.clone()
        };
        // (top class and score, previous top class, flips count, why)
        type Case<'a> = (Option<(usize, f32)>, Option<usize>, bool, &'a [&'a str]);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (Some((1, 0.55)), None, true, &["unsure"]),
            (Some((1, 0.95)), None, true, &[]),
            (Some((1, 0.95)), Some(1), true, &[]),
            (Some((1, 0.95)), Some(2), true, &["flip"]),
            (Some((1, 0.40)), Some(2), true, &["unsure", "flip"]),
            (Some((1, 0.70)), Some(2), false, &["unsure"]),
            (Some((1, 0.39)), Some(2), false, &[]),
            (None, Some(2), true, &[]),
        ];
        for (top, previous, flips, want) in cases {
            let settings = if *flips { &h } else { &no_flips };
            assert_eq!(
                why_hard(*top, *previous, settings),
                *want,
                "{top:?} {previous:?}"
            );
        }
    }
}
