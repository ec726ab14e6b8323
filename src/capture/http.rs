//! `source = "http-mjpeg"`: a camera serving JPEGs as `multipart/x-mixed-replace` over
//! HTTP/1.1, read directly through hyper's client (no child program). The body is handed
//! to the JPEG framer as it arrives; the multipart boundaries and part headers between the
//! JPEGs are skipped by it. A URL that answers with one `image/jpeg` (a camera's snapshot
//! URL) is asked again at the camera's `fps`, so it streams too.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::capture::CaptureError;
use crate::config::SourceUrl;

/// An open HTTP stream: the response body, and the connection task that drives it
/// (aborted when the stream is dropped).
pub struct HttpStream {
    body: Incoming,
    conn: JoinHandle<()>,
    url: String,
    /// A snapshot URL (one `image/jpeg` per response): asked again every `period`.
    snapshot: Option<Snapshots>,
}

struct Snapshots {
    url: SourceUrl,
    period: Duration,
    asked: tokio::time::Instant,
}

impl Drop for HttpStream {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Connect to `url` and start the stream; a snapshot URL is asked again every 1/`fps`.
/// The errors name the URL without its password.
pub async fn open(url: &SourceUrl, fps: f64) -> Result<HttpStream, CaptureError> {
    let asked = tokio::time::Instant::now();
    let (mut stream, single) = request(url).await?;
    if single {
        stream.snapshot = Some(Snapshots {
            url: url.clone(),
            period: Duration::from_secs_f64(1.0 / fps),
            asked,
        });
    }
    Ok(stream)
}

/// One GET of `url`: the response, and whether it is a single JPEG (a snapshot URL).
async fn request(url: &SourceUrl) -> Result<(HttpStream, bool), CaptureError> {
    let shown = url.to_string();
    let fail = |what: String| CaptureError::Http {
        url: shown.clone(),
        what,
    };
    let authority = url.authority();
    // `host` alone, an IPv6 `[addr]` alone, or either with a port.
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let addr = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(format!("HTTP handshake: {e}")))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(url.path().as_str())
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("edgesight/", env!("CARGO_PKG_VERSION")),
        )
        .header(
            hyper::header::ACCEPT,
            "multipart/x-mixed-replace, image/jpeg",
        );
    if let Some((user, password)) = url.credentials() {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req = req.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("bad request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(format!("no response: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 | 403 => " (check the user and password in the URL)",
            404 => " (check the path: the camera's MJPEG stream, not its web page)",
            _ => "",
        };
        return Err(fail(format!("HTTP {status}{hint}")));
    }
    let kind = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // A web page or an API, not a stream: say so. Anything else (cameras and ffmpeg's
    // server do send application/octet-stream) is left to the framer, which refuses a
    // stream without JPEGs in it.
    if kind.starts_with("text/") || kind.contains("json") {
        return Err(fail(format!(
            "serves {kind:?}, not MJPEG (multipart/x-mixed-replace)"
        )));
    }
    let stream = HttpStream {
        body: resp.into_body(),
        conn,
        url: shown,
        snapshot: None,
    };
    Ok((stream, kind.starts_with("image/jpeg")))
}

impl HttpStream {
    /// Append the next piece of the body to `buf`; 0 at its end (for a snapshot URL, only
    /// when asking again fails).
    pub async fn read(&mut self, buf: &mut Vec<u8>) -> Result<usize, CaptureError> {
        loop {
            match self.body.frame().await {
                None if self.snapshot.is_some() => self.ask_again().await?,
                None => return Ok(0),
                Some(Err(e)) => {
                    return Err(CaptureError::Http {
                        url: self.url.clone(),
                        what: format!("stream broken: {e}"),
                    });
                }
                Some(Ok(frame)) => {
                    // Trailers carry no data: read on.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                }
            }
        }
    }

    /// The next snapshot: one period after the last was asked for.
    async fn ask_again(&mut self) -> Result<(), CaptureError> {
        let Some(mut s) = self.snapshot.take() else {
            return Ok(());
        };
        tokio::time::sleep_until(s.asked + s.period).await;
        s.asked = tokio::time::Instant::now();
        let (mut next, single) = request(&s.url).await?;
        if !single {
            return Err(CaptureError::Http {
                url: self.url.clone(),
                what: "no longer serves single JPEGs".into(),
            });
        }
        next.snapshot = Some(s);
        // The old response's connection task is aborted as it drops.
        *self = next;
        Ok(())
    }

    /// Why the stream ended (the body closed).
    pub fn ended(&self) -> CaptureError {
        CaptureError::Http {
            url: self.url.clone(),
            what: "the server ended the stream".into(),
        }
    }
}
