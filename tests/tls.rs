//! TLS to the broker, for real: certificates made by openssl for this test, a Mosquitto
//! (Debian's, installed by the README's test command) with a plain listener for the test's
//! subscriber, a TLS listener and a mutual-TLS listener, and the daemon binary connecting.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl; tools/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and an
/// unrelated CA.
fn make_pki(dir: &Path) {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (k, c, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=edgesight test {ca}"),
        );
        let mut args = vec![
            "req", "-x509", "-days", "2", "-subj", &subj, "-keyout", &k, "-out", &c,
        ];
        args.extend(key);
        openssl(dir, &args);
    }
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .unwrap();
        let (k, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=edgesight test {name}");
        let mut args = vec!["req", "-subj", &subj, "-keyout", &k, "-out", &csr];
        args.extend(key);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extf,
                "-out",
                &crt,
            ],
        );
    }
}

struct Broker {
    child: Child,
    plain: u16,
    tls: u16,
    mtls: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto(dir: &Path) -> Broker {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is needed (Debian package mosquitto; tools/test.sh installs it)"
    );
    let (plain, tls, mtls) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let d = dir.display();
    let conf = format!(
        "per_listener_settings true\nuser root\npersistence false\n\
         listener {plain} 127.0.0.1\nallow_anonymous true\n\
         listener {tls} 127.0.0.1\nallow_anonymous true\n\
         cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
         listener {mtls} 127.0.0.1\nallow_anonymous true\n\
         cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
         require_certificate true\n"
    );
    let f = dir.join("mosquitto.conf");
    std::fs::write(&f, conf).unwrap();
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&f)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for port in [plain, tls, mtls] {
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "mosquitto listening on {port}");
    }
    Broker {
        child,
        plain,
        tls,
        mtls,
    }
}

/// The daemon binary on the samples, publishing to 127.0.0.1:`port` with `mqtt_extra`
/// (TLS keys) added to [mqtt].
fn daemon(dir: &Path, name: &str, port: u16, mqtt_extra: &str) -> common::Daemon {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let f = common::config_file(
        &sub,
        "127.0.0.1",
        port,
        name,
        &common::samples_camera(10, true),
    );
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("qos = 1\n", &format!("qos = 1\n{mqtt_extra}"));
    std::fs::write(&f, text).unwrap();
    common::Daemon::start(&f)
}

fn tls_keys(dir: &Path, ca: &str, client: bool) -> String {
    let p = |f: &str| -> PathBuf { dir.join(f) };
    let mut s = format!("tls = true\nca_file = \"{}\"\n", p(ca).display());
    if client {
        s.push_str(&format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            p("client.crt").display(),
            p("client.key").display()
        ));
    }
    s
}

async fn first_classification(port: u16, device: &str) -> common::Msg {
    let mut rx = common::subscribe(
        "127.0.0.1",
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/front/classification"),
    )
    .await;
    common::next(&mut rx, &format!("a classification from {device} over TLS")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_connect_and_a_wrong_ca_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let b = mosquitto(dir.path());

    // TLS with our CA.
    let d = daemon(
        dir.path(),
        "tls",
        b.tls,
        &tls_keys(dir.path(), "ca.crt", false),
    );
    let m = first_classification(b.plain, "tls").await;
    assert!(m.payload.contains("\"camera\":\"front\""));
    d.stop();

    // Mutual TLS: the listener requires a client certificate signed by our CA.
    let d = daemon(
        dir.path(),
        "mtls",
        b.mtls,
        &tls_keys(dir.path(), "ca.crt", true),
    );
    first_classification(b.plain, "mtls").await;
    d.stop();

    // The same listener without a client certificate: refused, and the log says TLS.
    let d = daemon(
        dir.path(),
        "nocert",
        b.mtls,
        &tls_keys(dir.path(), "ca.crt", false),
    );
    let log = d.wait_for_log("TLS failed");
    let line = tls_line(&log);
    assert!(line.contains("set mqtt.client_cert_file"), "{line}");
    assert!(!line.contains("mqtt.ca_file"), "points at the CA: {line}");
    d.stop();

    // A CA that did not sign the broker's certificate: refused with a clear error.
    let d = daemon(
        dir.path(),
        "wrongca",
        b.tls,
        &tls_keys(dir.path(), "other-ca.crt", false),
    );
    let log = d.wait_for_log("TLS failed");
    let line = tls_line(&log);
    assert!(line.contains("not one mqtt.ca_file trusts"), "{line}");
    assert!(
        !line.contains("client_cert_file"),
        "points at the client: {line}"
    );
    d.stop();
}

/// The first line of `log` reporting a TLS failure: the one the user reads.
fn tls_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("TLS failed"))
        .unwrap_or_default()
}
