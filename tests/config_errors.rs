//! Bad configuration, data-driven: each case must exit 78 (EX_CONFIG) with a message that
//! names the key path and where the value came from.

mod common;

use std::process::Command;

const GOOD: &str = r#"
[device]
id = "t"
[mqtt]
host = "127.0.0.1"
port = 1883
[model]
path = "MODEL"
labels = "LABELS"
[[camera]]
name = "front"
path = "SAMPLES"
"#;

struct Case {
    name: &'static str,
    /// (from, to) replacements applied to GOOD; from = "" appends `to`.
    edit: &'static [(&'static str, &'static str)],
    env: &'static [(&'static str, &'static str)],
    /// A drop-in file config.d/50-bad.toml.
    dropin: Option<&'static str>,
    /// Every one of these must appear in stderr; "FILE"/"DROPIN" stand for the paths.
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "typo in a key",
        edit: &[("host =", "hots =")],
        env: &[],
        dropin: None,
        expect: &["hots", "FILE"],
    },
    Case {
        name: "unknown section",
        edit: &[("", "[mqt]\nport = 1\n")],
        env: &[],
        dropin: None,
        expect: &["mqt", "FILE"],
    },
    Case {
        name: "wrong type",
        edit: &[("port = 1883", "port = \"eighteen\"")],
        env: &[],
        dropin: None,
        expect: &["mqtt.port", "FILE"],
    },
    Case {
        name: "port out of range",
        edit: &[("port = 1883", "port = 70000")],
        env: &[],
        dropin: None,
        expect: &["mqtt.port", "70000", "FILE"],
    },
    Case {
        name: "qos out of range",
        edit: &[("", "")],
        env: &[("EDGESIGHT__MQTT__QOS", "3")],
        dropin: None,
        expect: &["mqtt.qos", "EDGESIGHT__MQTT__QOS"],
    },
    Case {
        name: "bad preset",
        edit: &[("labels =", "preprocess = \"keras\"\nlabels =")],
        env: &[],
        dropin: None,
        expect: &["model.preprocess", "keras", "FILE"],
    },
    Case {
        name: "threshold out of range",
        edit: &[("labels =", "threshold = 1.5\nlabels =")],
        env: &[],
        dropin: None,
        expect: &["model.threshold", "FILE"],
    },
    Case {
        name: "top_k zero",
        edit: &[("labels =", "top_k = 0\nlabels =")],
        env: &[],
        dropin: None,
        expect: &["model.top_k", "FILE"],
    },
    Case {
        name: "fps zero",
        edit: &[("name = \"front\"", "name = \"front\"\nfps = 0")],
        env: &[],
        dropin: None,
        expect: &["camera[0].fps", "FILE"],
    },
    Case {
        name: "unknown pixel format",
        edit: &[],
        env: &[],
        dropin: Some("[[camera]]\nname = \"a\"\nsource = \"v4l2\"\nformat = \"bayer\"\n"),
        expect: &["camera[0].format", "bayer", "nv12", "gray", "DROPIN"],
    },
    Case {
        name: "stall time zero",
        edit: &[("name = \"front\"", "name = \"front\"\nstall_secs = 0")],
        env: &[],
        dropin: None,
        expect: &["camera[0].stall_secs", "FILE"],
    },
    Case {
        name: "reopen back-off max below min",
        edit: &[(
            "name = \"front\"",
            "name = \"front\"\nreopen_min_ms = 5000\nreopen_max_ms = 1000",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].reopen_max_ms", "camera[0].reopen_min_ms", "FILE"],
    },
    Case {
        name: "change threshold out of range",
        edit: &[(
            "name = \"front\"",
            "name = \"front\"\nchange_threshold = 300",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].change_threshold", "300", "FILE"],
    },
    Case {
        name: "camera name with slash",
        edit: &[("name = \"front\"", "name = \"a/b\"")],
        env: &[],
        dropin: None,
        expect: &["camera[0].name", "FILE"],
    },
    Case {
        name: "bad source",
        edit: &[("name = \"front\"", "name = \"front\"\nsource = \"webrtc\"")],
        env: &[],
        dropin: None,
        expect: &["camera[0].source", "webrtc", "FILE"],
    },
    Case {
        name: "bad value in a drop-in",
        edit: &[],
        env: &[],
        dropin: Some("[mqtt]\nqos = 7\n"),
        expect: &["mqtt.qos", "DROPIN"],
    },
    Case {
        name: "unknown key in a drop-in",
        edit: &[],
        env: &[],
        dropin: Some("[model]\nthreshhold = 0.5\n"),
        expect: &["threshhold", "DROPIN"],
    },
    Case {
        name: "wrong type in a camera, in a drop-in",
        edit: &[],
        env: &[],
        dropin: Some("[[camera]]\nname = \"a\"\npath = \"x\"\nfps = \"fast\"\n"),
        expect: &["camera[0].fps", "DROPIN", "fast"],
    },
    Case {
        name: "wrong type from the environment",
        edit: &[],
        env: &[("EDGESIGHT__MQTT__PORT", "abc")],
        dropin: None,
        expect: &["mqtt.port", "EDGESIGHT__MQTT__PORT"],
    },
    Case {
        name: "unknown key from the environment",
        edit: &[],
        env: &[("EDGESIGHT__MODEL__TOPK", "2")],
        dropin: None,
        expect: &["model.topk", "EDGESIGHT__MODEL__TOPK"],
    },
    Case {
        name: "syntax error",
        edit: &[("[mqtt]", "[mqtt")],
        env: &[],
        dropin: None,
        expect: &["FILE", "invalid TOML"],
    },
    Case {
        name: "missing password file",
        edit: &[(
            "port = 1883",
            "port = 1883\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"",
        )],
        env: &[],
        dropin: None,
        expect: &["mqtt.password_file", "/nonexistent/pw", "FILE"],
    },
    Case {
        name: "missing model",
        edit: &[("shapes_int8_qlinear.onnx", "no_such_model.onnx")],
        env: &[],
        dropin: None,
        expect: &["model.path", "no_such_model.onnx", "FILE"],
    },
    Case {
        name: "unsupported model op",
        edit: &[("shapes_int8_qlinear", "unsupported_op")],
        env: &[],
        dropin: None,
        expect: &["model.path", "QLinearSoftmax", "FILE"],
    },
    Case {
        name: "no images",
        edit: &[("fixtures/samples", "fixtures/no_such_dir")],
        env: &[],
        dropin: None,
        expect: &["camera[0].path", "no_such_dir", "FILE"],
    },
    Case {
        name: "port 8883 means TLS: its CA file must exist",
        edit: &[(
            "port = 1883",
            "port = 8883\nca_file = \"/nonexistent/ca.pem\"",
        )],
        env: &[],
        dropin: None,
        expect: &["mqtt.ca_file", "/nonexistent/ca.pem", "FILE"],
    },
    Case {
        name: "client certificate without its key",
        edit: &[(
            "port = 1883",
            "port = 1883\ntls = true\nclient_cert_file = \"/x.pem\"",
        )],
        env: &[],
        dropin: None,
        expect: &[
            "mqtt.client_cert_file",
            "needs mqtt.client_key_file",
            "FILE",
        ],
    },
    Case {
        name: "TLS files with TLS off",
        edit: &[("port = 1883", "port = 1883\nca_file = \"/x.pem\"")],
        env: &[],
        dropin: None,
        expect: &["mqtt.ca_file", "TLS is off", "FILE"],
    },
    Case {
        name: "fsync policy typo",
        edit: &[("", "[outbox]\nfsync = \"sometimes\"\n")],
        env: &[],
        dropin: None,
        expect: &["outbox.fsync", "sometimes", "FILE"],
    },
    Case {
        name: "fsync interval without the interval policy",
        edit: &[("", "")],
        env: &[("EDGESIGHT__OUTBOX__FSYNC_INTERVAL_MS", "500")],
        dropin: None,
        expect: &[
            "outbox.fsync_interval_ms",
            "EDGESIGHT__OUTBOX__FSYNC_INTERVAL_MS",
        ],
    },
    Case {
        name: "per-label threshold out of range",
        edit: &[("", "")],
        env: &[],
        dropin: Some("[detection.thresholds]\ncircle = 2.0\n"),
        expect: &["detection.thresholds.circle", "2", "DROPIN"],
    },
    Case {
        name: "detection label the model does not have",
        edit: &[("", "[detection]\nlabels = [\"dog\"]\n")],
        env: &[],
        dropin: None,
        expect: &["detection.labels[0]", "dog", "circle", "FILE"],
    },
    Case {
        name: "rtsp camera without a url",
        edit: &[("path = \"SAMPLES\"", "source = \"rtsp\"")],
        env: &[],
        dropin: None,
        expect: &["camera[0].url", "is required for source = \"rtsp\"", "FILE"],
    },
    Case {
        name: "a key of another source",
        edit: &[("", "url = \"rtsp://cam/live\"\n")],
        env: &[],
        dropin: None,
        expect: &[
            "camera[0].url",
            "only applies to source = \"rtsp\" or \"http-mjpeg\"",
            "\"images\"",
            "FILE",
        ],
    },
    Case {
        name: "unknown source",
        edit: &[("path = \"SAMPLES\"", "source = \"onvif\"")],
        env: &[],
        dropin: None,
        expect: &[
            "camera[0].source",
            "onvif",
            "picamera",
            "http-mjpeg",
            "FILE",
        ],
    },
    Case {
        name: "http-mjpeg over https",
        edit: &[(
            "path = \"SAMPLES\"",
            "source = \"http-mjpeg\"\nurl = \"https://cam.local/video\"",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].url", "https", "source = \"pipe\"", "FILE"],
    },
    Case {
        name: "rtsp url with the wrong scheme",
        edit: &[(
            "path = \"SAMPLES\"",
            "source = \"rtsp\"\nurl = \"http://admin:hunter2@cam/live\"",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].url", "scheme \"http\"", "FILE"],
    },
    Case {
        name: "raw pipe frames without a size",
        edit: &[(
            "path = \"SAMPLES\"",
            "source = \"pipe\"\ncommand = \"cam --yuv\"\nformat = \"yuv420\"",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].format", "\"yuv420\" is a raw format", "FILE"],
    },
    Case {
        name: "pipe command with an open quote",
        edit: &[(
            "path = \"SAMPLES\"",
            "source = \"pipe\"\ncommand = \"ffmpeg -i 'rtsp://x -\"",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].command", "unclosed quote", "FILE"],
    },
    Case {
        name: "picamera yuv420 at a width rpicam-vid pads",
        edit: &[(
            "path = \"SAMPLES\"",
            "source = \"picamera\"\nformat = \"yuv420\"\nwidth = 1000\nheight = 600",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].width", "1000x600", "multiple of 64", "FILE"],
    },
    Case {
        name: "picamera preset without rpicam-vid or libcamera-vid",
        edit: &[("path = \"SAMPLES\"", "source = \"picamera\"")],
        env: &[("PATH", "/nonexistent")],
        dropin: None,
        expect: &[
            "camera[0].source",
            "camera \"front\"",
            "rpicam-vid or libcamera-vid",
            "rpicam-apps",
            "FILE",
        ],
    },
    Case {
        name: "a mean of two channels",
        edit: &[("[model]\n", "[model]\nmean = [0.5, 0.5]\n")],
        env: &[],
        dropin: None,
        expect: &["model.mean", "2 values", "one per channel (3)", "FILE"],
    },
    Case {
        name: "a std of zero",
        edit: &[],
        env: &[],
        dropin: Some("[model]\nstd = [0.2, 0, 0.2]\n"),
        expect: &["model.std", "0 is not a usable value (> 0", "DROPIN"],
    },
    Case {
        name: "a negative scale from the environment",
        edit: &[],
        env: &[("EDGESIGHT__MODEL__SCALE", "-0.5")],
        dropin: None,
        expect: &["model.scale", "-0.5", "EDGESIGHT__MODEL__SCALE"],
    },
    Case {
        name: "an unknown channel order",
        edit: &[("[model]\n", "[model]\nchannel_order = \"grb\"\n")],
        env: &[],
        dropin: None,
        expect: &["model.channel_order", "grb", "FILE"],
    },
    Case {
        name: "a metrics listener that is not an address",
        edit: &[("", "[metrics]\nlisten = \"localhost:9898\"\n")],
        env: &[],
        dropin: None,
        expect: &["metrics.listen", "localhost:9898", "127.0.0.1:9898", "FILE"],
    },
    Case {
        name: "a region past the frame's edge, in fractions",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a\"\nx = 0.6\nwidth = 0.5\nheight = 1\n",
        )],
        env: &[],
        dropin: None,
        expect: &[
            "camera[0].region[0].width",
            "passes the frame's edge",
            "FILE",
        ],
    },
    Case {
        name: "two regions of a camera with one name",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a\"\nwidth = 10\nheight = 10\n\
             [[camera.region]]\nname = \"a\"\nwidth = 0.5\nheight = 0.5\n",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].region[1].name", "used by another region", "FILE"],
    },
    Case {
        name: "a region without a size",
        edit: &[("", "[[camera.region]]\nname = \"a\"\nwidth = 10\n")],
        env: &[],
        dropin: None,
        expect: &["camera[0].region[0].height", "is required", "FILE"],
    },
    Case {
        name: "a region in part pixels",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a\"\nx = 10.5\nwidth = 100\nheight = 100\n",
        )],
        env: &[],
        dropin: None,
        expect: &[
            "camera[0].region[0].x",
            "10.5 is not a whole number",
            "FILE",
        ],
    },
    Case {
        name: "a misspelt region key",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a\"\nwidht = 10\nheight = 10\n",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].region[0]", "widht", "FILE"],
    },
    Case {
        name: "a region named as a topic wildcard",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a/+\"\nwidth = 10\nheight = 10\n",
        )],
        env: &[],
        dropin: None,
        expect: &["camera[0].region[0].name", "topic level", "FILE"],
    },
    Case {
        name: "a region on a model nobody defined",
        edit: &[(
            "",
            "[[camera.region]]\nname = \"a\"\nwidth = 10\nheight = 10\nmodel = \"big\"\n",
        )],
        env: &[],
        dropin: None,
        expect: &[
            "camera[0].region[0].model",
            "no model is named \"big\" (models: default)",
            "FILE",
        ],
    },
    Case {
        name: "a camera on a model nobody defined",
        edit: &[("name = \"front\"", "name = \"front\"\nmodel = \"big\"")],
        env: &[],
        dropin: None,
        expect: &["camera[0].model", "no model is named", "FILE"],
    },
    Case {
        name: "a region outside the frame the Camera Module is told to deliver",
        edit: &[(
            "",
            "[[camera]]\nname = \"pi\"\nsource = \"picamera\"\nwidth = 640\nheight = 480\n\
             [[camera.region]]\nname = \"door\"\nx = 600\nwidth = 100\nheight = 100\n",
        )],
        env: &[],
        dropin: None,
        expect: &[
            "camera[1].region[0]",
            "x 600, y 0, 100x100 pixels is outside the 640x480 frame",
            "FILE",
        ],
    },
    Case {
        name: "[[model]] tables without a name",
        edit: &[("[model]\n", "[[model]]\n")],
        env: &[],
        dropin: None,
        expect: &["model[0].name", "is required in [[model]] tables", "FILE"],
    },
    Case {
        name: "two models with one name",
        edit: &[
            ("[model]\n", "[[model]]\nname = \"a\"\n"),
            (
                "[[camera]]",
                "[[model]]\nname = \"a\"\npath = \"MODEL\"\n[[camera]]",
            ),
        ],
        env: &[],
        dropin: None,
        expect: &["model[1].name", "used by another model", "FILE"],
    },
    Case {
        name: "a second model that does not load",
        edit: &[
            ("[model]\n", "[[model]]\nname = \"a\"\n"),
            (
                "[[camera]]",
                "[[model]]\nname = \"b\"\npath = \"/nonexistent.onnx\"\n[[camera]]",
            ),
        ],
        env: &[],
        dropin: None,
        expect: &["model[1].path", "/nonexistent.onnx", "FILE"],
    },
    Case {
        name: "[[model]] tables and a model key from the environment",
        edit: &[("[model]\n", "[[model]]\nname = \"a\"\n")],
        env: &[("EDGESIGHT__MODEL__PATH", "/x.onnx")],
        dropin: None,
        expect: &["EDGESIGHT__MODEL__PATH", "FILE", "[[model]] tables"],
    },
];

