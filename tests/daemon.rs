//! The real binary as systemd or a terminal runs it: `edgesight run`, stopped by SIGTERM
//! or SIGINT, must drain, publish `offline` and exit 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_drain_and_exit_0() {
    let (host, port) = common::broker();
    let root = common::root();
    for signal in ["TERM", "INT"] {
        let device = format!("sig{signal}-{}", std::process::id()).to_lowercase();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("edgesight.toml");
        std::fs::write(
            &cfg,
            format!(
                "[device]\nid = \"{device}\"\n[mqtt]\nhost = \"{host}\"\nport = {port}\n\
                 [model]\npath = \"{r}/tests/fixtures/models/shapes_int8_qlinear.onnx\"\n\
                 labels = \"{r}/tests/fixtures/labels.txt\"\n\
                 [[camera]]\nname = \"front\"\npath = \"{r}/tests/fixtures/samples\"\nfps = 20\n",
                r = root.display()
            ),
        )
        .unwrap();
        let mut rx = common::subscribe(
            &host,
            port,
            &format!("{device}-sub"),
            &format!("edgesight/{device}/#"),
        )
        .await;
        let child = Command::new(env!("CARGO_BIN_EXE_edgesight"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut n = 0;
        while n < 2 {
            if common::next(&mut rx, "classification")
                .await
                .topic
                .ends_with("/classification")
            {
                n += 1;
            }
        }
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "SIG{signal}: {stderr}");
        assert!(
            stderr.contains(&format!("SIG{signal}: shutting down")),
            "{stderr}"
        );
        loop {
            let m = common::next(&mut rx, "offline").await;
            if m.topic.ends_with("/availability") && m.payload == "offline" {
                break;
            }
        }
        // Nothing after offline: the daemon is gone.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err()
        );
    }
}
