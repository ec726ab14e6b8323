//! Fuzz targets and property tests, on stable Rust (cargo-fuzz needs nightly): proptest
//! generates the inputs and shrinks a failure to a minimal one. Every input that an
//! attacker, a broken camera or a full disk can shape goes through here: outbox records
//! and directories, push/ack/replay sequences against a model of the queue, commands,
//! configuration files, camera frames, camera streams (the framer), and mutated models. Each target must return an
//! error or a value that keeps its invariants; a panic is a failure.
//!
//! `EDGESIGHT_FUZZ_CASES=N` sets the cases per target (CI runs the defaults, a few
//! seconds in all); the model target, whose every case loads and optimises a model, runs
//! N / 10 of them (at least 300). Panics that tract raises while loading a mutated model
//! are printed by the default hook, then caught by the loader (util::panics) and become
//! the load's error: that is the behaviour under test, not a failure. The long run: `EDGESIGHT_FUZZ_CASES=1000000 cargo test --release
//! --test fuzz`.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use edgesight::config::{Fsync, ModelSettings, OutboxSettings, Settings};
use edgesight::frame::{RawFormat, RawFrame};
use edgesight::mqtt::commands;
use edgesight::mqtt::outbox::{DiskStore, MAX_SEQ, Outbox, Record, decode, encode, poison};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Cases per target: `EDGESIGHT_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("EDGESIGHT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run `test` on `cases` inputs from `strategy`, saying how many ran and how long.
fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let t0 = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |v| {
        test(v);
        Ok(())
    });
    println!(
        "fuzz {name}: {cases} cases in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

// ------------------------------------------------------------------------------ outbox

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "edgesight/[a-z]{1,8}/(front|back)/detection",
        1 => any::<String>(),
        1 => Just(String::new()),
        1 => "[a-z/+#\u{0}]{0,12}",
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        prop_oneof![8 => 1u64..1000, 1 => Just(u64::MAX), 1 => MAX_SEQ - 2..=MAX_SEQ],
        topic(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(seq, topic, payload)| Record {
            seq,
            topic,
            payload,
        })
}

/// A record file as a crash, a bad card or an attacker leaves it.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Garbage(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => Just(Damage::None),
        2 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        1 => any::<usize>().prop_map(Damage::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Extend),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Damage::Garbage),
    ]
}

fn damaged(rec: &Record, d: &Damage) -> Vec<u8> {
    let mut b = encode(rec);
    match d {
        Damage::None => {}
        Damage::Flip(i, x) => {
            let n = b.len();
            b[i % n] ^= x;
        }
        Damage::Truncate(n) => b.truncate(n % b.len()),
        Damage::Extend(tail) => b.extend_from_slice(tail),
        Damage::Garbage(g) => b = g.clone(),
    }
    b
}

/// (d) Record decoding: any bytes decode to a record that encodes back to them, or are
/// refused; valid records survive the round trip.
#[test]
fn outbox_records_decode_or_are_refused() {
    fuzz(
        "outbox record",
        cases(2000),
        (record(), damage()),
        |(rec, d)| {
            let bytes = damaged(&rec, &d);
            match decode(&bytes) {
                Ok(r) => {
                    assert_eq!(encode(&r), bytes, "decoded but re-encodes differently");
                    if matches!(d, Damage::None) {
                        assert_eq!(r, rec);
                    }
                }
                Err(e) => assert!(!matches!(d, Damage::None), "a whole record refused: {e}"),
            }
        },
    );
}

/// (d) Opening a directory of anything: never fails on its contents, replays only
/// records that decode, match their names and can be delivered, in order, and numbers
/// after every name it saw.
#[test]
fn outbox_directories_of_anything_open() {
    let name = prop_oneof![
        4 => (0u64..50).prop_map(|s| format!("{s:020}.rec")),
        1 => Just(format!("{:020}.rec", u64::MAX)),
        1 => "[0-9a-z.]{1,24}",
        1 => (0u64..50).prop_map(|s| format!("{s:020}.tmp")),
    ];
    let file = (name, record(), damage());
    fuzz(
        "outbox directory",
        cases(300),
        proptest::collection::vec(file, 0..12),
        |files| {
            let dir = tempfile::tempdir().unwrap();
            for (name, rec, d) in &files {
                let _ = std::fs::write(dir.path().join(name), damaged(rec, d));
            }
            let (_store, rec) = DiskStore::open(dir.path(), Fsync::Never).unwrap();
            let seqs: Vec<u64> = rec.records.iter().map(|r| r.seq).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
            for r in &rec.records {
                assert!(poison(r).is_none(), "poison replayed: {r:?}");
                assert!(r.seq < rec.next_seq && rec.next_seq <= MAX_SEQ);
                let on_disk = std::fs::read(dir.path().join(format!("{:020}.rec", r.seq)));
                assert_eq!(decode(&on_disk.unwrap()).unwrap(), *r);
            }
            let left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(left.is_empty(), "torn writes left: {left:?}");
        },
    );
}

#[derive(Debug, Clone)]
enum Op {
    Push(String, usize),
    /// Acknowledge the n-th waiting record (modulo how many wait).
    Ack(usize),
    /// A PUBACK for something long gone.
    StaleAck(u64),
    /// The process ends (the store is closed) and a new one opens the directory.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (topic(), 0usize..300).prop_map(|(t, n)| Op::Push(t, n)),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => any::<u64>().prop_map(Op::StaleAck),
        1 => Just(Op::Restart),
    ]
}

/// (d) Push, acknowledge and replay against a model of the queue: nothing accepted is
/// lost except the oldest, counted, at the bounds; the order holds; what a restart
/// replays is exactly what was waiting.
#[test]
fn outbox_push_ack_replay_keeps_order_bounds_and_everything_accepted() {
    fuzz(
        "outbox sequences",
        cases(200),
        (proptest::collection::vec(op(), 1..60), 1usize..8),
        |(ops, max_events)| {
            let dir = tempfile::tempdir().unwrap();
            let s = OutboxSettings {
                dir: dir.path().to_path_buf(),
                fsync: Fsync::Never,
                max_events,
                max_bytes: 1 << 20,
                window: 16,
            };
            let mut ob = Outbox::open(&s).unwrap();
            // The model: (seq, topic, payload) waiting, oldest first.
            let mut model: VecDeque<(u64, String, Vec<u8>)> = VecDeque::new();
            let mut dropped = 0u64;
            for op in ops {
                match op {
                    Op::Push(topic, n) => {
                        let payload = vec![n as u8; n];
                        let probe = Record {
                            seq: 1,
                            topic: topic.clone(),
                            payload: payload.clone(),
                        };
                        match ob.push(topic.clone(), payload.clone()) {
                            Ok(seq) => {
                                assert!(poison(&probe).is_none());
                                assert!(model.back().is_none_or(|b| b.0 < seq));
                                if model.len() == max_events {
                                    model.pop_front();
                                    dropped += 1;
                                }
                                model.push_back((seq, topic, payload));
                            }
                            Err(_) => assert!(poison(&probe).is_some(), "{topic:?} refused"),
                        }
                    }
                    Op::Ack(i) if !model.is_empty() => {
                        let (seq, ..) = model.remove(i % model.len()).unwrap();
                        ob.ack(seq);
                    }
                    Op::Ack(_) => {}
                    Op::StaleAck(seq) => {
                        if !model.iter().any(|m| m.0 == seq) {
                            ob.ack(seq);
                        }
                    }
                    Op::Restart => {
                        let counted = ob
                            .counters
                            .dropped
                            .load(std::sync::atomic::Ordering::Relaxed);
                        assert_eq!(counted, dropped);
                        drop(ob);
                        ob = Outbox::open(&s).unwrap();
                        dropped = 0;
                    }
                }
                let waiting: Vec<(u64, String, Vec<u8>)> = ob
                    .snapshot()
                    .iter()
                    .map(|r| (r.seq, r.topic.clone(), r.payload.clone()))
                    .collect();
                assert_eq!(waiting, Vec::from(model.clone()));
            }
        },
    );
}

// ------------------------------------------------------------------ commands and config

fn settings_with_commands() -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let f = common::config_file(
        dir.path(),
        "127.0.0.1",
        1883,
        "fuzz",
        "[commands]\nenabled = true\n[[camera]]\nname = \"front\"\npath = \"{samples}\"\n",
    );
    Settings::load_with_env(&f, vec![]).unwrap()
}

/// (e) Commands: any verb and payload parse to a request or a refusal; a refusal's log
/// line is one line; a reply is JSON that its documented schema (cmd-result) accepts; and
/// a payload the daemon accepts is one the documented request schema (cmd-request) allows.
#[test]
fn any_command_is_parsed_or_refused_in_one_line() {
    let s = settings_with_commands();
    let (request_schema, result_schema) =
        (common::schema("cmd-request"), common::schema("cmd-result"));
    let verb = prop_oneof![
        "(pause|resume|snapshot|reload)",
        any::<String>(),
        "[a-z\n\r]{0,10}",
    ];
    let payload = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..100),
        r#"\{("(camera|id|x)": ("front|back|\n"|[0-9]{1,3}|null|\[\]|\{\}),? ?){0,3}\}"#
            .prop_map(String::into_bytes),
    ];
    fuzz(
        "commands",
        cases(3000),
        (verb, payload),
        |(verb, payload)| {
            let (name, id, result) = match commands::parse(&s, &verb, &payload) {
                Ok(r) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) {
                        assert!(
                            request_schema.is_valid(&v),
                            "accepted, not in the schema: {v}"
                        );
                    }
                    (r.verb.name().to_string(), r.id, Ok(serde_json::Value::Null))
                }
                Err(r) => {
                    let line = r.log_line();
                    assert!(!line.contains(['\n', '\r']), "{line:?}");
                    (r.verb, r.id, Err(commands::CommandError::Invalid(r.error)))
                }
            };
            let reply = commands::reply(&name, &id, result);
            let reply = serde_json::from_slice::<serde_json::Value>(&reply).expect("reply is JSON");
            assert!(
                result_schema.is_valid(&reply),
                "reply outside cmd-result: {reply}"
            );
        },
    );
}

/// Known keys with values of every TOML type, and stray text: what a careless edit of
/// /etc/edgesight/config.toml looks like.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("device.id"),
        Just("mqtt.port"),
        Just("mqtt.qos"),
        Just("mqtt.host"),
        Just("mqtt.tls"),
        Just("model.threads"),
        Just("model.top_k"),
        Just("model.preprocess"),
        Just("outbox.max_events"),
        Just("outbox.fsync"),
        Just("detection.enabled"),
        Just("commands.max_payload_bytes"),
        Just("log.level"),
        Just("unknown.key"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        "[a-z0-9 ._/-]{0,12}".prop_map(|v| format!("{v:?}")),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        "[^\n]{0,12}",
    ];
    proptest::collection::vec((key, value), 0..6).prop_map(|kv| {
        let mut by_table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (key, value) in kv {
            let (table, k) = key.split_once('.').unwrap();
            by_table
                .entry(table)
                .or_default()
                .push(format!("{k} = {value}"));
        }
        by_table
            .into_iter()
            .map(|(t, lines)| format!("[{t}]\n{}\n", lines.join("\n")))
            .collect()
    })
}

/// (e) Configuration: any file loads or is refused with an error that names the file.
#[test]
fn any_configuration_loads_or_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("models/shapes_int8_qlinear.onnx");
    fuzz("config", cases(1000), config_text(), |text| {
        let f = dir.path().join("edgesight.toml");
        let text = format!(
            "{text}\n[[camera]]\nname = \"c\"\npath = \"{}\"\n",
            dir.path().display()
        )
        .replace(
            "[model]\n",
            &format!("[model]\npath = {:?}\n", model.display()),
        );
        std::fs::write(&f, &text).unwrap();
        if let Err(e) = Settings::load_with_env(&f, vec![]) {
            let msg = e.to_string();
            assert!(msg.contains("edgesight.toml"), "{msg}\n--- for ---\n{text}");
        }
    });
}

// ------------------------------------------------------------------------------ frames

/// The input the frame targets prepare for: small, so a case is cheap.
fn small_input() -> edgesight::frame::preprocess::InputSpec {
    edgesight::frame::preprocess::InputSpec {
        width: 32,
        height: 32,
        layout: edgesight::frame::preprocess::Layout::Nchw,
        normalization: edgesight::config::Preprocess::Torchvision.normalization(),
        resize: edgesight::config::ResizeMode::Stretch,
    }
}

/// (c) Frames: the fixture JPEGs damaged, and raw frames of any size and length, are
/// prepared or refused; none panics or allocates past what its mode allows.
#[test]
fn any_frame_is_prepared_or_refused() {
    let jpegs: Vec<(Vec<u8>, (u32, u32))> = ["circle/01.jpg", "checker/03.jpg", "cross/05.jpg"]
        .iter()
        .map(|f| {
            let path = common::fixture(&format!("samples/{f}"));
            let dims = image::image_dimensions(&path).unwrap();
            (std::fs::read(path).unwrap(), dims)
        })
        .collect();
    let spec = small_input();
    let mjpeg = (
        0usize..3,
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop_oneof![3 => Just(None), 1 => any::<usize>().prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (1u32..700, 1u32..700).prop_map(Some)],
    )
        .prop_map(move |(which, flips, cut, dims)| {
            let (mut data, real) = jpegs[which].clone();
            // Mostly the mode the JPEG was taken in; sometimes any.
            let dims = dims.unwrap_or(real);
            for (i, x) in flips {
                let n = data.len();
                data[i % n] ^= x;
            }
            if let Some(c) = cut {
                data.truncate(c % (data.len() + 1));
            }
            RawFrame {
                format: RawFormat::Mjpeg,
                width: dims.0,
                height: dims.1,
                data,
            }
        });
    let raw = (
        prop_oneof![
            Just(RawFormat::Yuyv),
            Just(RawFormat::Nv12),
            Just(RawFormat::I420),
            Just(RawFormat::Gray),
            Just(RawFormat::Rgb),
            Just(RawFormat::Bgr)
        ],
        (0u32..300, 0u32..300),
        prop_oneof![2 => Just(0i64), 1 => -64i64..64, 1 => -300_000i64..300_000],
        any::<u8>(),
    )
        .prop_map(|(format, (width, height), off, fill)| {
            // Mostly the length the mode says, sometimes a little or a lot off.
            let want = format.frame_len(width, height).unwrap_or(0) as i64;
            RawFrame {
                format,
                width,
                height,
                data: vec![fill; (want + off).max(0) as usize],
            }
        });
    fuzz(
        "frames",
        cases(1000),
        prop_oneof![mjpeg, raw],
        |frame| match frame.prepare(&spec) {
            Ok(t) => assert_eq!(t.shape(), &[1, 3, 32, 32]),
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
}

/// (c) Camera streams: the fixture JPEGs concatenated with damage, cuts and garbage
/// between them, fed to the framer in pieces of any size, as a camera program's stdout or
/// an HTTP body arrive. It never panics, its buffer stays bounded, and every frame it
/// hands out is a whole JPEG (start and end markers) of a size it may be decoded at, which
/// preparation then uses or refuses.
#[test]
fn any_stream_is_cut_into_whole_frames() {
    use edgesight::capture::framing::{Framer, MAX_JPEG, MAX_PIXELS, MAX_SIDE, Piece};
    let jpegs: Vec<Vec<u8>> = ["circle/01.jpg", "checker/03.jpg", "cross/05.jpg"]
        .iter()
        .map(|f| std::fs::read(common::fixture(&format!("samples/{f}"))).unwrap())
        .collect();
    let spec = small_input();
    // A part: a fixture JPEG (damaged or cut, sometimes) or bytes of any kind.
    let part = prop_oneof![
        3 => (
            0usize..3,
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            prop_oneof![3 => Just(None), 1 => any::<usize>().prop_map(Some)],
        )
            .prop_map(move |(which, flips, cut)| {
                let mut data = jpegs[which].clone();
                for (i, x) in flips {
                    let n = data.len();
                    data[i % n] ^= x;
                }
                if let Some(c) = cut {
                    data.truncate(c % (data.len() + 1));
                }
                data
            }),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(b"\r\n--frame\r\nContent-Type: image/jpeg\r\n\r\n".to_vec()),
    ];
    let stream = (
        proptest::collection::vec(part, 1..8),
        proptest::collection::vec(1usize..5000, 1..8),
    );
    fuzz("streams", cases(1000), stream, |(parts, chunks)| {
        let bytes = parts.concat();
        let mut framer = Framer::jpeg();
        let (mut at, mut k) = (0, 0);
        while at < bytes.len() {
            let n = chunks[k % chunks.len()].min(bytes.len() - at);
            framer.buffer().extend_from_slice(&bytes[at..at + n]);
            (at, k) = (at + n, k + 1);
            while let Some(piece) = framer.next_piece() {
                let Piece::Frame(f) = piece else { continue };
                assert_eq!(f.data[..2], [0xFF, 0xD8]);
                assert_eq!(f.data[f.data.len() - 2..], [0xFF, 0xD9]);
                assert!(f.width.max(f.height) <= MAX_SIDE && f.width.min(f.height) > 0);
                assert!(f.width as u64 * f.height as u64 <= MAX_PIXELS);
                if let Ok(t) = f.prepare(&spec) {
                    assert_eq!(t.shape(), &[1, 3, 32, 32]);
                }
            }
            assert!(framer.buffered() <= MAX_JPEG + (64 << 10) + 5000);
        }
    });
}

// ------------------------------------------------------------------------------ models

/// (b) Models: the fixture models with attributes and dimensions rewritten to anything,
/// or their bytes damaged, load or are refused; none panics (a panic inside tract is the
/// load's error, see util::panics) or reaches memory it should not.
#[test]
fn mutated_models_load_or_are_refused() {
    use prost::Message;
    use tract_onnx::pb::ModelProto;
    let bases: Vec<ModelProto> = ["shapes_int8_qlinear.onnx", "shapes_int8_qop.onnx"]
        .iter()
        .map(|f| {
            let bytes = std::fs::read(common::fixture(&format!("models/{f}"))).unwrap();
            ModelProto::decode(&bytes[..]).unwrap()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let labels = common::fixture("labels.txt");
    let int = prop_oneof![
        -3i64..10,
        Just(i64::MAX),
        Just(i64::MIN),
        Just(1 << 58),
        Just(4097),
        any::<i64>()
    ];
    let edit = (
        any::<usize>(),
        any::<usize>(),
        proptest::collection::vec(int, 0..5),
    );
    let mutation = (
        0usize..2,
        proptest::collection::vec(edit, 1..4),
        prop_oneof![
            3 => Just(vec![]),
            1 => proptest::collection::vec((any::<usize>(), 1u8..=255), 1..3),
        ],
    );
    let n = std::env::var("EDGESIGHT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(300, |n| (n / 10).max(300));
    let (n_loaded, n_refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    fuzz("models", n, mutation, |(base, edits, flips)| {
        let mut m = bases[base].clone();
        let g = m.graph.as_mut().unwrap();
        for (node, attr, ints) in edits {
            let nodes = g.node.len();
            let n = &mut g.node[node % nodes];
            if n.attribute.is_empty() {
                continue;
            }
            let attrs = n.attribute.len();
            let a = &mut n.attribute[attr % attrs];
            if !a.ints.is_empty() || a.i != 0 {
                a.ints = ints.clone();
                a.i = ints.first().copied().unwrap_or(0);
            }
        }
        let mut bytes = m.encode_to_vec();
        for (i, x) in flips {
            let n = bytes.len();
            bytes[i % n] ^= x;
        }
        let path = dir.path().join("mutated.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let settings = ModelSettings {
            labels: Some(labels.clone()),
            ..ModelSettings::for_file(path)
        };
        let loaded = std::panic::catch_unwind(|| edgesight::model::Classifier::load(&settings));
        match loaded {
            Ok(Ok(c)) => {
                n_loaded.fetch_add(1, Ordering::Relaxed);
                // It loaded: it must also run on a frame.
                let spec = *c.input_spec();
                let img =
                    image::RgbImage::from_pixel(spec.width, spec.height, image::Rgb([9, 99, 199]));
                let frame = RawFrame::from(img);
                if let Ok(t) = frame.prepare(&spec) {
                    let _ = c.classify_tensor(t);
                }
            }
            Ok(Err(e)) => {
                n_refused.fetch_add(1, Ordering::Relaxed);
                assert!(format!("{e:#}").contains("mutated.onnx"), "{e:#}")
            }
            Err(_) => panic!("the load panicked"),
        }
    });
    println!(
        "fuzz models: {} loaded and ran, {} refused with a reason",
        n_loaded.into_inner(),
        n_refused.into_inner()
    );
}
