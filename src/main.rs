//! Thin entry point: parse the command line, set up logging, call the library, map errors
//! to exit codes (78 = configuration error) and print the whole error chain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgesight::config::{ConfigError, EX_CONFIG, ModelSettings, Settings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const DEFAULT_CONFIG: &str = "/etc/edgesight/config.toml";

#[derive(Parser)]
#[command(
    name = "edgesight",
    version,
    about = "Edge vision daemon: camera -> ResNet (tract) -> MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration, load and optimise the model, print the effective config.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Classify image files and print the top predictions.
    Classify {
        /// Take model settings from this config (otherwise defaults plus --model/--labels).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        labels: Option<PathBuf>,
        /// One JSON object per image on stdout.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// List V4L2 cameras and their modes.
    Cameras,
    /// Time a model on this machine; print one JSON object (load, optimise, median and
    /// minimum inference time, peak RSS).
    Bench(edgesight::model::bench::BenchOptions),
}

fn main() -> ExitCode {
    // A panic anywhere is fatal (systemd restarts us whole), except while a model loads.
    edgesight::util::panics::abort_on_panic();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A command that prints (`check | head`) ends quietly when its reader goes away, as
        // Unix tools do; Rust ignores SIGPIPE, so the next print would panic and abort.
        // The daemon keeps ignoring it: a broker's socket closing is an error to handle.
        // SAFETY: setting a signal's disposition, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgesight: {e:#}");
            if e.chain().any(|c| c.is::<ConfigError>()) {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    // Our level for our code. rumqttd logs ordinary events (a client closing its socket,
    // a port probe) at ERROR, which would read as faults in the journal: keep it quiet.
    let filter = format!("{level},rumqttd=off,rumqttc=warn,tract=warn");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for journald or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let settings = Settings::load(&config)?;
            init_logging(settings.log.level.as_str());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let reload = Arc::new(Notify::new());
                spawn_signal_handler(shutdown.clone(), reload.clone())?;
                let notifier = edgesight::daemon::notify::Notifier::from_env();
                edgesight::run_with(settings, shutdown, notifier, reload)
                    .await
                    .map(|_| ())
            })
        }
        Command::Check { config } => check(&config),
        Command::Classify {
            config,
            model,
            labels,
            json,
            images,
        } => classify(config.as_deref(), model, labels, json, &images),
        Command::Bench(opts) => {
            init_logging("warn");
            let v = edgesight::model::bench::bench(&opts)
                .map_err(|e| ConfigError::new(format!("{e:#}")))?;
            println!("{v}");
            Ok(())
        }
        Command::Cameras => {
            init_logging("warn");
            let cams = edgesight::capture::V4l2Backend.list()?;
            print!("{}", edgesight::capture::describe(&cams));
            if let Some(text) = edgesight::capture::stream::list_libcamera() {
                print!("\n{text}");
            }
            Ok(())
        }
    }
}

/// `edgesight check`: the configuration validated, every model loaded, every source
/// looked at; then what will run, and the effective configuration.
fn check(config: &Path) -> Result<()> {
    let settings = Settings::load(config)?;
    init_logging("warn");
    let t0 = std::time::Instant::now();
    let models = edgesight::load_models(&settings)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if settings.detection.enabled {
        let labels: Vec<&[String]> = models.iter().map(|m| m.classifier.labels()).collect();
        edgesight::detect::Rules::for_models(&settings, &labels)?;
    }
    for (i, cam) in settings.camera.iter().enumerate() {
        check_source(&settings, i, cam)?;
    }
    println!("# configuration {} is valid", config.display());
    for cam in &settings.camera {
        describe_views(cam);
    }
    println!(
        "# {} model(s) loaded and optimised in {ms:.0} ms",
        settings.models.len()
    );
    for m in models.iter() {
        describe_model(&m.settings, &m.classifier);
    }
    print!("{}", settings.to_redacted_toml());
    Ok(())
}

/// What `check` says of a camera's views: the whole frame or each region, on which model.
fn describe_views(cam: &edgesight::config::CameraSettings) {
    if cam.regions.is_empty() {
        println!(
            "# camera {}: the whole frame on model {}",
            cam.name, cam.model
        );
        return;
    }
    let regions: Vec<String> = cam
        .regions
        .iter()
        .map(|r| format!("{} ({}) on {}", r.name, r.area, r.model))
        .collect();
    println!(
        "# camera {}: {} region(s): {}",
        cam.name,
        regions.len(),
        regions.join("; ")
    );
}

