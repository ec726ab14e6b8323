//! Raw -> [`Settings`]: ranges, required keys and the rules between keys, each checked
//! once, here. Defaults are not written here: they are the raw layer's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::ConfigError;
use super::raw::{
    DEFAULT_FSYNC_INTERVAL_MS, FsyncPolicy, OneOrThree, RawCamera, RawCameraCommon, RawCommand,
    RawCommands, RawConfig, RawDetection, RawHardExamples, RawHomeAssistant, RawHttpMjpeg,
    RawImages, RawModel, RawMqtt, RawOutbox, RawPicamera, RawPipe, RawRegion, RawRtsp,
    RawSnapshots, RawSource, RawV4l2, SourceKind, default_state_dir,
};
use super::settings::{
    Area, CameraSettings, ClassificationSettings, CommandLine, CommandSettings, DetectionSettings,
    DeviceSettings, Fsync, HardExampleSettings, HomeAssistantSettings, LogSettings,
    MQTT_MAX_PACKET, MetricsSettings, ModelSettings, MqttSettings, Normalization, OutboxSettings,
    Rect, RegionSettings, SYSTEM_CA_FILE, Secret, Settings, SnapshotMode, SnapshotSettings,
    SourceSettings, SourceUrl, StreamFormat, TlsSettings,
};
use super::sources::Sources;

/// `outbox.max_bytes` at most: 16 GiB, or what a 32-bit board (armv7) addresses, so the
/// cast to `usize` never wraps.
const MAX_OUTBOX_BYTES: i64 = if usize::BITS < 64 {
    usize::MAX as i64
} else {
    1 << 34
};

pub(super) struct Validator<'a> {
    pub src: &'a Sources,
}

/// What a region is checked against: its camera's model and frame size, the models.
struct RegionCtx<'a> {
    /// `camera[i].region[j]`.
    at: String,
    /// The camera's model, snapshots and hard examples: the region's defaults.
    camera: (&'a str, SnapshotMode, bool),
    models: &'a [ModelSettings],
    frame: Option<(u32, u32)>,
}

