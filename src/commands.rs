//! Remote commands on `<prefix>/<device>/cmd/<verb>` (off unless `commands.enabled`):
//! `pause` / `resume` a camera (or all), `snapshot` (the camera's current frame as JPEG on
//! `<prefix>/<device>/<camera>/snapshot`), `reload` (configuration and model, without a
//! restart). Every command gets a reply on `<prefix>/<device>/cmd/result`; a command that
//! is malformed, oversized, unknown or names an unknown camera gets an error reply and
//! changes nothing.
//!
//! Parsing is pure ([`parse`]); [`serve`] applies requests. Pause and snapshot act through
//! flags the inference thread reads (it owns the frames); reload validates the new
//! configuration and loads its model *before* anything stops, so a bad one leaves the
//! running daemon untouched.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use image::RgbImage;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::settings::Settings;
use crate::stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Pause,
    Resume,
    Snapshot,
    Reload,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Snapshot => "snapshot",
            Verb::Reload => "reload",
        }
    }
}

/// A valid command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub verb: Verb,
    /// Camera indices it applies to.
    pub cameras: Vec<usize>,
    /// The caller's correlation id, echoed in the reply.
    pub id: Option<Value>,
}

/// `<prefix>/<device>/cmd/` — commands arrive under it, replies go to `result`.
pub fn cmd_prefix(settings: &Settings) -> String {
    format!("{}/cmd/", settings.base_topic())
}

pub fn result_topic(settings: &Settings) -> String {
    format!("{}result", cmd_prefix(settings))
}

/// A failed command's reply: verb as given (it may be unknown), the caller's id if the
/// payload had one.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub verb: String,
    pub id: Option<Value>,
    pub error: String,
}

/// Parse the command `verb` with `payload` (empty, or a JSON object with optional
/// `camera` and `id`).
pub fn parse(settings: &Settings, verb: &str, payload: &[u8]) -> Result<Request, Rejection> {
    let reject = |id: Option<Value>, error: String| Rejection {
        verb: verb.to_string(),
        id,
        error,
    };
    let max = settings.commands.max_payload_bytes;
    if payload.len() > max {
        return Err(reject(
            None,
            format!(
                "payload of {} bytes exceeds commands.max_payload_bytes ({max})",
                payload.len()
            ),
        ));
    }
    let body: serde_json::Map<String, Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(o)) => o,
            Ok(other) => {
                return Err(reject(
                    None,
                    format!("payload must be a JSON object, not {other}"),
                ));
            }
            Err(e) => return Err(reject(None, format!("malformed JSON: {e}"))),
        }
    };
    let id = body.get("id").cloned();
    if let Some(k) = body
        .keys()
        .find(|k| !["id", "camera"].contains(&k.as_str()))
    {
        return Err(reject(
            id,
            format!("unknown field {k:?} (valid: \"camera\", \"id\")"),
        ));
    }
    let verb_ = match verb {
        "pause" => Verb::Pause,
        "resume" => Verb::Resume,
        "snapshot" => Verb::Snapshot,
        "reload" => Verb::Reload,
        other => {
            return Err(reject(
                id,
                format!("unknown command {other:?} (valid: pause, resume, snapshot, reload)"),
            ));
        }
    };
    let names: Vec<&str> = settings.camera.iter().map(|c| c.name.as_str()).collect();
    let cameras = match body.get("camera") {
        None => match verb_ {
            Verb::Snapshot if names.len() > 1 => {
                return Err(reject(
                    id,
                    format!("snapshot needs \"camera\" (one of {names:?})"),
                ));
            }
            Verb::Reload => vec![],
            _ => (0..names.len()).collect(),
        },
        Some(_) if verb_ == Verb::Reload => {
            return Err(reject(id, "reload takes no camera".into()));
        }
        Some(Value::String(c)) => match names.iter().position(|n| n == c) {
            Some(i) => vec![i],
            None => {
                return Err(reject(
                    id,
                    format!("unknown camera {c:?} (cameras: {names:?})"),
                ));
            }
        },
        Some(other) => {
            return Err(reject(
                id,
                format!("\"camera\" must be a string, not {other}"),
            ));
        }
    };
    Ok(Request {
        verb: verb_,
        cameras,
        id,
    })
}