/// What `check` says of one model: its geometry, its preprocessing, and notes.
fn describe_model(ms: &ModelSettings, model: &edgesight::model::Classifier) {
    let spec = model.input_spec();
    println!(
        "# model {} ({}): input {:?} ({:?}), output {:?}, {} labels",
        ms.name,
        ms.path.display(),
        spec.shape(),
        spec.layout,
        model.output_shape(),
        model.labels().len(),
    );
    println!(
        "#   preprocessing: {} to {}x{}, then {}",
        match spec.resize {
            edgesight::config::ResizeMode::Stretch => "stretched",
            edgesight::config::ResizeMode::CenterCrop => "centre-cropped and scaled",
        },
        spec.width,
        spec.height,
        spec.normalization
    );
    if let Some(note) = model.change_axes().note() {
        println!("#   note: {note}");
    }
    if model.is_float() {
        println!(
            "#   note: a float model. Its int8 form, made by `python3 tools/quantize.py \
             {} --calib FRAMES_DIR`, is usually much faster: ResNet-50 runs 3.4x faster \
             in int8 on a Zen 4 (92 -> 27 ms); 6.6x on a Xeon with AMX against tract's \
             float convolutions (119 -> 18 ms), 1.7x with AVX2 alone; estimated 3.0x on \
             a Pi 5 and 1.3x on a Pi 4 (BENCHMARKS.md)",
            ms.path.display()
        );
    }
}

/// What `check` can know of a camera's source without opening it: the images are there,
/// a stream source's program is installed.
fn check_source(
    settings: &Settings,
    i: usize,
    cam: &edgesight::config::CameraSettings,
) -> Result<()> {
    use edgesight::capture::StreamRequest;
    if let edgesight::config::SourceSettings::Images { path, .. } = &cam.source {
        let n = edgesight::capture::images::image_files(path)
            .map_err(|e| settings.error_at(&format!("camera[{i}].path"), format!("{e:#}")))?;
        println!("# camera {}: {} image(s)", cam.name, n.len());
    }
    if let Some(request) = StreamRequest::from_settings(cam) {
        match request.program() {
            Ok(Some(p)) => println!("# camera {}: runs {}", cam.name, p.display()),
            Ok(None) => {}
            Err(e) => {
                let key = format!("camera[{i}].source");
                return Err(settings
                    .error_at(&key, format!("camera {:?}: {e}", cam.name))
                    .into());
            }
        }
    }
    Ok(())
}

fn classify(
    config: Option<&Path>,
    model: Option<PathBuf>,
    labels: Option<PathBuf>,
    json: bool,
    images: &[PathBuf],
) -> Result<()> {
    init_logging("warn");
    let mut ms = match config {
        // The configuration's first model (the one cameras use unless they name another).
        Some(c) => Settings::load(c)?.models.remove(0),
        None => ModelSettings::for_file(
            model
                .clone()
                .ok_or_else(|| ConfigError::new("classify needs --model PATH or --config PATH"))?,
        ),
    };
    if let Some(m) = model {
        ms.path = m;
    }
    if labels.is_some() {
        ms.labels = labels;
    }
    let classifier = edgesight::model::Classifier::load(&ms)
        .map_err(|e| ConfigError::new(format!("model: {e:#}")))?;
    let mut failed = 0;
    for path in images {
        let img = match image::open(path) {
            Ok(i) => i.into_rgb8(),
            Err(e) => {
                eprintln!("edgesight: {}: cannot decode: {e}", path.display());
                failed += 1;
                continue;
            }
        };
        let (top, ms) = classifier.classify(&img)?;
        if json {
            let line = serde_json::json!({"file": path.display().to_string(), "top": top});
            println!("{line}");
        } else {
            let best: Vec<String> = top
                .iter()
                .map(|p| format!("{} {:.3}", p.label, p.score))
                .collect();
            println!("{}: {} ({ms:.1} ms)", path.display(), best.join(", "));
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} image(s) could not be decoded", images.len());
    }
    Ok(())
}

/// SIGTERM (systemd) and SIGINT (a terminal) both start a clean shutdown; a second signal
/// while draining is ignored on purpose: exiting early would lose queued messages.
fn spawn_signal_handler(shutdown: CancellationToken, reload: Arc<Notify>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration and the model");
                    reload.notify_one();
                    continue;
                }
            }
            shutdown.cancel();
            return;
        }
    });
    Ok(())
}
