//! Configuration: a raw layer read by the `config` crate (file, then `config.d/*.toml`
//! drop-ins in name order, then `EDGESIGHT__SECTION__KEY` environment variables),
//! validated once into [`Settings`]. Nothing past this module sees a raw value.
//!
//! - `raw`: every key, its type and its default, defined once (serde derives the reading).
//! - `sources`: the layers, unknown-key checks per file, and where each value came from.
//! - `validate`: ranges, required keys and the rules between keys.
//! - `settings`: the validated types the rest of the daemon uses.
//!
//! Every error names the key path and where the offending value came from (a file or the
//! environment), because on a headless board that message is all the user gets.

use std::path::Path;

mod error;
mod raw;
mod settings;
mod sources;
mod validate;

pub use error::{ConfigError, EX_CONFIG};
pub use settings::*;
pub use sources::{ENV_PREFIX, dropin_dir};

impl Settings {
    /// Read `file`, its `config.d/*.toml` drop-ins and `EDGESIGHT__*` environment variables.
    pub fn load(file: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment supplied (tests pass their own).
    pub fn load_with_env(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let (src, raw) = sources::Sources::read(file, env)?;
        validate::Validator { src: &src }.settings(file, raw)
    }

    /// A configuration error found after the load (the model lacks a label, the outbox
    /// directory is held, the model file does not load) about the value at `key`
    /// ("outbox.dir", "camera[1].path"), naming where that value came from as the load's
    /// own errors do.
    pub fn error_at(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        self.origins.err(key, msg)
    }

    pub fn base_topic(&self) -> String {
        self.mqtt.base_topic(&self.device.id)
    }

    /// Anything goes through the durable outbox: detection events, or classifications
    /// with `classification.durable`.
    pub fn uses_outbox(&self) -> bool {
        self.detection.enabled || self.classification.durable
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Settings from TOML text (unit tests of other modules).
#[cfg(test)]
pub(crate) fn from_toml(text: &str) -> Settings {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("c.toml");
    std::fs::write(&f, text).expect("write the test config");
    Settings::load_with_env(&f, vec![]).expect("valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Data-driven: a region in fractions fits any frame (rounded to whole pixels, at
    /// least one); one in pixels fits only a frame that holds it.
    #[test]
    fn areas_in_frames() {
        let frac = |x, y, width, height| Area::Fraction {
            x,
            y,
            width,
            height,
        };
        let px = |x, y, width, height| {
            Area::Pixels(Rect {
                x,
                y,
                width,
                height,
            })
        };
        let r = |x, y, width, height| {
            Some(Rect {
                x,
                y,
                width,
                height,
            })
        };
        #[rustfmt::skip]
        let cases = [
            (frac(0.0, 0.0, 1.0, 1.0), (1920, 1080), r(0, 0, 1920, 1080)),
            (frac(0.5, 0.5, 0.5, 0.5), (1920, 1080), r(960, 540, 960, 540)),
            (frac(0.25, 0.0, 0.25, 1.0), (641, 480), r(160, 0, 161, 480)),
            (frac(0.999, 0.999, 0.001, 0.001), (100, 100), r(99, 99, 1, 1)),
            (frac(0.0, 0.0, 0.0001, 0.0001), (100, 100), r(0, 0, 1, 1)),
            (px(0, 0, 640, 480), (640, 480), r(0, 0, 640, 480)),
            (px(600, 0, 41, 10), (640, 480), None),
            (px(0, 479, 1, 2), (640, 480), None),
            (px(u32::MAX, 0, 2, 2), (640, 480), None),
        ];
        for (area, (w, h), want) in cases {
            assert_eq!(area.in_frame(w, h).ok(), want, "{area} in {w}x{h}");
        }
        let e = px(600, 0, 41, 10).in_frame(640, 480).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x 600, y 0, 41x10 pixels is outside the 640x480 frame"
        );
    }

    /// `[[model]]` tables and `[[camera.region]]`s: a camera and each region name their
    /// model (a region's default: its camera's; a camera's: the first model).
    #[test]
    fn models_and_regions_are_read_and_defaulted() {
        let s = from_toml(
            r#"
            [[model]]
            name = "big"
            path = "a.onnx"
            [[model]]
            name = "small"
            path = "b.onnx"
            threads = 2
            [[camera]]
            name = "yard"
            path = "x"
            [[camera.region]]
            name = "gate"
            x = 10
            y = 20
            width = 300
            height = 200
            [[camera.region]]
            name = "feeder"
            x = 0.5
            width = 0.5
            height = 0.5
            model = "small"
            [[camera]]
            name = "door"
            path = "y"
            model = "small"
            "#,
        );
        let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["big", "small"]);
        assert_eq!(s.models[1].threads, 2);
        let yard = &s.camera[0];
        assert_eq!(yard.model, "big");
        let regions: Vec<(&str, &str, String)> = yard
            .regions
            .iter()
            .map(|r| (r.name.as_str(), r.model.as_str(), r.area.to_string()))
            .collect();
        assert_eq!(
            regions,
            [
                ("gate", "big", "x 10, y 20, 300x200 pixels".to_string()),
                (
                    "feeder",
                    "small",
                    "x 0.5, y 0, 0.5x0.5 of the frame".to_string()
                )
            ]
        );
        assert_eq!(
            (s.camera[1].model.as_str(), s.camera[1].regions.len()),
            ("small", 0)
        );
        // The effective configuration renders them back as tables the loader reads.
        let again = from_toml(&s.to_redacted_toml());
        assert_eq!(again.models, s.models);
        assert_eq!(again.camera[0].regions, s.camera[0].regions);
    }

    /// The key lists are the raw structs' own: every section of the file is listed, and
    /// `loop` (a renamed field) is a camera key.
    #[test]
    fn known_keys_come_from_the_raw_structs() {
        use serde_aux::serde_introspection::serde_introspect;
        let known = raw::known();
        let sections: Vec<&str> = known.iter().map(|(s, _)| *s).collect();
        let mut want = serde_introspect::<raw::RawConfig>().to_vec();
        let mut got = sections.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        let camera = &known.iter().find(|(s, _)| *s == "camera").unwrap().1;
        assert!(
            camera.contains(&"loop") && !camera.contains(&"looped"),
            "{camera:?}"
        );
    }

    /// `classification.publish`: the two words, humantime's durations, a bare number of
    /// seconds; nothing zero, negative or over a day.
    #[test]
    fn publish_modes_and_intervals() {
        let secs = |s| Some(PublishMode::Interval(std::time::Duration::from_secs(s)));
        let cases = [
            ("every", Some(PublishMode::Every)),
            ("on_change", Some(PublishMode::OnChange)),
            (
                "500ms",
                Some(PublishMode::Interval(std::time::Duration::from_millis(500))),
            ),
            ("10", secs(10)),
            ("2m", secs(120)),
            ("1h 30m", secs(5400)),
            ("24h", secs(86_400)),
            ("25h", None),
            ("0", None),
            ("0s", None),
            ("-5", None),
            ("NaN", None),
            ("soon", None),
        ];
        for (text, want) in cases {
            let got: Option<PublishMode> = serde_json::from_value(serde_json::json!(text)).ok();
            assert_eq!(got, want, "{text:?}");
        }
    }

    /// One definition per default: the command line's model settings and an outbox opened
    /// without a config are what a config that leaves the keys out gets.
    #[test]
    fn defaults_have_one_source() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.toml", MIN);
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        let cli = ModelSettings::for_file(s.models[0].path.clone());
        assert_eq!(format!("{cli:?}"), format!("{:?}", s.models[0]));
        assert_eq!(
            format!("{:?}", OutboxSettings::default()),
            format!("{:?}", s.outbox)
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    const MIN: &str = "[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"front\"\npath = \"x\"\n";

    #[test]
    fn defaults_fill_in() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.toml", &format!("[device]\nid = \"pi\"\n{MIN}"));
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!(s.mqtt.client_id, "edgesight-pi");
        assert_eq!(s.mqtt.port, 1883);
        assert_eq!(s.base_topic(), "edgesight/pi");
        assert!(matches!(
            s.camera[0].source,
            SourceSettings::Images {
                fps: 5.0,
                looped: true,
                ..
            }
        ));
    }