/// The reply payload.
pub fn reply(verb: &str, id: &Option<Value>, result: Result<Value, String>) -> Vec<u8> {
    let mut v = json!({"v": 1, "verb": verb, "ok": result.is_ok()});
    match result {
        Ok(Value::Object(extra)) => {
            if let Value::Object(o) = &mut v {
                o.extend(extra);
            }
        }
        Ok(_) => {}
        Err(e) => v["error"] = e.into(),
    }
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v.to_string().into_bytes()
}

/// A validated new configuration and its loaded model, waiting for the pipeline to stop.
pub type Reload = Box<(Settings, crate::model::Classifier)>;

/// Apply commands until the channel closes. `reload` receives a validated configuration
/// and model; sending it ends the current pipeline.
pub async fn serve(
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    client: AsyncClient,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    reload: mpsc::Sender<Reload>,
) {
    let topic = result_topic(&settings);
    while let Some((verb, payload)) = rx.recv().await {
        let (name, id, result) = match parse(&settings, &verb, &payload) {
            Err(r) => {
                warn!("command {}: {}", r.verb, r.error);
                (r.verb, r.id, Err(r.error))
            }
            Ok(req) => {
                let result = apply(&settings, &stats, &req, &reload).await;
                match &result {
                    Ok(_) => info!("command {} applied", req.verb.name()),
                    Err(e) => warn!("command {} failed: {e}", req.verb.name()),
                }
                if req.verb == Verb::Snapshot && result.is_ok() {
                    // The inference thread replies once the JPEG is out.
                    continue;
                }
                (req.verb.name().to_string(), req.id, result)
            }
        };
        let _ = client.try_publish(&topic, QoS::AtLeastOnce, false, reply(&name, &id, result));
    }
}

async fn apply(
    settings: &Settings,
    stats: &Stats,
    req: &Request,
    reload: &mpsc::Sender<Reload>,
) -> Result<Value, String> {
    let names = |cams: &[usize]| -> Vec<String> {
        cams.iter()
            .map(|&i| settings.camera[i].name.clone())
            .collect()
    };
    match req.verb {
        Verb::Pause | Verb::Resume => {
            for &i in &req.cameras {
                stats
                    .camera(i)
                    .paused
                    .store(req.verb == Verb::Pause, Ordering::Relaxed);
            }
            Ok(json!({"cameras": names(&req.cameras)}))
        }
        Verb::Snapshot => {
            let i = req.cameras[0];
            *stats
                .camera(i)
                .snapshot
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(req.id.clone());
            Ok(Value::Null)
        }
        Verb::Reload => {
            let loaded = prepare_reload(settings.file.clone()).await?;
            let model = loaded.1.file_name().to_string();
            reload
                .send(loaded)
                .await
                .map_err(|_| "the daemon is stopping".to_string())?;
            Ok(json!({"config": settings.file.display().to_string(), "model": model}))
        }
    }
}

/// Read the configuration `file` again (with its drop-ins and the environment) and load
/// its model, checking everything start-up checks; the error says why it was rejected.
pub async fn prepare_reload(file: std::path::PathBuf) -> Result<Reload, String> {
    tokio::task::spawn_blocking(move || -> Result<Reload, String> {
        let new = Settings::load(&file).map_err(|e| e.to_string())?;
        let model = crate::load_model(&new).map_err(|e| format!("{e:#}"))?;
        if new.detection.enabled {
            new.detection
                .rules(model.labels())
                .map_err(|e| e.to_string())?;
        }
        Ok(Box::new((new, model)))
    })
    .await
    .map_err(|e| format!("reload task failed: {e}"))?
    .map_err(|e| format!("{e}; the running configuration is kept"))
}

