//! Home Assistant MQTT discovery, device-based: one retained
//! `<discovery prefix>/device/<id>/config` message describing the device and, per camera
//! (or per region of a camera that has regions), a sensor for the top label, one for its
//! score and an event entity for detections; per camera, diagnostic sensors for fps and
//! inference time. Pure: the payload is built from the
//! settings; the driver (`driver.rs`) publishes it after every connect and when Home Assistant announces
//! itself on `<discovery prefix>/status`.

use serde_json::{Value, json};

use crate::config::{CameraSettings, Settings};
use crate::mqtt::topics::{availability_topic, camera_topic, stats_topic, view_topic};

/// `homeassistant/device/<object id>/config`.
pub fn config_topic(settings: &Settings) -> String {
    format!(
        "{}/device/{}/config",
        settings.homeassistant.prefix,
        object_id(&settings.device.id)
    )
}

/// Home Assistant's birth/last-will topic.
pub fn status_topic(settings: &Settings) -> String {
    format!("{}/status", settings.homeassistant.prefix)
}

/// `edgesight_<device>`: the device's id for Home Assistant.
fn object_id(s: &str) -> String {
    format!("edgesight_{}", sanitize(s))
}

/// Ids Home Assistant accepts: letters, digits, `_` and `-`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `s` as a single-quoted Jinja string literal: a camera may be called `Joe's door`, and
/// an unescaped quote would end the literal and break the template.
fn jinja_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The discovery payload.
pub fn payload(settings: &Settings) -> Value {
    let dev = object_id(&settings.device.id);
    let version = env!("CARGO_PKG_VERSION");
    let device_avail = availability_topic(settings);
    let mut cmps = serde_json::Map::new();
    for cam in &settings.camera {
        let c = &cam.name;
        // The camera's entities are available when the device and the camera both are.
        let avail = json!({
            "availability": [
                {"topic": device_avail},
                {"topic": camera_topic(settings, c, "availability")}
            ],
            "availability_mode": "all",
        });
        for (what, mut v) in entities(settings, cam) {
            let uid = format!("{dev}_{}_{what}", sanitize(c));
            if let (Value::Object(o), Value::Object(a)) = (&mut v, &avail) {
                o.extend(a.clone());
                o.insert("unique_id".into(), uid.clone().into());
                // Home Assistant 2025.10 replaced `object_id` with this.
                let platform = o.get("p").and_then(Value::as_str).unwrap_or("sensor");
                o.insert(
                    "default_entity_id".into(),
                    format!("{platform}.{uid}").into(),
                );
            }
            cmps.insert(uid, v);
        }
    }
    json!({
        "dev": {
            "ids": [dev],
            "name": format!("edgesight {}", settings.device.id),
            "mf": "edgesight",
            "mdl": "edge vision daemon",
            "sw": version,
        },
        "o": {
            "name": "edgesight",
            "sw": version,
        },
        "cmps": cmps,
        "qos": 1,
    })
}

/// A camera's entities, keyed by what they show: per view (the whole frame, or each
/// region: `<region>_label`...) its label, score and detections; the camera's fps and
/// inference time.
fn entities(settings: &Settings, cam: &CameraSettings) -> Vec<(String, Value)> {
    let c = cam.name.as_str();
    let mut all = Vec::new();
    let views: Vec<Option<&str>> = match cam.regions.is_empty() {
        true => vec![None],
        false => cam.regions.iter().map(|r| Some(r.name.as_str())).collect(),
    };
    for region in views {
        for (what, v) in view_entities(settings, c, region) {
            // Two underscores: a region's ids never meet a camera's own.
            let key = region.map_or(what.to_string(), |r| format!("_{}_{what}", sanitize(r)));
            all.push((key, v));
        }
    }
    let diagnostics = camera_diagnostics(settings, c);
    all.extend(diagnostics.into_iter().map(|(k, v)| (k.to_string(), v)));
    all
}