    /// Data-driven: `[model]` keys -> the normalisation that runs. A preset gives all four
    /// values; each key set on its own replaces the preset's; one number stands for all
    /// three channels.
    #[test]
    fn normalization_is_the_preset_with_the_keys_set_applied() {
        let tv = Preprocess::Torchvision.normalization();
        let caffe = Preprocess::Caffe.normalization();
        let raw = Preprocess::Raw.normalization();
        let cases = [
            ("", tv),
            ("preprocess = \"caffe\"", caffe),
            (
                "preprocess = \"raw\"\nscale = 0.00784313725\nmean = 1",
                Normalization {
                    scale: 1.0 / 127.5,
                    mean: [1.0; 3],
                    ..raw
                },
            ),
            (
                "channel_order = \"bgr\"",
                Normalization {
                    channel_order: ChannelOrder::Bgr,
                    ..tv
                },
            ),
            (
                "preprocess = \"caffe\"\nstd = [58.4, 57.1, 57.4]",
                Normalization {
                    std: [58.4, 57.1, 57.4],
                    ..caffe
                },
            ),
            (
                "scale = 1.0\nmean = [123.675, 116.28, 103.53]\nstd = [58.395, 57.12, 57.375]",
                Normalization {
                    scale: 1.0,
                    mean: [123.675, 116.28, 103.53],
                    std: [58.395, 57.12, 57.375],
                    ..tv
                },
            ),
        ];
        let d = tempfile::tempdir().unwrap();
        for (keys, want) in cases {
            let text = MIN.replace("[model]\n", &format!("[model]\n{keys}\n"));
            let f = write(d.path(), "c.toml", &text);
            let s = Settings::load_with_env(&f, vec![]).unwrap();
            let got = s.models[0].normalization;
            assert_eq!(got.channel_order, want.channel_order, "{keys}");
            for (g, w) in [got.scale]
                .iter()
                .chain(&got.mean)
                .chain(&got.std)
                .zip([want.scale].iter().chain(&want.mean).chain(&want.std))
            {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{keys}: {got:?}");
            }
        }
    }