impl Validator<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        self.src.err(key, msg)
    }

    fn range(&self, key: &str, v: i64, lo: i64, hi: i64) -> Result<i64, ConfigError> {
        if v < lo || v > hi {
            return Err(self.err(key, format!("{v} is out of range {lo}..={hi}")));
        }
        Ok(v)
    }

    /// `(0, max]`, for durations in seconds.
    fn positive(&self, key: &str, v: f64, max: f64) -> Result<f64, ConfigError> {
        if v > 0.0 && v <= max {
            Ok(v)
        } else {
            Err(self.err(key, format!("{v} is out of range (0, {max}]")))
        }
    }

    fn unit(&self, key: &str, v: f64) -> Result<f32, ConfigError> {
        if !(0.0..=1.0).contains(&v) {
            return Err(self.err(key, format!("{v} is out of range 0..=1")));
        }
        Ok(v as f32)
    }

    fn topic_level(&self, key: &str, v: &str) -> Result<(), ConfigError> {
        if v.is_empty() || v.contains(['/', '+', '#', '\0']) {
            return Err(self.err(
                key,
                format!("{v:?} must be a non-empty MQTT topic level without '/', '+' or '#'"),
            ));
        }
        Ok(())
    }

    /// `name` (at `key`) is none of `taken`, the names of the other `what`s.
    fn unique<'n>(
        &self,
        key: &str,
        name: &str,
        mut taken: impl Iterator<Item = &'n str>,
        what: &str,
    ) -> Result<(), ConfigError> {
        if taken.any(|t| t == name) {
            return Err(self.err(key, format!("{name:?} is used by another {what}")));
        }
        Ok(())
    }

    /// A topic prefix: levels, but no wildcards and no trailing '/'.
    fn topic_prefix(&self, key: &str, v: &str) -> Result<(), ConfigError> {
        if v.is_empty() || v.contains(['+', '#', '\0']) || v.ends_with('/') {
            return Err(self.err(
                key,
                format!("{v:?} must be a non-empty topic without wildcards or trailing '/'"),
            ));
        }
        Ok(())
    }

    pub fn settings(&self, file: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
        let device_id = raw.device.id.unwrap_or_else(default_device_id);
        self.topic_level("device.id", &device_id)?;
        let state_dir = raw.device.state_dir.unwrap_or_else(default_state_dir);
        if state_dir.as_os_str().is_empty() {
            return Err(self.err("device.state_dir", "is empty"));
        }
        let models = self.models(file, raw.model)?;
        if raw.camera.is_empty() {
            return Err(ConfigError::new(format!(
                "camera: at least one [[camera]] table is required (in {})",
                file.display()
            )));
        }
        Ok(Settings {
            origins: std::sync::Arc::new(self.src.clone()),
            file: file.to_path_buf(),
            mqtt: self.mqtt(raw.mqtt, &device_id)?,
            outbox: self.outbox(raw.outbox, &state_dir)?,
            device: DeviceSettings {
                id: device_id,
                state_dir,
            },
            camera: self.cameras(raw.camera, &models)?,
            models,
            log: LogSettings {
                level: raw.log.level,
            },
            detection: self.detection(raw.detection)?,
            classification: ClassificationSettings {
                publish: raw.classification.publish,
                durable: raw.classification.durable,
            },
            commands: self.commands(raw.commands)?,
            snapshots: self.snapshots(raw.snapshots)?,
            hard_examples: self.hard_examples(raw.hard_examples)?,
            homeassistant: self.homeassistant(raw.homeassistant)?,
            metrics: MetricsSettings {
                listen: match raw.metrics.listen {
                    Some(l) => Some(l.parse().map_err(|e| {
                        self.err(
                            "metrics.listen",
                            format!("{l:?}: {e}; an IP address and port, e.g. \"127.0.0.1:9898\""),
                        )
                    })?),
                    None => None,
                },
            },
        })
    }

    fn mqtt(&self, m: RawMqtt, device_id: &str) -> Result<MqttSettings, ConfigError> {
        self.topic_prefix("mqtt.prefix", &m.prefix)?;
        if m.host.trim().is_empty() {
            return Err(self.err("mqtt.host", "is empty"));
        }
        let password = match &m.password_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    self.err(
                        "mqtt.password_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
            }
            None => None,
        };
        if password.is_some() && m.username.is_none() {
            return Err(self.err("mqtt.password_file", "is set but mqtt.username is not"));
        }
        let reconnect_min_ms =
            self.range("mqtt.reconnect_min_ms", m.reconnect_min_ms, 10, 600_000)?;
        let reconnect_max_ms =
            self.range("mqtt.reconnect_max_ms", m.reconnect_max_ms, 10, 3_600_000)?;
        if reconnect_max_ms < reconnect_min_ms {
            return Err(self.err("mqtt.reconnect_max_ms", "must be >= mqtt.reconnect_min_ms"));
        }
        let port = self.range("mqtt.port", m.port, 1, 65535)? as u16;
        let client_id = m
            .client_id
            .unwrap_or_else(|| format!("edgesight-{device_id}"));
        if client_id.is_empty() {
            return Err(self.err("mqtt.client_id", "is empty"));
        }
        Ok(MqttSettings {
            tls: self.tls(
                m.tls.unwrap_or(port == 8883),
                m.ca_file,
                m.client_cert_file,
                m.client_key_file,
            )?,
            host: m.host,
            port,
            qos: self.range("mqtt.qos", m.qos, 0, 2)? as u8,
            client_id,
            prefix: m.prefix,
            username: m.username,
            password_file: m.password_file,
            password,
            embedded_broker: m.embedded_broker,
            keep_alive_secs: self.range("mqtt.keep_alive_secs", m.keep_alive_secs, 5, 3600)? as u64,
            reconnect_min_ms: reconnect_min_ms as u64,
            reconnect_max_ms: reconnect_max_ms as u64,
            queue: self.range("mqtt.queue", m.queue, 1, 1_000_000)? as usize,
            stats_interval_secs: self.range(
                "mqtt.stats_interval_secs",
                m.stats_interval_secs,
                0,
                86_400,
            )? as u64,
        })
    }

    fn pem(&self, key: &str, path: &Path, what: &str) -> Result<Vec<u8>, ConfigError> {
        let bytes = std::fs::read(path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let marker = format!("-----BEGIN {what}");
        if !String::from_utf8_lossy(&bytes).contains(&marker) {
            return Err(self.err(key, format!("{} holds no PEM {what} block", path.display())));
        }
        Ok(bytes)
    }

    fn tls(
        &self,
        on: bool,
        ca_file: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsSettings>, ConfigError> {
        if !on {
            for (k, set) in [
                ("mqtt.ca_file", ca_file.is_some()),
                ("mqtt.client_cert_file", cert.is_some()),
                ("mqtt.client_key_file", key.is_some()),
            ] {
                if set {
                    return Err(self.err(k, "is set but TLS is off (mqtt.tls = false, or a port other than 8883 without mqtt.tls = true)"));
                }
            }
            return Ok(None);
        }
        match (&cert, &key) {
            (Some(_), None) => {
                return Err(self.err("mqtt.client_cert_file", "needs mqtt.client_key_file too"));
            }
            (None, Some(_)) => {
                return Err(self.err("mqtt.client_key_file", "needs mqtt.client_cert_file too"));
            }
            _ => {}
        }
        let ca_file = ca_file.unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
        let ca = self.pem("mqtt.ca_file", &ca_file, "CERTIFICATE")?;
        let client_auth = match (&cert, &key) {
            (Some(c), Some(k)) => Some((
                self.pem("mqtt.client_cert_file", c, "CERTIFICATE")?,
                Secret(
                    String::from_utf8(self.pem("mqtt.client_key_file", k, "")?)
                        .map_err(|_| self.err("mqtt.client_key_file", "is not PEM text"))?,
                ),
            )),
            _ => None,
        };
        Ok(Some(TlsSettings {
            ca_file,
            ca,
            client_cert_file: cert,
            client_key_file: key,
            client_auth,
        }))
    }

    /// `[model]` (the model named `default`) or `[[model]]` tables (each named).
    fn models(
        &self,
        file: &Path,
        value: serde_json::Value,
    ) -> Result<Vec<ModelSettings>, ConfigError> {
        let tables = match value {
            serde_json::Value::Null => vec![],
            serde_json::Value::Array(tables) => tables
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("model[{i}]"), t))
                .collect(),
            one => vec![("model".to_string(), one)],
        };
        if tables.is_empty() {
            return Err(ConfigError::new(format!(
                "model.path is required (in {} or EDGESIGHT__MODEL__PATH), or [[model]] tables",
                file.display()
            )));
        }
        let several = tables.len() > 1 || tables[0].0 != "model";
        let mut models: Vec<ModelSettings> = Vec::with_capacity(tables.len());
        for (at, table) in tables {
            let raw: RawModel = self.src.deserialize(&at, table)?;
            let m = self.model(&at, several, raw)?;
            let names = models.iter().map(|o| o.name.as_str());
            self.unique(&format!("{at}.name"), &m.name, names, "model")?;
            models.push(m);
        }
        Ok(models)
    }

    fn model(&self, at: &str, several: bool, r: RawModel) -> Result<ModelSettings, ConfigError> {
        let k = |f: &str| format!("{at}.{f}");
        let name = match (r.name.clone(), several) {
            (Some(n), _) => n,
            (None, false) => "default".to_string(),
            (None, true) => return Err(self.err(&k("name"), "is required in [[model]] tables")),
        };
        self.topic_level(&k("name"), &name)?;
        let path = r
            .path
            .clone()
            .ok_or_else(|| self.err(&k("path"), "is required"))?;
        let normalization = self.normalization(at, &r)?;
        Ok(ModelSettings {
            name,
            path,
            labels: r.labels,
            preprocess: r.preprocess,
            normalization,
            resize: r.resize,
            top_k: self.range(&k("top_k"), r.top_k, 1, 1000)? as usize,
            threshold: self.unit(&k("threshold"), r.threshold)?,
            threads: self.range(&k("threads"), r.threads, 1, 64)? as usize,
        })
    }

    /// The preset's normalisation with the keys set on their own applied.
    fn normalization(&self, at: &str, r: &RawModel) -> Result<Normalization, ConfigError> {
        let mut n = r.preprocess.normalization();
        if let Some(order) = r.channel_order {
            n.channel_order = order;
        }
        if let Some(scale) = r.scale {
            n.scale = self.positive(&format!("{at}.scale"), scale, 1e6)? as f32;
        }
        if let Some(mean) = &r.mean {
            n.mean = self.per_channel(&format!("{at}.mean"), mean, |_| true, "finite")?;
        }
        if let Some(std) = &r.std {
            n.std = self.per_channel(&format!("{at}.std"), std, |v| v > 0.0, "> 0")?;
        }
        Ok(n)
    }

    /// One number for all three channels, or three; each finite, not too large and `ok`
    /// (a std of 0 would divide by zero), which the error words as `want`.
    fn per_channel(
        &self,
        key: &str,
        v: &OneOrThree,
        ok: impl Fn(f64) -> bool,
        want: &str,
    ) -> Result<[f32; 3], ConfigError> {
        let values = match v {
            OneOrThree::One(x) => vec![*x; 3],
            OneOrThree::Each(xs) if xs.len() == 3 => xs.clone(),
            OneOrThree::Each(xs) => {
                return Err(self.err(
                    key,
                    format!(
                        "{} values; give one per channel (3) or one for all",
                        xs.len()
                    ),
                ));
            }
        };
        let mut out = [0f32; 3];
        for (o, x) in out.iter_mut().zip(values) {
            if !(x.is_finite() && x.abs() <= 1e6 && ok(x)) {
                return Err(self.err(
                    key,
                    format!("{x} is not a usable value ({want}, at most 1e6)"),
                ));
            }
            *o = x as f32;
        }
        Ok(out)
    }

    fn detection(&self, d: RawDetection) -> Result<DetectionSettings, ConfigError> {
        let mut thresholds = std::collections::BTreeMap::new();
        for (label, t) in d.thresholds {
            let t = self.unit(&format!("detection.thresholds.{label}"), t)?;
            thresholds.insert(label, t);
        }
        Ok(DetectionSettings {
            enabled: d.enabled,
            threshold: self.unit("detection.threshold", d.threshold)?,
            hysteresis: self.unit("detection.hysteresis", d.hysteresis)?,
            min_frames: self.range("detection.min_frames", d.min_frames, 1, 10_000)? as u32,
            end_frames: self.range("detection.end_frames", d.end_frames, 1, 10_000)? as u32,
            update_interval_secs: self.positive(
                "detection.update_interval_secs",
                d.update_interval_secs,
                86_400.0,
            )?,
            labels: d.labels,
            thresholds,
        })
    }

    fn outbox(&self, o: RawOutbox, state_dir: &Path) -> Result<OutboxSettings, ConfigError> {
        let interval_ms = o.fsync_interval_ms.unwrap_or(DEFAULT_FSYNC_INTERVAL_MS);
        let interval = self.range("outbox.fsync_interval_ms", interval_ms, 10, 3_600_000)?;
        let fsync = match o.fsync {
            FsyncPolicy::Always => Fsync::Always,
            FsyncPolicy::Interval => Fsync::Interval(Duration::from_millis(interval as u64)),
            FsyncPolicy::Never => Fsync::Never,
        };
        if o.fsync_interval_ms.is_some() && o.fsync != FsyncPolicy::Interval {
            return Err(self.err(
                "outbox.fsync_interval_ms",
                "only applies to fsync = \"interval\"",
            ));
        }
        let dir = o.dir.unwrap_or_else(|| state_dir.join("outbox"));
        if dir.as_os_str().is_empty() {
            return Err(self.err("outbox.dir", "is empty"));
        }
        Ok(OutboxSettings {
            dir,
            fsync,
            max_events: self.range("outbox.max_events", o.max_events, 1, 10_000_000)? as usize,
            // At least one full-size record must fit.
            max_bytes: self.range("outbox.max_bytes", o.max_bytes, 64 << 10, MAX_OUTBOX_BYTES)?
                as usize,
            // At most rumqttc's in-flight limit (100): past it the client queues them itself.
            window: self.range("outbox.window", o.window, 1, 100)? as usize,
        })
    }

    /// A JPEG's size limit: below the MQTT packet limit, with room for the topic and
    /// header, so every snapshot can be published.
    fn jpeg_limit(&self, key: &str, v: i64) -> Result<usize, ConfigError> {
        Ok(self.range(key, v, 4096, (MQTT_MAX_PACKET - 4096) as i64)? as usize)
    }

    fn snapshots(&self, s: RawSnapshots) -> Result<SnapshotSettings, ConfigError> {
        Ok(SnapshotSettings {
            max_files: self.range("snapshots.max_files", s.max_files, 1, 1_000_000)? as usize,
            max_bytes: self.range("snapshots.max_bytes", s.max_bytes, 1 << 20, 1 << 40)? as u64,
            jpeg_max_bytes: self.jpeg_limit("snapshots.jpeg_max_bytes", s.jpeg_max_bytes)?,
        })
    }

    fn hard_examples(&self, h: RawHardExamples) -> Result<HardExampleSettings, ConfigError> {
        let min_score = self.unit("hard_examples.min_score", h.min_score)?;
        let max_score = self.unit("hard_examples.max_score", h.max_score)?;
        if max_score < min_score {
            return Err(self.err(
                "hard_examples.max_score",
                format!("{max_score} is below hard_examples.min_score ({min_score})"),
            ));
        }
        Ok(HardExampleSettings {
            min_score,
            max_score,
            flips: h.flips,
            min_interval_secs: self.positive(
                "hard_examples.min_interval_secs",
                h.min_interval_secs,
                86_400.0,
            )?,
            max_files: self.range("hard_examples.max_files", h.max_files, 1, 1_000_000)? as usize,
            max_bytes: self.range("hard_examples.max_bytes", h.max_bytes, 1 << 20, 1 << 40)? as u64,
        })
    }

    fn commands(&self, c: RawCommands) -> Result<CommandSettings, ConfigError> {
        Ok(CommandSettings {
            enabled: c.enabled,
            max_payload_bytes: self.range(
                "commands.max_payload_bytes",
                c.max_payload_bytes,
                16,
                65_536,
            )? as usize,
            snapshot_max_bytes: self
                .jpeg_limit("commands.snapshot_max_bytes", c.snapshot_max_bytes)?,
        })
    }

    fn homeassistant(&self, h: RawHomeAssistant) -> Result<HomeAssistantSettings, ConfigError> {
        self.topic_prefix("homeassistant.prefix", &h.prefix)?;
        Ok(HomeAssistantSettings {
            discovery: h.discovery,
            prefix: h.prefix,
        })
    }

    fn cameras(
        &self,
        tables: Vec<serde_json::Map<String, serde_json::Value>>,
        models: &[ModelSettings],
    ) -> Result<Vec<CameraSettings>, ConfigError> {
        let mut cameras: Vec<CameraSettings> = Vec::with_capacity(tables.len());
        for (i, table) in tables.into_iter().enumerate() {
            let c = self.camera(i, self.read_camera(i, table)?, models)?;
            let names = cameras.iter().map(|o| o.name.as_str());
            self.unique(&format!("camera[{i}].name"), &c.name, names, "camera")?;
            cameras.push(c);
        }
        Ok(cameras)
    }

    /// The two steps of the camera's tagged enum (see [`RawCamera`]): `source` picks the
    /// source; its keys go to that source's struct, the rest to the shared one.
    fn read_camera(
        &self,
        i: usize,
        mut table: serde_json::Map<String, serde_json::Value>,
    ) -> Result<RawCamera, ConfigError> {
        let at = format!("camera[{i}]");
        let kind: SourceKind = match table.remove("source") {
            Some(v) => self.src.deserialize(&format!("{at}.source"), v)?,
            None => SourceKind::default(),
        };
        let mut own = serde_json::Map::new();
        for key in SourceKind::ALL.iter().flat_map(|k| k.keys()) {
            let Some(v) = table.remove(*key) else {
                continue;
            };
            if !kind.keys().contains(key) {
                let owners: Vec<String> = SourceKind::ALL
                    .iter()
                    .filter(|k| k.keys().contains(key))
                    .map(|k| format!("\"{}\"", k.name()))
                    .collect();
                return Err(self.err(
                    &format!("{at}.{key}"),
                    format!(
                        "only applies to source = {} (this camera's source is \"{}\")",
                        owners.join(" or "),
                        kind.name()
                    ),
                ));
            }
            own.insert(key.to_string(), v);
        }
        let common: RawCameraCommon = self.src.deserialize(&at, table.into())?;
        let source = match kind {
            SourceKind::Images => RawSource::Images(self.src.deserialize(&at, own.into())?),
            SourceKind::V4l2 => RawSource::V4l2(self.src.deserialize(&at, own.into())?),
            SourceKind::Pipe => RawSource::Pipe(self.src.deserialize(&at, own.into())?),
            SourceKind::Picamera => RawSource::Picamera(self.src.deserialize(&at, own.into())?),
            SourceKind::Rtsp => RawSource::Rtsp(self.src.deserialize(&at, own.into())?),
            SourceKind::HttpMjpeg => RawSource::HttpMjpeg(self.src.deserialize(&at, own.into())?),
        };
        Ok(RawCamera { common, source })
    }

    fn camera(
        &self,
        i: usize,
        raw: RawCamera,
        models: &[ModelSettings],
    ) -> Result<CameraSettings, ConfigError> {
        let k = |f: &str| format!("camera[{i}].{f}");
        let c = raw.common;
        let model = match c.model {
            Some(m) => self.model_name(&k("model"), m, models)?,
            None => models[0].name.clone(),
        };
        let name = c.name.ok_or_else(|| self.err(&k("name"), "is required"))?;
        self.topic_level(&k("name"), &name)?;
        let reopen_min_ms = self.range(&k("reopen_min_ms"), c.reopen_min_ms, 10, 600_000)?;
        let reopen_max_ms = self.range(&k("reopen_max_ms"), c.reopen_max_ms, 10, 3_600_000)?;
        if reopen_max_ms < reopen_min_ms {
            return Err(self.err(
                &k("reopen_max_ms"),
                format!("must be >= {}", k("reopen_min_ms")),
            ));
        }
        if !(0.0..=255.0).contains(&c.change_threshold) {
            return Err(self.err(
                &k("change_threshold"),
                format!("{} is out of range 0..=255", c.change_threshold),
            ));
        }
        let source = match raw.source {
            RawSource::Images(s) => self.images(&k, s)?,
            RawSource::V4l2(s) => self.v4l2(&k, s)?,
            RawSource::Pipe(s) => self.pipe(&k, s)?,
            RawSource::Picamera(s) => self.picamera(&k, s)?,
            RawSource::Rtsp(s) => self.rtsp(&k, s)?,
            RawSource::HttpMjpeg(s) => self.http_mjpeg(&k, s)?,
        };
        let mut regions: Vec<RegionSettings> = Vec::with_capacity(c.region.len());
        for (j, r) in c.region.into_iter().enumerate() {
            let ctx = RegionCtx {
                at: k(&format!("region[{j}]")),
                camera: (&model, c.snapshots, c.hard_examples),
                models,
                frame: source.frame_size(),
            };
            let r = self.region(&ctx, r)?;
            let names = regions.iter().map(|o| o.name.as_str());
            let what = "region of this camera";
            self.unique(&format!("{}.name", ctx.at), &r.name, names, what)?;
            regions.push(r);
        }
        Ok(CameraSettings {
            name,
            source,
            model,
            regions,
            snapshots: c.snapshots,
            hard_examples: c.hard_examples,
            max_age_ms: self.range(&k("max_age_ms"), c.max_age_ms, 1, 3_600_000)? as u64,
            stall_secs: self.positive(&k("stall_secs"), c.stall_secs, 3600.0)?,
            reopen_min_ms: reopen_min_ms as u64,
            reopen_max_ms: reopen_max_ms as u64,
            change_threshold: c.change_threshold as f32,
            heartbeat_secs: self.positive(&k("heartbeat_secs"), c.heartbeat_secs, 86_400.0)?,
        })
    }

    /// A name of one of `models`.
    fn model_name(
        &self,
        key: &str,
        name: String,
        models: &[ModelSettings],
    ) -> Result<String, ConfigError> {
        if models.iter().any(|m| m.name == name) {
            return Ok(name);
        }
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        Err(self.err(
            key,
            format!("no model is named {name:?} (models: {})", names.join(", ")),
        ))
    }

    fn region(&self, ctx: &RegionCtx, r: RawRegion) -> Result<RegionSettings, ConfigError> {
        let k = |f: &str| format!("{}.{f}", ctx.at);
        let name = r.name.ok_or_else(|| self.err(&k("name"), "is required"))?;
        self.topic_level(&k("name"), &name)?;
        let model = match r.model {
            Some(m) => self.model_name(&k("model"), m, ctx.models)?,
            None => ctx.camera.0.to_string(),
        };
        let width = r
            .width
            .ok_or_else(|| self.err(&k("width"), "is required"))?;
        let height = r
            .height
            .ok_or_else(|| self.err(&k("height"), "is required"))?;
        let values = [("x", r.x), ("y", r.y), ("width", width), ("height", height)];
        for (key, v) in values {
            if !(v.is_finite() && (0.0..=65_535.0).contains(&v)) {
                return Err(self.err(&k(key), format!("{v} is out of range 0..=65535")));
            }
        }
        for (key, v) in [("width", width), ("height", height)] {
            if v == 0.0 {
                return Err(self.err(&k(key), "must be more than 0"));
            }
        }
        let area = if values.iter().all(|(_, v)| *v <= 1.0) {
            for (key, at, len) in [("width", r.x, width), ("height", r.y, height)] {
                if at + len > 1.0 + 1e-9 {
                    return Err(self.err(
                        &k(key),
                        format!(
                            "{at} + {len} passes the frame's edge (fractions of the frame: \
                             all four values are between 0 and 1)"
                        ),
                    ));
                }
            }
            Area::Fraction {
                x: r.x,
                y: r.y,
                width,
                height,
            }
        } else {
            if let Some((key, v)) = values.iter().find(|(_, v)| v.fract() != 0.0) {
                return Err(self.err(
                    &k(key),
                    format!(
                        "{v} is not a whole number of pixels (a region is in fractions of the \
                         frame only when all four values are between 0 and 1)"
                    ),
                ));
            }
            let px = |v: f64| v as u32;
            Area::Pixels(Rect {
                x: px(r.x),
                y: px(r.y),
                width: px(width),
                height: px(height),
            })
        };
        if let Some((fw, fh)) = ctx.frame {
            area.in_frame(fw, fh)
                .map_err(|e| self.err(&ctx.at, format!("{e} this source is told to deliver")))?;
        }
        Ok(RegionSettings {
            name,
            area,
            model,
            snapshots: r.snapshots.unwrap_or(ctx.camera.1),
            hard_examples: r.hard_examples.unwrap_or(ctx.camera.2),
        })
    }

    fn images(
        &self,
        k: &dyn Fn(&str) -> String,
        s: RawImages,
    ) -> Result<SourceSettings, ConfigError> {
        let path = s
            .path
            .ok_or_else(|| self.err(&k("path"), "is required for source = \"images\""))?;
        Ok(SourceSettings::Images {
            path,
            fps: self.positive(&k("fps"), s.fps, 1000.0)?,
            looped: s.looped,
        })
    }

    fn v4l2(&self, k: &dyn Fn(&str) -> String, s: RawV4l2) -> Result<SourceSettings, ConfigError> {
        if s.fps.fract() != 0.0 || !(1.0..=240.0).contains(&s.fps) {
            return Err(self.err(
                &k("fps"),
                format!("{} must be a whole number in 1..=240", s.fps),
            ));
        }
        Ok(SourceSettings::V4l2 {
            device: s.device,
            width: self.range(&k("width"), s.width, 16, 8192)? as u32,
            height: self.range(&k("height"), s.height, 16, 8192)? as u32,
            fps: s.fps as u32,
            format: s.format,
        })
    }
}