/// What one view shows (a table): its top label, its score, its detection events; from
/// which topic, and how Home Assistant reads the value out of the payload.
fn view_entities(settings: &Settings, c: &str, region: Option<&str>) -> [(&'static str, Value); 3] {
    let classification = view_topic(settings, c, region, "classification");
    let name = region.map_or(c.to_string(), |r| format!("{c} {r}"));
    [
        (
            "label",
            json!({
                "p": "sensor",
                "name": format!("{name} label"),
                "icon": "mdi:tag-search",
                "state_topic": classification,
                "value_template": "{{ value_json.top[0].label if value_json.top else 'none' }}",
            }),
        ),
        (
            "score",
            json!({
                "p": "sensor",
                "name": format!("{name} score"),
                "state_class": "measurement",
                "state_topic": classification,
                "value_template": "{{ value_json.top[0].score if value_json.top else 0 }}",
            }),
        ),
        (
            "detection",
            json!({
                "p": "event",
                "name": format!("{name} detection"),
                "state_topic": view_topic(settings, c, region, "detection"),
                "event_types": ["start", "update", "end"],
                "value_template": "{{ {'event_type': value_json.type, 'label': value_json.label, \
                                   'score': value_json.score, 'id': value_json.id} | to_json }}",
            }),
        ),
    ]
}

/// A camera's diagnostics (a table): frames classified per second and the time a frame
/// took, from the stats message.
fn camera_diagnostics(settings: &Settings, c: &str) -> [(&'static str, Value); 2] {
    let q = jinja_string(c);
    let stats = stats_topic(settings);
    [
        (
            "fps",
            json!({
                "p": "sensor",
                "name": format!("{c} fps"),
                "entity_category": "diagnostic",
                "state_class": "measurement",
                "unit_of_measurement": "fps",
                "state_topic": stats,
                "value_template": format!("{{{{ value_json.cameras[{q}].fps }}}}"),
            }),
        ),
        (
            "inference",
            json!({
                "p": "sensor",
                "name": format!("{c} inference time"),
                "entity_category": "diagnostic",
                "state_class": "measurement",
                "device_class": "duration",
                "unit_of_measurement": "ms",
                "state_topic": stats,
                "value_template": format!("{{{{ value_json.cameras[{q}].inference_ms_p50 }}}}"),
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        crate::config::from_toml(
            "[device]\nid = \"pi.kitchen\"\n[model]\npath = \"m.onnx\"\n\
             [homeassistant]\ndiscovery = true\n\
             [[camera]]\nname = \"front\"\npath = \"x\"\n[[camera]]\nname = \"back\"\npath = \"x\"\n",
        )
    }

    /// What Home Assistant requires of device-based discovery: a device with identifiers,
    /// an origin with a name, and components each with a platform and a unique id; sensors
    /// and events need a state topic, events their event types.
    #[test]
    fn payload_has_home_assistants_required_fields() {
        let s = settings();
        assert_eq!(
            config_topic(&s),
            "homeassistant/device/edgesight_pi_kitchen/config"
        );
        let p = payload(&s);
        assert!(p["dev"]["ids"][0].as_str().is_some_and(|i| !i.is_empty()));
        assert!(p["o"]["name"].is_string());
        let cmps = p["cmps"].as_object().unwrap();
        assert_eq!(cmps.len(), 10, "5 entities per camera");
        let mut ids = std::collections::HashSet::new();
        for (key, c) in cmps {
            let platform = c["p"].as_str().unwrap();
            assert!(["sensor", "event"].contains(&platform), "{key}");
            let uid = c["unique_id"].as_str().unwrap();
            assert!(ids.insert(uid.to_string()));
            assert_eq!(c["default_entity_id"], format!("{platform}.{uid}"));
            assert!(
                c["state_topic"]
                    .as_str()
                    .unwrap()
                    .starts_with("edgesight/pi.kitchen/")
            );
            assert_eq!(c["availability_mode"], "all");
            assert_eq!(c["availability"].as_array().unwrap().len(), 2);
            if platform == "event" {
                assert_eq!(c["event_types"], json!(["start", "update", "end"]));
            }
        }
        let fps = &cmps["edgesight_pi_kitchen_back_fps"];
        assert_eq!(fps["state_topic"], "edgesight/pi.kitchen/stats");
        assert_eq!(
            fps["value_template"],
            "{{ value_json.cameras['back'].fps }}"
        );
        assert_eq!(fps["entity_category"], "diagnostic");
    }

    /// A camera with regions: each region gets its label, score and detection entities
    /// on its own topics; the camera keeps its diagnostics and loses the whole-frame
    /// entities (nothing publishes on the whole frame's topics).
    #[test]
    fn regions_get_entities_of_their_own() {
        let s = crate::config::from_toml(
            "[device]\nid = \"pi\"\n[model]\npath = \"m.onnx\"\n[homeassistant]\ndiscovery = true\n\
             [[camera]]\nname = \"yard\"\npath = \"x\"\n\
             [[camera.region]]\nname = \"gate\"\nwidth = 0.5\nheight = 1\n\
             [[camera.region]]\nname = \"bird feeder\"\nx = 0.5\nwidth = 0.5\nheight = 1\n",
        );
        let p = payload(&s);
        let cmps = p["cmps"].as_object().unwrap();
        let mut keys: Vec<&str> = cmps.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "edgesight_pi_yard__bird_feeder_detection",
                "edgesight_pi_yard__bird_feeder_label",
                "edgesight_pi_yard__bird_feeder_score",
                "edgesight_pi_yard__gate_detection",
                "edgesight_pi_yard__gate_label",
                "edgesight_pi_yard__gate_score",
                "edgesight_pi_yard_fps",
                "edgesight_pi_yard_inference",
            ]
        );
        let gate = &cmps["edgesight_pi_yard__gate_label"];
        assert_eq!(gate["state_topic"], "edgesight/pi/yard/gate/classification");
        assert_eq!(gate["name"], "yard gate label");
        let feeder = &cmps["edgesight_pi_yard__bird_feeder_detection"];
        assert_eq!(
            feeder["state_topic"],
            "edgesight/pi/yard/bird feeder/detection"
        );
    }

    /// Camera names end up inside Jinja string literals: quotes and backslashes in them
    /// are escaped (checked by hand with jinja2: these render the camera's fps).
    #[test]
    fn camera_names_with_quotes_keep_the_templates_valid() {
        let cases = [
            ("back", "'back'"),
            ("Joe's door", r"'Joe\'s door'"),
            (r"a\b", r"'a\\b'"),
            (r"x\'", r"'x\\\''"),
        ];
        for (name, want) in cases {
            assert_eq!(jinja_string(name), want, "{name}");
        }
        let s = crate::config::from_toml(
            "[device]\nid = \"pi\"\n[model]\npath = \"m.onnx\"\n[homeassistant]\ndiscovery = true\n\
             [[camera]]\nname = \"Joe's door\"\npath = \"x\"\n",
        );
        let p = payload(&s);
        let t = p["cmps"]["edgesight_pi_Joe_s_door_fps"]["value_template"]
            .as_str()
            .unwrap();
        assert_eq!(t, r"{{ value_json.cameras['Joe\'s door'].fps }}");
    }
}