/// JPEG of `img`, re-encoded smaller (lower quality, then half size) until it fits `max`
/// bytes.
pub fn snapshot_jpeg(img: &RgbImage, max: usize) -> Result<Vec<u8>, String> {
    let mut img = std::borrow::Cow::Borrowed(img);
    loop {
        for quality in [85u8, 60, 40] {
            let mut out = Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .encode_image(img.as_ref())
                .map_err(|e| format!("JPEG encoding failed: {e}"))?;
            if out.get_ref().len() <= max {
                return Ok(out.into_inner());
            }
        }
        if img.width() <= 16 || img.height() <= 16 {
            return Err(format!("no JPEG of this frame fits {max} bytes"));
        }
        img = std::borrow::Cow::Owned(image::imageops::resize(
            img.as_ref(),
            img.width() / 2,
            img.height() / 2,
            image::imageops::FilterType::Triangle,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        crate::settings::from_toml(
            "[device]\nid = \"pi\"\n[model]\npath = \"m.onnx\"\n[commands]\nenabled = true\n\
             max_payload_bytes = 64\n\
             [[camera]]\nname = \"front\"\npath = \"x\"\n[[camera]]\nname = \"back\"\npath = \"x\"\n",
        )
    }

    /// (verb, payload, Ok(cameras) or Err(part of the error)).
    type Case<'a> = (&'a str, &'a str, Result<&'a [usize], &'a str>);

    /// Data-driven: commands and what parsing must make of them.
    #[test]
    fn parse_accepts_valid_commands_and_names_what_is_wrong() {
        let s = settings();
        let cases: &[Case] = &[
            ("pause", "", Ok(&[0, 1])),
            ("pause", "{\"camera\":\"back\"}", Ok(&[1])),
            ("resume", " {} ", Ok(&[0, 1])),
            ("snapshot", "{\"camera\":\"front\",\"id\":7}", Ok(&[0])),
            ("reload", "", Ok(&[])),
            ("snapshot", "", Err("needs \"camera\"")),
            (
                "pause",
                "{\"camera\":\"side\"}",
                Err("unknown camera \"side\""),
            ),
            ("pause", "{\"camera\":3}", Err("must be a string")),
            ("pause", "{camera", Err("malformed JSON")),
            ("pause", "[1]", Err("must be a JSON object")),
            ("pause", "{\"cam\":\"front\"}", Err("unknown field \"cam\"")),
            ("reboot", "", Err("unknown command \"reboot\"")),
            (
                "reload",
                "{\"camera\":\"front\"}",
                Err("reload takes no camera"),
            ),
            (
                "pause",
                "{\"id\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
                Err("exceeds commands.max_payload_bytes (64)"),
            ),
        ];
        for (verb, payload, want) in cases {
            let got = parse(&s, verb, payload.as_bytes());
            match (want, got) {
                (Ok(cams), Ok(r)) => assert_eq!(&r.cameras[..], *cams, "{verb} {payload}"),
                (Err(part), Err(r)) => {
                    assert!(r.error.contains(part), "{verb} {payload}: {}", r.error)
                }
                (w, g) => panic!("{verb} {payload}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn replies_echo_the_id_and_say_why() {
        let ok: Value = serde_json::from_slice(&reply(
            "pause",
            &Some(json!(7)),
            Ok(json!({"cameras": ["a"]})),
        ))
        .unwrap();
        assert_eq!(
            ok,
            json!({"v":1,"verb":"pause","ok":true,"id":7,"cameras":["a"]})
        );
        let err: Value = serde_json::from_slice(&reply("x", &None, Err("bad".into()))).unwrap();
        assert_eq!(err, json!({"v":1,"verb":"x","ok":false,"error":"bad"}));
    }

    #[test]
    fn snapshots_shrink_to_fit() {
        // Noise compresses badly: a 640x480 noise frame is far over 20 kB at quality 85.
        let mut x = 1u32;
        let img = RgbImage::from_fn(640, 480, |_, _| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(x >> 24) as u8, (x >> 16) as u8, (x >> 8) as u8])
        });
        let big = snapshot_jpeg(&img, usize::MAX).unwrap();
        let small = snapshot_jpeg(&img, 20_000).unwrap();
        assert!(big.len() > 20_000 && small.len() <= 20_000);
        let back = image::load_from_memory(&small).unwrap();
        assert!(back.width() < 640, "downscaled to fit");
    }
}