/// Frame rates a stream source may ask for.
const STREAM_FPS_MAX: f64 = 120.0;

impl Validator<'_> {
    fn pipe(&self, k: &dyn Fn(&str) -> String, s: RawPipe) -> Result<SourceSettings, ConfigError> {
        let required = || self.err(&k("command"), "is required for source = \"pipe\"");
        let command = match s.command.ok_or_else(required)? {
            RawCommand::Args(v) => v,
            RawCommand::Line(line) => shlex::split(&line).ok_or_else(|| {
                self.err(
                    &k("command"),
                    "has an unclosed quote or a trailing backslash",
                )
            })?,
        };
        if command.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(self.err(&k("command"), "names no program"));
        }
        if command.iter().any(|a| a.contains('\0')) {
            return Err(self.err(&k("command"), "contains a NUL byte"));
        }
        let (width, height) = self.stream_size(k, s.width, s.height)?;
        if s.format != StreamFormat::Mjpeg {
            let Some((w, h)) = width.zip(height) else {
                // Named by the key that was set, so the message says where.
                return Err(self.err(
                    &k("format"),
                    format!(
                        "\"{}\" is a raw format: width and height are required with it",
                        s.format.name()
                    ),
                ));
            };
            if w % 2 != 0 || h % 2 != 0 {
                return Err(self.err(
                    &k("width"),
                    format!("{w}x{h}: raw 4:2:0 frames need an even width and height"),
                ));
            }
        }
        Ok(SourceSettings::Pipe {
            command: CommandLine(command),
            format: s.format,
            width,
            height,
            fps: self.positive(&k("fps"), s.fps, STREAM_FPS_MAX)?,
        })
    }

    /// An optional frame size: both or neither.
    fn stream_size(
        &self,
        k: &dyn Fn(&str) -> String,
        w: Option<i64>,
        h: Option<i64>,
    ) -> Result<(Option<u32>, Option<u32>), ConfigError> {
        match (w, h) {
            (Some(w), Some(h)) => Ok((
                Some(self.range(&k("width"), w, 16, 8192)? as u32),
                Some(self.range(&k("height"), h, 16, 8192)? as u32),
            )),
            (None, None) => Ok((None, None)),
            (Some(_), None) => Err(self.err(&k("height"), "is required when width is set")),
            (None, Some(_)) => Err(self.err(&k("width"), "is required when height is set")),
        }
    }

    fn args(&self, key: &str, args: Vec<String>) -> Result<Vec<String>, ConfigError> {
        if args.iter().any(|a| a.contains('\0')) {
            return Err(self.err(key, "contains a NUL byte"));
        }
        Ok(args)
    }

    fn picamera(
        &self,
        k: &dyn Fn(&str) -> String,
        s: RawPicamera,
    ) -> Result<SourceSettings, ConfigError> {
        let width = self.range(&k("width"), s.width, 16, 8192)? as u32;
        let height = self.range(&k("height"), s.height, 16, 8192)? as u32;
        match s.format {
            StreamFormat::Mjpeg => {}
            // rpicam-vid pads YUV420 rows to its buffers' stride (a multiple of 64 bytes
            // for the luma): only unpadded sizes can be read as packed frames.
            StreamFormat::Yuv420 if width.is_multiple_of(64) && height.is_multiple_of(2) => {}
            StreamFormat::Yuv420 => {
                return Err(self.err(
                    &k("width"),
                    format!(
                        "{width}x{height}: format = \"yuv420\" needs a width that is a \
                         multiple of 64 and an even height (rpicam-vid pads other rows)"
                    ),
                ));
            }
            StreamFormat::Nv12 => {
                return Err(self.err(
                    &k("format"),
                    "rpicam-vid writes \"mjpeg\" or \"yuv420\", not \"nv12\"",
                ));
            }
        }
        Ok(SourceSettings::Picamera {
            camera: self.range(&k("camera"), s.camera, 0, 63)? as u32,
            width,
            height,
            fps: self.positive(&k("fps"), s.fps, STREAM_FPS_MAX)?,
            format: s.format,
            args: self.args(&k("args"), s.args)?,
        })
    }

    fn url(
        &self,
        key: &str,
        url: Option<String>,
        source: &str,
        schemes: &[&str],
    ) -> Result<SourceUrl, ConfigError> {
        let url =
            url.ok_or_else(|| self.err(key, format!("is required for source = \"{source}\"")))?;
        // The message never repeats the URL: it may hold a password.
        SourceUrl::parse(&url, schemes).map_err(|why| self.err(key, why))
    }

    fn rtsp(&self, k: &dyn Fn(&str) -> String, s: RawRtsp) -> Result<SourceSettings, ConfigError> {
        let (width, height) = self.stream_size(k, s.width, s.height)?;
        Ok(SourceSettings::Rtsp {
            url: self.url(&k("url"), s.url, "rtsp", &["rtsp", "rtsps"])?,
            transport: s.transport,
            width,
            height,
            fps: self.positive(&k("fps"), s.fps, STREAM_FPS_MAX)?,
            args: self.args(&k("args"), s.args)?,
        })
    }

    fn http_mjpeg(
        &self,
        k: &dyn Fn(&str) -> String,
        s: RawHttpMjpeg,
    ) -> Result<SourceSettings, ConfigError> {
        let url = self.url(&k("url"), s.url, "http-mjpeg", &["http", "https"])?;
        if url.scheme() == "https" {
            return Err(self.err(
                &k("url"),
                "https is not read directly; use source = \"pipe\" with \
                 command = \"ffmpeg -i <url> -f mjpeg -\"",
            ));
        }
        Ok(SourceSettings::HttpMjpeg {
            url,
            fps: self.positive(&k("fps"), s.fps, STREAM_FPS_MAX)?,
        })
    }
}

