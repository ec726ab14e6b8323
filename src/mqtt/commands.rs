//! Remote commands on `<prefix>/<device>/cmd/<verb>` (off unless `commands.enabled`):
//! `pause` / `resume` a camera (or all), `snapshot` (the camera's current frame as JPEG on
//! `<prefix>/<device>/<camera>/snapshot`), `reload` (configuration and model, without a
//! restart). Every command gets a reply on `<prefix>/<device>/cmd/result`; a command that
//! is malformed, oversized, unknown or names an unknown camera gets an error reply and
//! changes nothing.
//!
//! Parsing is pure ([`parse`]); [`serve`] applies requests. Pause and snapshot act through
//! the control mailbox the inference thread reads (it owns the frames); reload asks the
//! daemon, which validates the new configuration and loads its model *before* anything
//! stops, so a bad one leaves the running daemon untouched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::Settings;
use crate::mqtt::status::StatusOut;
use crate::mqtt::topics::result_topic;
use crate::stats::control::Control;
use crate::stats::switches::{FRAME, Switch, Switches, What};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Pause,
    Resume,
    Snapshot,
    Reload,
    Enable,
    Disable,
}

impl Verb {
    pub const ALL: [Verb; 6] = [
        Verb::Pause,
        Verb::Resume,
        Verb::Snapshot,
        Verb::Reload,
        Verb::Enable,
        Verb::Disable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Snapshot => "snapshot",
            Verb::Reload => "reload",
            Verb::Enable => "enable",
            Verb::Disable => "disable",
        }
    }

    /// The payload fields the verb takes besides `id`.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Verb::Enable | Verb::Disable => &["camera", "region", "label", "what"],
            // reload's "camera" is refused by name below ("reload takes no camera").
            _ => &["camera"],
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
    /// `enable` / `disable`: what they switch.
    pub switch: Option<SwitchRequest>,
}

/// What `enable` / `disable` switch on the request's camera: its views (the region
/// named, or every region, or the whole frame), one label of them or all of the view, its
/// classifications, its detections or both.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchRequest {
    /// View names (`frame`, or regions'), with the index of the model each runs on.
    pub views: Vec<(String, usize)>,
    pub label: Option<String>,
    pub what: What,
}

/// A failed command's reply: verb as given (it may be unknown), the caller's id if the
/// payload had one.
#[derive(Debug)]
pub struct Rejection {
    pub verb: String,
    pub id: Option<Value>,
    pub error: Refusal,
}

impl Rejection {
    /// What the log says of it. The verb is whatever a client put in the topic, newlines
    /// included: quoted and escaped, so it cannot forge log lines (the refusal's own text
    /// quotes what it repeats).
    pub fn log_line(&self) -> String {
        format!("command {:?}: {}", self.verb, self.error)
    }
}

