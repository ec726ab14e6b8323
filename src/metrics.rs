//! Prometheus `/metrics` (`[metrics] listen`): the counters the stats message carries, read
//! at scrape time from the running pipeline's [`Stats`] (no second set of counters to keep
//! in step), in the OpenMetrics text format of the Prometheus project's own client crate.
//!
//! Names follow Prometheus conventions: an `edgesight_` prefix, base units (seconds,
//! bytes), `_total` on counters. Per camera: `edgesight_frames_*_total{camera}`; per
//! region of a camera: `edgesight_region_crops_*_total{camera,region}`; per model its
//! inference times: `edgesight_inference_seconds{model}` (a histogram); the MQTT session
//! and the durable outbox; the process's resident memory.
//!
//! May use: config, stats, util.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::stats::{CameraStats, OutboxCounters, RegionStats, Stats};

/// What a scrape reads: the running pipeline's counters (a reload swaps them).
#[derive(Debug, Default)]
pub struct Current {
    pipeline: RwLock<Option<Arc<Stats>>>,
}

impl Current {
    /// A new pipeline started: its counters (they start at zero again, which Prometheus
    /// reads as a counter reset).
    pub fn set(&self, stats: Arc<Stats>) {
        *self.pipeline.write().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    fn get(&self) -> Option<Arc<Stats>> {
        self.pipeline
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Counters as (name, help, which field of a `T`).
type Counters<T> = &'static [(&'static str, &'static str, fn(&T) -> &AtomicU64)];

/// The per-camera counters.
const CAMERA_COUNTERS: Counters<CameraStats> = &[
    (
        "edgesight_frames_captured",
        "Frames the camera delivered.",
        |c| &c.captured,
    ),
    (
        "edgesight_frames_classified",
        "Frames the model classified.",
        |c| &c.classified,
    ),
    (
        "edgesight_frames_skipped",
        "Frames replaced by a newer one before inference, or over the fps limit.",
        |c| &c.skipped,
    ),
    (
        "edgesight_frames_stale",
        "Frames older than max_age_ms when inference reached them.",
        |c| &c.stale,
    ),
    (
        "edgesight_frames_gated",
        "Frames not classified because the scene had not changed.",
        |c| &c.gated,
    ),
    (
        "edgesight_frames_bad",
        "Frames that could not be decoded or that the driver flagged.",
        |c| &c.bad_frames,
    ),
    (
        "edgesight_camera_errors",
        "Source errors: failed opens, capture failures, undecodable files.",
        |c| &c.errors,
    ),
    (
        "edgesight_camera_stalls",
        "Times the camera stopped delivering and was reopened.",
        |c| &c.stalls,
    ),
];

/// The per-region counters.
const REGION_COUNTERS: Counters<RegionStats> = &[
    (
        "edgesight_region_crops_classified",
        "Crops of the region the model classified.",
        |r| &r.classified,
    ),
    (
        "edgesight_region_crops_gated",
        "Crops of the region not classified because it had not changed.",
        |r| &r.gated,
    ),
    (
        "edgesight_region_crops_bad",
        "Frames the region could not be cut from (outside the frame).",
        |r| &r.bad,
    ),
];

#[derive(Debug)]
struct Edgesight(Arc<Current>);

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Edgesight {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(rss) = crate::util::rss_mb() {
            let help = "Resident memory of the daemon.";
            let bytes = rss * 1024.0 * 1024.0;
            gauge(&mut e, "process_resident_memory_bytes", help, bytes)?;
        }
        let Some(stats) = self.0.get() else {
            return Ok(()); // no pipeline yet (the model is loading)
        };
        encode_cameras(&mut e, &stats)?;
        encode_inference(&mut e, &stats)?;
        encode_network(&mut e, &stats)?;
        if let Some(o) = stats.outbox.get() {
            encode_outbox(&mut e, o)?;
        }
        Ok(())
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Each per-camera counter, one sample per camera.
fn encode_cameras(e: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    for (name, help, field) in CAMERA_COUNTERS {
        let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (camera, c) in &stats.cameras {
            let labels = [("camera", camera.as_str())];
            ConstCounter::new(load(field(c))).encode(family.encode_family(&labels)?)?;
        }
    }
    let regions = || {
        let cameras = stats.cameras.iter();
        cameras.flat_map(|(camera, c)| c.regions.iter().map(move |r| (camera, r)))
    };
    if regions().next().is_none() {
        return Ok(());
    }
    for (name, help, field) in REGION_COUNTERS {
        let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (camera, r) in regions() {
            let labels = [("camera", camera.as_str()), ("region", r.name.as_str())];
            ConstCounter::new(load(field(r))).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Each model's inference times, as a histogram labelled with the model's name.
fn encode_inference(e: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    let help = "Time the model took per frame or region.";
    let kind = MetricType::Histogram;
    let mut family = e.encode_descriptor("edgesight_inference_seconds", help, None, kind)?;
    for (model, h) in &stats.models {
        let (sum, count, buckets) = h.snapshot();
        let labels = [("model", model.as_str())];
        family
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    Ok(())
}

/// The MQTT session, and what the inference stage could not publish or classify.
fn encode_network(e: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    let connected = stats.connected.load(Ordering::Relaxed) as u8 as f64;
    let help = "1 while the MQTT session is up.";
    gauge(e, "edgesight_mqtt_connected", help, connected)?;
    const COUNTERS: Counters<Stats> = &[
        (
            "edgesight_mqtt_reconnects",
            "Connections to the broker after the first.",
            |s| &s.reconnects,
        ),
        (
            "edgesight_mqtt_publish_dropped",
            "Messages dropped because the MQTT queue was full.",
            |s| &s.publish_dropped,
        ),
        (
            "edgesight_mqtt_publish_lost",
            "Messages queued in the client and lost when a connection broke.",
            |s| &s.publish_lost,
        ),
        (
            "edgesight_inference_errors",
            "Frames the model failed on.",
            |s| &s.inference_errors,
        ),
    ];
    for (name, help, field) in COUNTERS {
        counter(e, name, help, load(field(stats)))?;
    }
    Ok(())
}

/// The durable outbox: what waits, and what it accepted, delivered and lost.
fn encode_outbox(e: &mut DescriptorEncoder, o: &OutboxCounters) -> Result<(), std::fmt::Error> {
    gauge(
        e,
        "edgesight_outbox_depth",
        "Records waiting for their PUBACK.",
        o.depth() as f64,
    )?;
    gauge(
        e,
        "edgesight_outbox_bytes",
        "Bytes of the records waiting.",
        o.bytes() as f64,
    )?;
    const COUNTERS: Counters<OutboxCounters> = &[
        (
            "edgesight_outbox_accepted",
            "Records the outbox accepted.",
            |o| &o.accepted,
        ),
        (
            "edgesight_outbox_delivered",
            "Records the broker acknowledged.",
            |o| &o.delivered,
        ),
        (
            "edgesight_outbox_dropped",
            "Oldest records dropped to stay within the bounds.",
            |o| &o.dropped,
        ),
        (
            "edgesight_outbox_quarantined",
            "Corrupt or undeliverable records moved aside.",
            |o| &o.quarantined,
        ),
    ];
    for (name, help, field) in COUNTERS {
        counter(e, name, help, load(field(o)))?;
    }
    Ok(())
}

/// The text a scrape gets.
pub fn render(current: &Arc<Current>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Edgesight(current.clone())));
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        warn!("metrics: cannot encode: {e}");
    }
    text
}

/// Scrapes served at once; more wait for a turn (a scraper is one client, not a crowd).
const CONNECTIONS: usize = 4;

/// Bind `listen` (an error here is the caller's to report: the port is taken, or not
/// ours to bind).
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics.listen: cannot listen on {listen}"))
}

/// Serve `GET /metrics` on `listener` until `stop`; anything else gets 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    current: Arc<Current>,
    stop: CancellationToken,
) {
    if let Ok(a) = listener.local_addr() {
        info!("metrics: serving http://{a}/metrics");
    }
    let permits = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let current = current.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let current = current.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &current)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            // A client that stalls mid-request is not waited on for ever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, current: &Arc<Current>) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(current),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: GET /metrics\n".into(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions and models in the exposition: a sample per region of each region counter,
    /// a histogram per model, each agreeing with the counters it reads.
    #[test]
    fn regions_and_models_are_exposed_with_their_labels() {
        let s = crate::config::from_toml(
            "[[model]]\nname = \"big\"\npath = \"a.onnx\"\n[[model]]\nname = \"small\"\npath = \"b.onnx\"\n\
             [[camera]]\nname = \"yard\"\npath = \"x\"\n\
             [[camera.region]]\nname = \"gate\"\nwidth = 0.5\nheight = 1\n\
             [[camera.region]]\nname = \"feeder\"\nx = 0.5\nwidth = 0.5\nheight = 1\nmodel = \"small\"\n\
             [[camera]]\nname = \"door\"\npath = \"x\"\n",
        );
        let stats = Arc::new(Stats::for_settings(&s));
        let yard = stats.camera(0);
        yard.regions[0].classified.store(7, Ordering::Relaxed);
        yard.regions[1].gated.store(3, Ordering::Relaxed);
        yard.regions[1].bad.store(2, Ordering::Relaxed);
        stats.model(1).unwrap().observe(0.02);
        let current = Arc::new(Current::default());
        current.set(stats);
        let text = render(&current);
        for line in [
            "edgesight_region_crops_classified_total{camera=\"yard\",region=\"gate\"} 7",
            "edgesight_region_crops_gated_total{camera=\"yard\",region=\"feeder\"} 3",
            "edgesight_region_crops_bad_total{camera=\"yard\",region=\"feeder\"} 2",
            "edgesight_inference_seconds_count{model=\"big\"} 0",
            "edgesight_inference_seconds_count{model=\"small\"} 1",
            "edgesight_frames_captured_total{camera=\"door\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("region=\"\""),
            "a camera without regions has none"
        );
    }
}
