//! The command line: `classify --json`, `cameras` and `check` through the real binary.

mod common;

use std::process::Command;

fn edgesight(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .current_dir(common::root())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn classify_json_prints_one_line_per_image() {
    let files = [
        "tests/fixtures/samples/circle/01.jpg",
        "tests/fixtures/samples/checker/00.png",
        "tests/fixtures/samples/vstripes/03.jpg",
    ];
    let mut args = vec!["classify", "--config", "config/edgesight.toml", "--json"];
    args.extend(files);
    let out = edgesight(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), files.len(), "{stdout}");
    for (line, file) in lines.iter().zip(files) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["file"], file);
        let top = v["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(
            top[0]["label"],
            common::class_of(std::path::Path::new(file)).as_str(),
            "{line}"
        );
        assert!(top[0]["class"].is_u64() && top[0]["score"].is_f64());
    }
}

#[test]
fn classify_names_an_undecodable_image_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let out = edgesight(&[
        "classify",
        "--model",
        "tests/fixtures/models/shapes_fp32.onnx",
        "tests/fixtures/samples/square/00.png",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.jpg"));
    // The good image is still classified (labels default to class_N without a labels file).
    assert!(String::from_utf8_lossy(&out.stdout).contains("square/00.png: class_1"));
}

#[test]
fn cameras_without_cameras_says_so() {
    let out = edgesight(&["cameras"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // What /dev holds decides what it must say: no video nodes, "no V4L2 cameras found";
    // otherwise every node, by path (a capture node with its modes, others as skipped).
    let nodes: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("video")
                .is_some_and(|i| i.parse::<u32>().is_ok())
        })
        .collect();
    if nodes.is_empty() {
        assert!(stdout.contains("no V4L2 cameras found"), "{stdout}");
    } else {
        for n in &nodes {
            assert!(
                stdout.contains(&format!("/dev/{n}")),
                "{n} not listed: {stdout}"
            );
        }
        assert!(!stdout.contains("no V4L2 cameras found"), "{stdout}");
    }
}

/// `check` and `classify` on crafted models: exit 78 (EX_CONFIG) naming the node, never
/// 134 (the abort of a panic), including the model that panics inside tract, where the
/// binary's abort-on-panic hook must give way to the loader's catch.
#[test]
fn crafted_models_exit_78_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for c in common::crafted::CASES {
        let model = common::crafted::write(dir.path(), c);
        let cameras = common::samples_camera(1, false);
        let cfg = common::config_file(dir.path(), "127.0.0.1", 1, "crafted", &cameras);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let line = text.lines().find(|l| l.starts_with("path = ")).unwrap();
        let text = text.replace(line, &format!("path = {:?}", model.display().to_string()));
        std::fs::write(&cfg, text).unwrap();
        let check = edgesight(&["check", "--config", cfg.to_str().unwrap()]);
        let model = model.to_str().unwrap();
        let classify = edgesight(&[
            "classify",
            "--model",
            model,
            "tests/fixtures/samples/square/00.png",
        ]);
        for (what, out) in [("check", check), ("classify", classify)] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{what} {}: {stderr}", c.name);
            assert!(stderr.contains(c.error), "{what} {}: {stderr}", c.name);
        }
    }
}

/// `check` points the owner of a float model to its int8 form (tools/quantize.py), and
/// says nothing of it for a model already quantised, in any of the forms.
#[test]
fn check_points_float_models_to_their_int8_form() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("shapes_fp32.onnx", true),
        ("shapes_fp32_nhwc.onnx", true),
        ("shapes_int8_qdq.onnx", false),
        ("shapes_int8_qlinear.onnx", false),
        ("shapes_int8_qop.onnx", false),
    ];
    for (file, float) in cases {
        let cameras = common::samples_camera(1, false);
        let cfg = common::config_file(dir.path(), "127.0.0.1", 1, file, &cameras);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let line = text.lines().find(|l| l.starts_with("path = ")).unwrap();
        let model = common::fixture(&format!("models/{file}"));
        let text = text.replace(line, &format!("path = {:?}", model.display().to_string()));
        std::fs::write(&cfg, text).unwrap();
        let out = edgesight(&["check", "--config", cfg.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{file}: {stdout}");
        let note = stdout.contains("tools/quantize.py");
        assert_eq!(note, float, "{file}: {stdout}");
    }
}

/// `edgesight check | head -0`: the reader is gone before check prints; check ends by
/// SIGPIPE as Unix tools do, never by a panic on the broken pipe (which aborts the
/// process and leaves a core).
#[test]
fn check_piped_into_a_reader_that_leaves_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let cfg = common::root().join("config/demo.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .current_dir(common::root())
        .args(["check", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the read end closes: every print meets a broken pipe
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