/// Why a command was refused before it ran: what the rejection's `error` says.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("payload of {len} bytes exceeds commands.max_payload_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("payload must be a JSON object, not {0}")]
    NotAnObject(Value),
    #[error("malformed JSON: {0}")]
    Malformed(serde_json::Error),
    #[error("unknown field {0:?} (valid: {1:?})")]
    UnknownField(String, Vec<&'static str>),
    #[error("unknown command {0:?} (valid: pause, resume, snapshot, reload, enable, disable)")]
    UnknownVerb(String),
    #[error("{0} needs \"camera\" (one of {1:?})")]
    NeedsCamera(&'static str, Vec<String>),
    /// (camera, region asked for, the camera's regions); boxed, as the label's, to keep
    /// every refusal small.
    #[error("camera {:?} has no region {:?} (regions: {:?})", .0.0, .0.1, .0.2)]
    UnknownRegion(Box<(String, String, Vec<String>)>),
    #[error("camera {0:?} has no regions: it is classified whole")]
    NoRegions(String),
    /// (label, `camera/view`, some of the model's labels).
    #[error("{:?} is not a label of the model of {} (labels: {})", .0.0, .0.1, .0.2)]
    UnknownLabel(Box<(String, String, String)>),
    #[error("\"what\" must be \"classification\" or \"detection\" (absent: both), not {0}")]
    BadWhat(Value),
    #[error("\"{0}\" must be a string, not {1}")]
    NotAString(&'static str, Value),
    #[error("snapshot needs \"camera\" (one of {0:?})")]
    SnapshotNeedsCamera(Vec<String>),
    #[error("reload takes no camera")]
    ReloadTakesNoCamera,
    #[error("unknown camera {name:?} (cameras: {names:?})")]
    UnknownCamera { name: String, names: Vec<String> },
    #[error("too many {verb} commands: try again in {} s", wait.as_secs_f64().ceil())]
    TooSoon { verb: &'static str, wait: Duration },
}

/// How often the costly commands may run: a burst, then one per period. A reload loads
/// a model (seconds of CPU on a Pi) and a snapshot encodes a JPEG, and anyone who can
/// publish on the command topic can ask; the burst lets a user fix a typo and retry.
/// `enable` and `disable` write the state file (flash wear on an SD card): ten at once,
/// then one a second.
const LIMITS: [(Verb, u32, Duration); 4] = [
    (Verb::Reload, 3, Duration::from_secs(10)),
    (Verb::Snapshot, 3, Duration::from_secs(1)),
    (Verb::Enable, 10, Duration::from_secs(1)),
    (Verb::Disable, 10, Duration::from_secs(1)),
];

/// Token buckets per (verb, camera) for the verbs in [`LIMITS`]. Pure: the caller says
/// what time it is.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<(Verb, usize), (f64, Instant)>,
}

impl Limiter {
    /// Admit `req` at `now`, or say how long to wait.
    pub fn admit(&mut self, req: &Request, now: Instant) -> Result<(), Refusal> {
        let Some(&(verb, burst, every)) = LIMITS.iter().find(|l| l.0 == req.verb) else {
            return Ok(());
        };
        let key = (verb, req.cameras.first().copied().unwrap_or(0));
        let (tokens, at) = self.buckets.entry(key).or_insert((burst as f64, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() / every.as_secs_f64();
        *tokens = (*tokens + refill).min(burst as f64);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        Err(Refusal::TooSoon {
            verb: verb.name(),
            wait: every.mul_f64(1.0 - *tokens),
        })
    }
}

/// Parse the command `verb` with `payload` (empty, or a JSON object with optional
/// `camera` and `id`; `enable` / `disable` also `region`, `label` and `what`).
pub fn parse(settings: &Settings, verb: &str, payload: &[u8]) -> Result<Request, Rejection> {
    let reject = |id: Option<Value>, error: Refusal| Rejection {
        verb: verb.to_string(),
        id,
        error,
    };
    let body = body(payload, settings.commands.max_payload_bytes).map_err(|e| reject(None, e))?;
    let id = body.get("id").cloned();
    let Some(verb_) = Verb::ALL.into_iter().find(|v| v.name() == verb) else {
        return Err(reject(id, Refusal::UnknownVerb(verb.to_string())));
    };
    let fields = verb_.fields();
    if let Some(k) = body
        .keys()
        .find(|k| k.as_str() != "id" && !fields.contains(&k.as_str()))
    {
        let mut valid = vec!["id"];
        valid.extend(fields);
        return Err(reject(id, Refusal::UnknownField(k.clone(), valid)));
    }
    let names: Vec<String> = settings.camera.iter().map(|c| c.name.clone()).collect();
    let cameras = cameras(verb_, body.get("camera"), &names).map_err(|e| reject(id.clone(), e))?;
    let switch = match verb_ {
        Verb::Enable | Verb::Disable => {
            let cam = &settings.camera[cameras[0]];
            Some(switch_request(settings, cam, &body).map_err(|e| reject(id.clone(), e))?)
        }
        _ => None,
    };
    Ok(Request {
        verb: verb_,
        cameras,
        id,
        switch,
    })
}

/// An optional string field.
fn string<'a>(
    body: &'a serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, Refusal> {
    match body.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Refusal::NotAString(key, other.clone())),
    }
}

/// The views, label and part an `enable` / `disable` names on camera `cam`.
fn switch_request(
    settings: &Settings,
    cam: &crate::config::CameraSettings,
    body: &serde_json::Map<String, Value>,
) -> Result<SwitchRequest, Refusal> {
    let model = |name: &str| settings.models.iter().position(|m| m.name == name);
    let model = |name: &str| model(name).unwrap_or(0); // validated names
    let views = match string(body, "region")? {
        Some(_) if cam.regions.is_empty() => return Err(Refusal::NoRegions(cam.name.clone())),
        Some(r) => match cam.regions.iter().find(|x| x.name == r) {
            Some(x) => vec![(x.name.clone(), model(&x.model))],
            None => {
                return Err(Refusal::UnknownRegion(Box::new((
                    cam.name.clone(),
                    r.to_string(),
                    cam.regions.iter().map(|x| x.name.clone()).collect(),
                ))));
            }
        },
        None if cam.regions.is_empty() => vec![(FRAME.to_string(), model(&cam.model))],
        None => cam
            .regions
            .iter()
            .map(|x| (x.name.clone(), model(&x.model)))
            .collect(),
    };
    let what = match body.get("what") {
        None => What {
            classification: true,
            detection: true,
        },
        Some(Value::String(w)) if w == "classification" => What {
            classification: true,
            detection: false,
        },
        Some(Value::String(w)) if w == "detection" => What {
            classification: false,
            detection: true,
        },
        Some(other) => return Err(Refusal::BadWhat(other.clone())),
    };
    Ok(SwitchRequest {
        views,
        label: string(body, "label")?.map(String::from),
        what,
    })
}

/// The payload as a JSON object (empty or blank: no fields).
fn body(payload: &[u8], max: usize) -> Result<serde_json::Map<String, Value>, Refusal> {
    if payload.len() > max {
        return Err(Refusal::TooLarge {
            len: payload.len(),
            max,
        });
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(Refusal::NotAnObject(other)),
        Err(e) => Err(Refusal::Malformed(e)),
    }
}

/// The cameras a command applies to (indices into `names`): the one named, or all of
/// them; none for `reload`, and exactly one for `snapshot`, `enable` and `disable`.
fn cameras(verb: Verb, camera: Option<&Value>, names: &[String]) -> Result<Vec<usize>, Refusal> {
    match camera {
        None => match verb {
            Verb::Snapshot if names.len() > 1 => Err(Refusal::SnapshotNeedsCamera(names.to_vec())),
            Verb::Enable | Verb::Disable if names.len() > 1 => {
                Err(Refusal::NeedsCamera(verb.name(), names.to_vec()))
            }
            Verb::Reload => Ok(vec![]),
            _ => Ok((0..names.len()).collect()),
        },
        Some(_) if verb == Verb::Reload => Err(Refusal::ReloadTakesNoCamera),
        Some(Value::String(c)) => match names.iter().position(|n| n == c) {
            Some(i) => Ok(vec![i]),
            None => Err(Refusal::UnknownCamera {
                name: c.clone(),
                names: names.to_vec(),
            }),
        },
        Some(other) => Err(Refusal::NotAString("camera", other.clone())),
    }
}

/// Why a command failed: what its reply's `error` says.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Malformed, oversized, unknown, or naming an unknown camera (see [`Rejection`]).
    #[error(transparent)]
    Invalid(Refusal),
    #[error("the daemon is stopping")]
    Stopping,
    /// The new configuration or model was rejected; the reason as the daemon gave it (its
    /// type lives in the daemon, above this module).
    #[error("{0}")]
    Reload(Box<dyn std::error::Error + Send + Sync>),
    #[error("frame {frame}: {source}")]
    Frame {
        frame: u64,
        source: crate::frame::FrameError,
    },
    #[error(transparent)]
    Snapshot(#[from] crate::frame::snapshot::SnapshotError),
    #[error("MQTT queue full (broker away?)")]
    QueueFull,
    #[error("cannot save the switches, nothing changed: {0}")]
    Save(#[from] crate::stats::switches::SwitchesError),
}

/// The reply payload.
pub fn reply(verb: &str, id: &Option<Value>, result: Result<Value, CommandError>) -> Vec<u8> {
    let mut v = json!({"v": 1, "verb": verb, "ok": result.is_ok()});
    match result {
        Ok(Value::Object(extra)) => {
            if let Value::Object(o) = &mut v {
                o.extend(extra);
            }
        }
        Ok(_) => {}
        Err(e) => v["error"] = e.to_string().into(),
    }
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v.to_string().into_bytes()
}

/// A reload request, answered by the daemon: `Ok(the new model's file name)` once the new
/// configuration and its model are validated (the pipeline then restarts), or why they
/// were rejected (the running ones are kept).
pub type ReloadRequest = oneshot::Sender<Result<String, CommandError>>;

/// What the command server acts on: the cameras' control mailbox, the daemon's reload
/// intake, the cameras' status topics (switches show there), and each model's labels (in
/// the order of `settings.models`: a switch names a label its view's model has).
pub struct Handles {
    pub control: Arc<Control>,
    pub reload: mpsc::Sender<ReloadRequest>,
    pub status: Arc<StatusOut>,
    pub labels: Vec<Vec<String>>,
}

/// Apply commands until the channel closes.
pub async fn serve(
    settings: Arc<Settings>,
    handles: Handles,
    client: AsyncClient,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
) {
    let topic = result_topic(&settings);
    let mut limiter = Limiter::default();
    while let Some((verb, payload)) = rx.recv().await {
        let parsed = parse(&settings, &verb, &payload).and_then(|req| {
            match limiter.admit(&req, Instant::now()) {
                Ok(()) => Ok(req),
                Err(error) => Err(Rejection {
                    verb: req.verb.name().into(),
                    id: req.id,
                    error,
                }),
            }
        });
        let (name, id, result) = match parsed {
            Err(r) => {
                warn!("{}", r.log_line());
                (r.verb, r.id, Err(CommandError::Invalid(r.error)))
            }
            Ok(req) => {
                let result = apply(&settings, &handles, &req).await;
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

async fn apply(settings: &Settings, h: &Handles, req: &Request) -> Result<Value, CommandError> {
    let names = |cams: &[usize]| -> Vec<String> {
        cams.iter()
            .map(|&i| settings.camera[i].name.clone())
            .collect()
    };
    match req.verb {
        Verb::Pause | Verb::Resume => {
            for &i in &req.cameras {
                h.control.camera(i).set_paused(req.verb == Verb::Pause);
            }
            Ok(json!({"cameras": names(&req.cameras)}))
        }
        Verb::Snapshot => {
            h.control
                .camera(req.cameras[0])
                .request_snapshot(req.id.clone());
            Ok(Value::Null)
        }
        Verb::Reload => {
            let (tx, rx) = oneshot::channel();
            h.reload
                .send(tx)
                .await
                .map_err(|_| CommandError::Stopping)?;
            let model = rx.await.map_err(|_| CommandError::Stopping)??;
            Ok(json!({"config": settings.file.display().to_string(), "model": model}))
        }
        Verb::Enable | Verb::Disable => switch(settings, h, req),
    }
}

/// `enable` / `disable`: the switches with this one set are saved to the state file
/// first, then take effect (inference reads them) and show in the camera's status; a
/// state that cannot be saved changes nothing.
fn switch(settings: &Settings, h: &Handles, req: &Request) -> Result<Value, CommandError> {
    let (Some(sw), Some(&i)) = (&req.switch, req.cameras.first()) else {
        return Ok(Value::Null); // parse gives both for these verbs
    };
    let camera = &settings.camera[i].name;
    if let Some(label) = &sw.label {
        for (view, model) in &sw.views {
            let labels = h.labels.get(*model).map_or(&[][..], Vec::as_slice);
            if !labels.contains(label) {
                let some: Vec<&str> = labels.iter().take(8).map(String::as_str).collect();
                let more = if labels.len() > 8 { ", ..." } else { "" };
                return Err(CommandError::Invalid(Refusal::UnknownLabel(Box::new((
                    label.clone(),
                    format!("{camera}/{view}"),
                    format!("{}{more}", some.join(", ")),
                )))));
            }
        }
    }
    let mut next = h.control.switches();
    for (view, _) in &sw.views {
        next.set(&Switch {
            camera: camera.clone(),
            view: view.clone(),
            label: sw.label.clone(),
            what: sw.what,
            off: req.verb == Verb::Disable,
        });
    }
    next.save(&Switches::path(&settings.device.state_dir))?;
    let off = next.cameras.get(camera).cloned().unwrap_or_default();
    h.control.set_switches(next);
    h.status.republish(i);
    Ok(json!({"camera": camera, "off": off}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        crate::config::from_toml(
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
                    let e = r.error.to_string();
                    assert!(e.contains(part), "{verb} {payload}: {e}")
                }
                (w, g) => panic!("{verb} {payload}: want {w:?}, got {g:?}"),
            }
        }
    }

    /// Data-driven: `enable` / `disable` name a camera (when there are several), a region
    /// of it or all of them (or the whole frame of a camera without regions), maybe a
    /// label, and what; the views come with their models.
    #[test]
    fn switch_commands_name_their_views() {
        let s = crate::config::from_toml(
            "[device]\nid = \"pi\"\n[[model]]\nname = \"a\"\npath = \"m.onnx\"\n\
             [[model]]\nname = \"b\"\npath = \"n.onnx\"\n[commands]\nenabled = true\n\
             [[camera]]\nname = \"yard\"\npath = \"x\"\n\
             [[camera.region]]\nname = \"gate\"\nwidth = 0.5\nheight = 1\n\
             [[camera.region]]\nname = \"feeder\"\nx = 0.5\nwidth = 0.5\nheight = 1\nmodel = \"b\"\n\
             [[camera]]\nname = \"door\"\npath = \"x\"\nmodel = \"b\"\n",
        );
        let both = What {
            classification: true,
            detection: true,
        };
        let detection = What {
            classification: false,
            detection: true,
        };
        type Want<'a> = Result<(usize, &'a [(&'a str, usize)], Option<&'a str>, What), &'a str>;
        let cases: &[(&str, &str, Want)] = &[
            (
                "disable",
                r#"{"camera":"yard","region":"gate"}"#,
                Ok((0, &[("gate", 0)], None, both)),
            ),
            (
                "enable",
                r#"{"camera":"yard"}"#,
                Ok((0, &[("gate", 0), ("feeder", 1)], None, both)),
            ),
            (
                "disable",
                r#"{"camera":"yard","region":"feeder","label":"cat","what":"detection"}"#,
                Ok((0, &[("feeder", 1)], Some("cat"), detection)),
            ),
            (
                "disable",
                r#"{"camera":"door"}"#,
                Ok((1, &[("frame", 1)], None, both)),
            ),
            ("disable", "", Err("disable needs \"camera\"")),
            (
                "disable",
                r#"{"camera":"door","region":"x"}"#,
                Err("has no regions"),
            ),
            (
                "disable",
                r#"{"camera":"yard","region":"gat"}"#,
                Err("has no region \"gat\""),
            ),
            (
                "disable",
                r#"{"camera":"yard","what":"both"}"#,
                Err("\"what\" must be"),
            ),
            (
                "disable",
                r#"{"camera":"yard","label":7}"#,
                Err("\"label\" must be a string"),
            ),
            (
                "enable",
                r#"{"camera":"yard","lable":"x"}"#,
                Err("unknown field \"lable\""),
            ),
            (
                "pause",
                r#"{"camera":"yard","region":"gate"}"#,
                Err("unknown field \"region\""),
            ),
        ];
        for (verb, payload, want) in cases {
            let got = parse(&s, verb, payload.as_bytes());
            match (want, got) {
                (Ok((cam, views, label, what)), Ok(r)) => {
                    let sw = r.switch.unwrap();
                    let got: Vec<(&str, usize)> =
                        sw.views.iter().map(|(v, m)| (v.as_str(), *m)).collect();
                    assert_eq!(r.cameras, [*cam], "{verb} {payload}");
                    assert_eq!(&got[..], *views, "{verb} {payload}");
                    assert_eq!(sw.label.as_deref(), *label, "{verb} {payload}");
                    assert_eq!(sw.what, *what, "{verb} {payload}");
                }
                (Err(part), Err(r)) => {
                    let e = r.error.to_string();
                    assert!(e.contains(part), "{verb} {payload}: {e}")
                }
                (w, g) => panic!("{verb} {payload}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn a_rejected_command_cannot_forge_log_lines() {
        let s = settings();
        for (verb, payload) in [
            (
                "x\n2026-12-05T00:00:00Z INFO edgesight: command reload applied",
                "",
            ),
            ("pause", "{\"camera\":\"a\\nINFO forged\"}"),
            ("pause", "{\"x\\r\\n\":1}"),
            ("pause", "\"\\nINFO forged\""),
            ("pause", "{\"camera\": \"\n"),
        ] {
            let line = parse(&s, verb, payload.as_bytes()).unwrap_err().log_line();
            assert!(!line.contains(['\n', '\r']), "{line}");
        }
    }

    #[test]
    fn reloads_and_snapshots_are_rate_limited_per_camera() {
        let s = settings();
        let req = |verb: &str, payload: &str| parse(&s, verb, payload.as_bytes()).unwrap();
        let (reload, front) = (req("reload", ""), req("snapshot", "{\"camera\":\"front\"}"));
        let back = req("snapshot", "{\"camera\":\"back\"}");
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for _ in 0..3 {
            l.admit(&reload, t0).unwrap();
            l.admit(&front, t0).unwrap();
        }
        let e = l.admit(&reload, at(1)).unwrap_err().to_string();
        assert!(
            e.contains("too many reload commands: try again in 10 s"),
            "{e}"
        );
        assert!(l.admit(&front, at(1)).is_err());
        l.admit(&back, at(1)).unwrap(); // another camera, another bucket
        l.admit(&req("pause", ""), at(1)).unwrap(); // not limited
        l.admit(&front, at(1001)).unwrap(); // one per second comes back
        assert!(l.admit(&front, at(1002)).is_err());
        assert!(l.admit(&reload, at(9_000)).is_err());
        l.admit(&reload, at(10_001)).unwrap();
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
        let err: Value = serde_json::from_slice(&reply(
            "x",
            &None,
            Err(CommandError::Invalid(Refusal::ReloadTakesNoCamera)),
        ))
        .unwrap();
        assert_eq!(
            err,
            json!({"v":1,"verb":"x","ok":false,"error":"reload takes no camera"})
        );
    }
}
