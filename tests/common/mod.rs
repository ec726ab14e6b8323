//! Shared test helpers: a real MQTT broker and a real MQTT subscriber.
#![allow(dead_code)]

pub mod crafted;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// A broker for one test: Mosquitto (or any broker) when `EDGESIGHT_TEST_BROKER=host:port`
/// is set (CI does), else an in-process rumqttd on a free loopback port.
pub fn broker() -> (String, u16) {
    if let Ok(addr) = std::env::var("EDGESIGHT_TEST_BROKER") {
        let (h, p) = addr
            .rsplit_once(':')
            .expect("EDGESIGHT_TEST_BROKER=host:port");
        return (h.to_string(), p.parse().expect("port"));
    }
    // A port free when probed can still be busy a moment later: a test that spawns a
    // process forks while another thread's probe socket is open, and the child holds a
    // copy of it until its exec closes it (seen as "cannot listen" on the first broker of
    // the daemon tests, beside the test that re-runs its own binary). So take another.
    for _ in 0..5 {
        let port = free_port();
        match edgesight::mqtt::start_embedded_broker("127.0.0.1", port) {
            Ok(_) => return ("127.0.0.1".to_string(), port),
            Err(e) if format!("{e:#}").contains("cannot listen") => continue,
            Err(e) => panic!("start rumqttd: {e:#}"),
        }
    }
    panic!("start rumqttd: no port of five could be bound")
}

/// A loopback port nothing listens on, and that no other test of this binary was given:
/// the port is free when asked for, and the tests running beside this one (which bind
/// theirs a moment later) must not be handed it too. Taken below the kernel's ephemeral
/// range (32768-60999 on Linux): a port from `bind(0)` could be handed to another test's
/// outgoing connection as its local port before our broker binds it (seen once in a
/// full run: "cannot listen on 127.0.0.1:33055").
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    // Each test binary starts somewhere else, so two running at once rarely meet.
    let n = next.get_or_insert(std::process::id().wrapping_mul(7919) % COUNT);
    for _ in 0..COUNT {
        let port = (FIRST + *n) as u16;
        *n = (*n + 1) % COUNT;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    /// The payload as text (lossy: for JSON payloads).
    pub payload: String,
    /// The payload's bytes (for binary payloads: snapshots).
    pub bytes: Vec<u8>,
    pub retain: bool,
}

/// Subscribe to `filter` and forward every message. Returns once the SUBACK arrived.
pub async fn subscribe(
    host: &str,
    port: u16,
    id: &str,
    filter: &str,
) -> mpsc::UnboundedReceiver<Msg> {
    subscribe_with(host, port, id, filter, false).await
}