#[test]
fn bad_configs_exit_78_naming_the_key() {
    let root = common::root();
    let fill = |text: &str| {
        text.replace(
            "MODEL",
            &root
                .join("tests/fixtures/models/shapes_int8_qlinear.onnx")
                .display()
                .to_string(),
        )
        .replace(
            "LABELS",
            &root.join("tests/fixtures/labels.txt").display().to_string(),
        )
        .replace(
            "SAMPLES",
            &root.join("tests/fixtures/samples").display().to_string(),
        )
    };
    let good = fill(GOOD);
    // The good config itself passes, so each case's failure is its own edit's doing.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgesight.toml");
    std::fs::write(&file, &good).unwrap();
    let out = check(&file, &[]);
    assert!(
        out.status.success(),
        "good config: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for case in CASES {
        // Each case names where the bad value came from: a file, or its variable.
        assert!(
            case.expect.iter().any(|e| {
                e.contains("FILE") || e.contains("DROPIN") || e.starts_with("EDGESIGHT__")
            }),
            "{}: the case asserts no origin",
            case.name
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgesight.toml");
        // An edit applies to the template where it names a placeholder's line (`path =
        // "SAMPLES"`), else to the filled-in text.
        let mut text = GOOD.to_string();
        for (from, to) in case.edit {
            if from.is_empty() {
                text.push_str(to);
            } else {
                if !text.contains(from) {
                    text = fill(&text);
                }
                assert!(
                    text.contains(from),
                    "{}: {from:?} not in the config",
                    case.name
                );
                text = text.replacen(from, to, 1);
            }
        }
        std::fs::write(&file, fill(&text)).unwrap();
        let dropin = dir.path().join("config.d/50-bad.toml");
        if let Some(d) = case.dropin {
            std::fs::create_dir_all(dropin.parent().unwrap()).unwrap();
            std::fs::write(&dropin, d).unwrap();
        }
        let out = check(&file, case.env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{}: exit {:?}, stderr {err}",
            case.name,
            out.status
        );
        for want in case.expect {
            let want = want
                .replace("DROPIN", &dropin.display().to_string())
                .replace("FILE", &file.display().to_string());
            assert!(
                err.contains(&want),
                "{}: stderr lacks {want:?}:\n{err}",
                case.name
            );
        }
    }
}

/// A camera URL's password is not repeated by any error about it.
#[test]
fn a_bad_camera_url_is_reported_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgesight.toml");
    for url in [
        "ftp://admin:hunter2@cam/live",
        "rtsp://admin:hunter2@",
        "rtsp://admin:hunter2@cam/live feed",
    ] {
        let text = format!(
            "[mqtt]\nhost = \"h\"\n[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"c\"\nsource = \"rtsp\"\nurl = \"{url}\"\n"
        );
        std::fs::write(&file, text).unwrap();
        let out = check(&file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{url}: {err}");
        assert!(err.contains("camera[0].url"), "{url}: {err}");
        assert!(!err.contains("hunter2"), "{url}: the password shown: {err}");
    }
}

#[test]
fn unreadable_config_file_exits_78() {
    let out = check(std::path::Path::new("/nonexistent/edgesight.toml"), &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edgesight.toml"));
}

#[test]
fn shipped_configs_check_clean() {
    for cfg in [
        "config/edgesight.toml",
        "config/demo.toml",
        "config/regions.toml",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgesight"))
            .current_dir(common::root())
            .args(["check", "--config", cfg])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("[1, 3, 64, 64]") && stdout.contains("[1, 7]"),
            "{stdout}"
        );
        // What the frames go through, as check says it.
        assert!(
            stdout.contains("#   preprocessing: stretched to 64x64, then RGB, x * 0.003921569, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]"),
            "{stdout}"
        );
    }
}

/// The commented-out camera examples in config/edgesight.toml, uncommented, are valid
/// configuration: the documentation of every source stays true.
#[test]
fn the_shipped_camera_examples_are_valid() {
    let text = std::fs::read_to_string(common::root().join("config/edgesight.toml")).unwrap();
    let mut blocks: Vec<String> = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        if line == "# [[camera]]" {
            block = Some(String::new());
        }
        match (&mut block, line.strip_prefix("# ")) {
            (Some(b), Some(l)) => {
                b.push_str(l);
                b.push('\n');
            }
            (Some(_), None) => blocks.extend(block.take()),
            _ => {}
        }
    }
    blocks.extend(block);
    let dir = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for b in &blocks {
        let file = dir.path().join("example.toml");
        std::fs::write(&file, format!("[model]\npath = \"m.onnx\"\n{b}")).unwrap();
        let settings = edgesight::config::Settings::load(&file)
            .unwrap_or_else(|e| panic!("{e}\nin the example:\n{b}"));
        let source = serde_json::to_value(&settings.camera[0]).unwrap()["source"].clone();
        sources.push(source.as_str().unwrap().to_string());
    }
    assert_eq!(
        sources,
        ["v4l2", "picamera", "rtsp", "http-mjpeg", "pipe"],
        "one example per source"
    );
}

fn check(file: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgesight"));
    cmd.args(["check", "--config"]).arg(file);
    // Only this case's EDGESIGHT__ variables.
    for (k, _) in std::env::vars() {
        if k.starts_with("EDGESIGHT__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}