    #[test]
    fn dropins_then_env_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.toml", &format!("[mqtt]\nport = 1000\n{MIN}"));
        write(
            d.path(),
            "config.d/10-a.toml",
            "[mqtt]\nport = 2000\nhost = \"a\"\n",
        );
        write(d.path(), "config.d/20-b.toml", "[mqtt]\nport = 3000\n");
        write(d.path(), "config.d/ignored.txt", "[mqtt]\nport = 9\n");
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!((s.mqtt.port, s.mqtt.host.as_str()), (3000, "a"));
        let env = vec![("EDGESIGHT__MQTT__PORT".to_string(), "4000".to_string())];
        let s = Settings::load_with_env(&f, env).unwrap();
        assert_eq!(s.mqtt.port, 4000);
    }

    #[test]
    fn password_is_read_and_never_rendered() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "hunter2\n");
        let f = write(
            d.path(),
            "c.toml",
            &format!(
                "[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n{MIN}",
                pw.display()
            ),
        );
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!(s.mqtt.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!s.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn camera_url_passwords_are_never_rendered() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "c.toml",
            "[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"c\"\nsource = \"rtsp\"\n\
             url = \"rtsp://admin:hunter2@cam:554/live\"\n\
             [[camera]]\nname = \"d\"\nsource = \"http-mjpeg\"\n\
             url = \"http://u:p%40hunter2@cam/video.mjpg\"\n\
             [[camera]]\nname = \"e\"\nsource = \"pipe\"\n\
             command = \"ffmpeg -i rtsp://u:hunter2@cam/x -f mjpeg -\"\n",
        );
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        let toml = s.to_redacted_toml();
        assert!(toml.contains("rtsp://admin:***@cam:554/live"), "{toml}");
        assert!(!toml.contains("hunter2"), "{toml}");
        assert!(!format!("{s:?}").contains("hunter2"));
        let SourceSettings::HttpMjpeg { url, .. } = &s.camera[1].source else {
            panic!("http-mjpeg")
        };
        // What the source itself uses: whole, and the credentials decoded.
        assert_eq!(url.expose(), "http://u:p%40hunter2@cam/video.mjpg");
        let creds = Some(("u".to_string(), "p@hunter2".to_string()));
        assert_eq!(url.credentials(), creds);
        assert_eq!(
            (url.authority(), url.path().as_str()),
            ("cam", "/video.mjpg")
        );
        assert_eq!(url.secrets(), ["p%40hunter2", "p@hunter2"]);
    }

    /// Data-driven: URL, then its shown form, authority, path and credentials.
    #[test]
    fn camera_urls_are_taken_apart_as_written() {
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            Option<(&'a str, &'a str)>,
        );
        let cases: &[Case] = &[
            ("rtsp://cam/live", "rtsp://cam/live", "cam", "/live", None),
            ("http://cam:8080", "http://cam:8080", "cam:8080", "/", None),
            (
                "rtsp://u:p@ss@10.0.0.2:554/a?b=c#f",
                "rtsp://u:***@10.0.0.2:554/a?b=c#f",
                "10.0.0.2:554",
                "/a?b=c",
                Some(("u", "p@ss")),
            ),
            (
                "http://user@[fe80::1]:81/v",
                "http://user:***@[fe80::1]:81/v",
                "[fe80::1]:81",
                "/v",
                Some(("user", "")),
            ),
            ("http://cam?x=1", "http://cam?x=1", "cam", "/?x=1", None),
            ("http://cam#top", "http://cam#top", "cam", "/", None),
        ];
        for &(url, shown, authority, path, creds) in cases {
            let u = SourceUrl::parse(url, &["rtsp", "http"]).unwrap();
            assert_eq!(u.to_string(), shown, "{url}");
            assert_eq!(
                (u.authority(), u.path().as_str()),
                (authority, path),
                "{url}"
            );
            let creds = creds.map(|(a, b)| (a.to_string(), b.to_string()));
            assert_eq!(u.credentials(), creds, "{url}");
        }
        for bad in [
            "cam/live",
            "ftp://cam/x",
            "rtsp://",
            "rtsp://u:p@/x",
            "rtsp://c m/x",
        ] {
            assert!(SourceUrl::parse(bad, &["rtsp"]).is_err(), "{bad}");
        }
    }
}