/// [`subscribe`]; with `persistent`, a persistent session (clean session false): the
/// broker keeps the subscription and queues QoS 1 messages while we are away, and the
/// client reconnects to it (subscribing again if the broker lost the session).
pub async fn subscribe_with(
    host: &str,
    port: u16,
    id: &str,
    filter: &str,
    persistent: bool,
) -> mpsc::UnboundedReceiver<Msg> {
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(!persistent);
    // rumqttc's default 10 KiB limit would drop the connection (and with it the
    // subscription) on the first larger snapshot.
    opts.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let filter = filter.to_string();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if !ack.session_present {
                        let _ = client.subscribe(&filter, QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let m = Msg {
                        topic: p.topic.clone(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        bytes: p.payload.to_vec(),
                        retain: p.retain,
                    };
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("SUBACK within 10 s")
        .unwrap();
    rx
}

/// Next message, or a panic naming what we waited for (generous: this is a liveness bound,
/// not a timing assertion).
pub async fn next(rx: &mut mpsc::UnboundedReceiver<Msg>, what: &str) -> Msg {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no MQTT message within 30 s while waiting for {what}"))
        .expect("subscriber ended")
}

/// Write `dir/edgesight.toml` for a daemon publishing as `device` to `host:port` with the
/// int8 fixture model, plus `cameras` (TOML `[[camera]]` tables; `{samples}` stands for
/// the fixture samples' path). Returns the file.
pub fn config_file(dir: &Path, host: &str, port: u16, device: &str, cameras: &str) -> PathBuf {
    let r = root();
    let text = format!(
        "[device]\nid = \"{device}\"\nstate_dir = \"{d}\"\n[log]\nlevel = \"warn\"\n\
         [mqtt]\nhost = \"{host}\"\nport = {port}\nqos = 1\n\
         [model]\npath = \"{r}/tests/fixtures/models/shapes_int8_qlinear.onnx\"\n\
         labels = \"{r}/tests/fixtures/labels.txt\"\n\
         [outbox]\ndir = \"{d}/outbox\"\n{}",
        cameras.replace(
            "{samples}",
            &format!("{}/tests/fixtures/samples", r.display())
        ),
        r = r.display(),
        d = dir.display()
    );
    let f = dir.join("edgesight.toml");
    std::fs::write(&f, text).unwrap();
    f
}

/// Add `line` (a `key = value`) to the `[mqtt]` table of a file [`config_file`] wrote.
pub fn set_mqtt(file: &Path, line: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains("[mqtt]\nhost"),
        "not a config_file: {}",
        file.display()
    );
    std::fs::write(
        file,
        text.replace("[mqtt]\nhost", &format!("[mqtt]\n{line}\nhost")),
    )
    .unwrap();
}

/// `[[camera]]` "front" replaying the fixture samples.
pub fn samples_camera(fps: u32, looped: bool) -> String {
    format!("[[camera]]\nname = \"front\"\npath = \"{{samples}}\"\nfps = {fps}\nloop = {looped}\n")
}

/// The class a sample belongs to: its parent directory's name.
pub fn class_of(file: &Path) -> String {
    file.parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A TCP relay in front of the broker that the test can cut and restore: while it is down
/// its port refuses connections and every relayed connection is closed, which is what the
/// daemon sees when its broker goes away. The broker behind it keeps running, so a
/// subscriber connected to it directly misses nothing.
pub struct Proxy {
    pub port: u16,
    upstream: (String, u16),
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// With [`Proxy::tapped`]: (topic, payload) of the QoS 1 PUBLISHes the broker
    /// acknowledged (PUBACK) through this proxy, in order.
    pub acked: Option<Tap>,
    /// Set by [`Proxy::freeze`]: relays stop passing bytes but keep their connections.
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Per relayed connection, in accept order: its MQTT client id (once its CONNECT
    /// passed), and who hung up ("client" or "broker"), in the order they did.
    pub hangups: Hangups,
}

pub type Hangups = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<&'static str>)>>>;

/// The client id of a CONNECT packet's body.
fn connect_client_id(body: &[u8]) -> Option<String> {
    let proto = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let at = 2 + proto + 4; // protocol name, level, flags, keep-alive
    let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
    let id = body.get(at + 2..at + 2 + len)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

pub type Tap = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// One MQTT packet off the front of `buf`, if whole: (type and flags byte, body).
fn mqtt_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if buf.len() < i + len {
        return None;
    }
    let first = buf[0];
    let body = buf[i..i + len].to_vec();
    buf.drain(..i + len);
    Some((first, body))
}

/// Relay `from` to `to`, handing every whole MQTT packet to `seen` on the way; while
/// `frozen`, nothing is read (and so nothing passed on).
async fn relay_watching(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut seen: impl FnMut(u8, &[u8]) + Send,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut chunk, mut pending) = (vec![0u8; 65536], Vec::new());
    loop {
        while frozen.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Ok(n) = from.read(&mut chunk).await else {
            break;
        };
        if n == 0 || to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some((first, body)) = mqtt_packet(&mut pending) {
            seen(first, &body);
        }
    }
}

impl Proxy {
    /// A proxy to `host:port` on a free loopback port, initially down.
    pub fn new(host: &str, port: u16) -> Proxy {
        Proxy {
            port: free_port(),
            upstream: (host.to_string(), port),
            tasks: Default::default(),
            acked: None,
            frozen: Default::default(),
            hangups: Default::default(),
        }
    }

    /// A proxy that also records what the broker acknowledged: our side of the line
    /// between the daemon's losses and the broker's.
    pub fn tapped(host: &str, port: u16) -> Proxy {
        Proxy {
            acked: Some(Default::default()),
            ..Proxy::new(host, port)
        }
    }

    pub async fn up(&self) {
        // An aborted accept task drops its listener soon, not at once: retry the bind.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("proxy: cannot bind 127.0.0.1:{} again: {e}", self.port),
            }
        };
        let upstream = self.upstream.clone();
        let tasks = self.tasks.clone();
        let acked = self.acked.clone();
        let frozen = self.frozen.clone();
        let hangups = self.hangups.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let acked = acked.clone();
                let frozen = frozen.clone();
                let hangups = hangups.clone();
                let relay =
                    tokio::spawn(async move {
                        let Ok(out) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let conn = {
                            let mut h = hangups.lock().unwrap();
                            h.push((String::new(), Vec::new()));
                            h.len() - 1
                        };
                        // A relay ends when its side hangs up (or fails); dropping its
                        // write half passes the hang-up on.
                        let ended = |who: &'static str| {
                            let hangups = hangups.clone();
                            move || hangups.lock().unwrap()[conn].1.push(who)
                        };
                        let names = hangups.clone();
                        let name = move |first: u8, body: &[u8]| {
                            if first >> 4 == 1
                                && let Some(id) = connect_client_id(body)
                            {
                                names.lock().unwrap()[conn].0 = id;
                            }
                        };
                        let (client_gone, broker_gone) = (ended("client"), ended("broker"));
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = out.into_split();
                        let Some(acked) = acked else {
                            let f = frozen.clone();
                            tokio::join!(
                                async {
                                    relay_watching(ir, ow, f, name).await;
                                    client_gone();
                                },
                                async {
                                    relay_watching(or, iw, frozen, |_, _| {}).await;
                                    broker_gone();
                                }
                            );
                            return;
                        };
                        // QoS 1 PUBLISHes out (packet id -> payload), PUBACKs back.
                        let sent = std::sync::Arc::new(std::sync::Mutex::new(
                            std::collections::HashMap::<u16, (String, Vec<u8>)>::new(),
                        ));
                        let s = sent.clone();
                        let up = relay_watching(ir, ow, frozen.clone(), move |first, body| {
                            name(first, body);
                            if first >> 4 == 3 && (first >> 1) & 3 == 1 && body.len() >= 2 {
                                let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                                if body.len() >= 4 + tlen {
                                    let id = u16::from_be_bytes([body[2 + tlen], body[3 + tlen]]);
                                    let topic = String::from_utf8_lossy(&body[2..2 + tlen]);
                                    let payload = body[4 + tlen..].to_vec();
                                    s.lock().unwrap().insert(id, (topic.into_owned(), payload));
                                }
                            }
                        });
                        let down = relay_watching(or, iw, frozen, move |first, body| {
                            if first >> 4 == 4 && body.len() >= 2 {
                                let id = u16::from_be_bytes([body[0], body[1]]);
                                if let Some(p) = sent.lock().unwrap().remove(&id) {
                                    acked.lock().unwrap().push(p);
                                }
                            }
                        });
                        tokio::join!(
                            async {
                                up.await;
                                client_gone();
                            },
                            async {
                                down.await;
                                broker_gone();
                            }
                        );
                    });
                tasks.lock().unwrap().push(relay.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// A broker that stops answering with the connection still open (a dead NAT path, a
    /// hung broker): nothing passes either way until [`Proxy::thaw`].
    pub fn freeze(&self) {
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stop listening and close every relayed connection.
    pub fn down(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Publish one QoS 1 message and wait for its PUBACK.
pub async fn publish(host: &str, port: u16, id: &str, topic: &str, payload: &[u8]) {
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 4);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publishing to {topic}: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK within 10 s");
    let _ = client.disconnect().await;
}

/// The validator of docs/schemas/`name`.schema.json, compiled once by the caller (for
/// checks in a loop).
pub fn schema(name: &str) -> jsonschema::Validator {
    let path = root().join(format!("docs/schemas/{name}.schema.json"));
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", path.display()))
}

/// Check `payload` against docs/schemas/`name`.schema.json (the schemas docs/mqtt.md
/// documents); panics listing every violation.
pub fn check_schema(name: &str, payload: &str) {
    let path = root().join(format!("docs/schemas/{name}.schema.json"));
    let validator = schema(name);
    let instance: serde_json::Value = serde_json::from_str(payload)
        .unwrap_or_else(|e| panic!("{name} payload is not JSON ({e}): {payload}"));
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{name} payload violates {}: {errors:?}\n{payload}",
        path.display()
    );
}

/// The daemon binary, `edgesight run --config <file>`, with its stderr collected; ended
/// (SIGKILL) when dropped, so a failed assertion leaves no process behind.
pub struct Daemon {
    pub child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with more environment variables (e.g. a `PATH` with stand-ins).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        use std::io::Read;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgesight"))
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon { child, stderr }
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait (a liveness bound, not a timing claim) until stderr contains `what`.
    pub fn wait_for_log(&self, what: &str) -> String {
        for _ in 0..300 {
            let s = self.stderr.lock().unwrap().clone();
            if s.contains(what) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no {what:?} in the daemon's log: {}",
            self.stderr.lock().unwrap()
        );
    }

    /// The exit code once the process has ended, polling up to `limit` (a liveness bound,
    /// not a timing claim); None if it is still running then (or died by a signal).
    pub async fn exit_code_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Send `signal` (e.g. "HUP", "TERM").
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal}");
    }

    /// SIGTERM, and the exit code must be 0.
    pub fn stop(mut self) {
        self.signal("TERM");
        assert!(self.child.wait().unwrap().success(), "SIGTERM exits 0");
    }
}

impl Drop for Daemon {
    /// After `stop` this finds the process gone; after a failed assertion it ends it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One thread of a child process held still, the rest of the process running on: what a
/// deadlock or an endless loop in that thread looks like from outside. The thread is
/// found by its name (`/proc/PID/task/*/comm`), ptrace-seized and interrupted; dropping
/// the hold detaches it, and it runs again.
pub struct Wedge {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

impl Wedge {
    pub fn thread(pid: u32, name: &str) -> Wedge {
        let tid = thread_id(pid, name);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        // Every ptrace request must come from the thread that attached.
        let holder = std::thread::spawn(move || {
            let hold = || -> Result<(), String> {
                // SAFETY: plain syscalls on a thread id; no memory is shared.
                unsafe {
                    if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
                        return Err(format!(
                            "PTRACE_SEIZE {tid}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
                        return Err(format!(
                            "PTRACE_INTERRUPT {tid}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    let mut status = 0;
                    if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
                        return Err(format!(
                            "waitpid {tid}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                }
                Ok(())
            };
            let held = hold();
            let ok = held.is_ok();
            let _ = ready_tx.send(held);
            if !ok {
                return;
            }
            // Until released. Meanwhile reap the thread should the process end (its
            // parent cannot see the process exit while we hold a dead thread unreaped).
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                released.recv_timeout(Duration::from_millis(100))
            {
                let mut status = 0;
                // SAFETY: as above.
                let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
                if r == tid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) || r < 0 {
                    return;
                }
            }
            // SAFETY: as above; the thread is in a ptrace stop.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
        });
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("holding thread {name:?} of {pid}: {e}"));
        Wedge {
            release: Some(release),
            holder: Some(holder),
        }
    }
}

impl Drop for Wedge {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}

/// The id of `pid`'s thread named `name`, waiting (a liveness bound) for it to start.
fn thread_id(pid: u32, name: &str) -> i32 {
    for _ in 0..300 {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                return t.file_name().to_string_lossy().parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("process {pid} has no thread named {name:?}");
}