impl CameraSettings {
    /// Camera `name` on `source`, the raw layer's defaults for the rest (tests and tools
    /// that build a camera without a config file).
    pub fn with_defaults(name: &str, source: SourceSettings) -> CameraSettings {
        let d = RawCameraCommon::default();
        CameraSettings {
            name: name.to_string(),
            source,
            max_age_ms: d.max_age_ms as u64,
            stall_secs: d.stall_secs,
            reopen_min_ms: d.reopen_min_ms as u64,
            reopen_max_ms: d.reopen_max_ms as u64,
            change_threshold: d.change_threshold as f32,
            heartbeat_secs: d.heartbeat_secs,
            model: "default".to_string(),
            regions: Vec::new(),
            snapshots: d.snapshots,
            hard_examples: d.hard_examples,
        }
    }
}

impl ModelSettings {
    /// The raw layer's defaults, for a model file given on the command line (no config
    /// file).
    pub fn for_file(path: PathBuf) -> ModelSettings {
        let d = RawModel::default();
        ModelSettings {
            name: "default".to_string(),
            path,
            labels: d.labels,
            preprocess: d.preprocess,
            normalization: d.preprocess.normalization(),
            resize: d.resize,
            top_k: d.top_k as usize,
            threshold: d.threshold as f32,
            threads: d.threads as usize,
        }
    }
}

impl Default for OutboxSettings {
    /// The raw layer's defaults (tests and tools that open an outbox without a config).
    fn default() -> Self {
        let d = RawOutbox::default();
        OutboxSettings {
            dir: default_state_dir().join("outbox"),
            fsync: Fsync::Always,
            max_events: d.max_events as usize,
            max_bytes: d.max_bytes as usize,
            window: d.window as usize,
        }
    }
}

/// The host name, made safe as an MQTT topic level.
fn default_device_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "edgesight".into()
    } else {
        id
    }
}
