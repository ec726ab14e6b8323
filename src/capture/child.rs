//! A camera program run as a child (rpicam-vid, ffmpeg, anything on a `pipe` source):
//! spawned in a process group of its own, its stdout read as the frame stream, its stderr
//! logged (rate-limited, credentials scrubbed), and the whole group stopped when the
//! stream is dropped (a stall, an error, shutdown, a reload).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout, Command};
use tracing::{info, warn};

use crate::capture::CaptureError;
use crate::config::scrub;
use crate::util::worth_logging;

/// How long a program has to exit after SIGTERM before its group gets SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// stderr lines kept for the reason given when the program exits.
const TAIL_LINES: usize = 3;

/// A stderr line longer than this is cut (a program printing binary garbage).
const MAX_LINE: usize = 1024;

/// stderr lines logged in full before only every 2^n-th is.
const LOG_FIRST: u64 = 20;

/// `program` as the daemon would run it: a path (with a '/') as given, else the first
/// executable file of that name in `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// Make the pipe a program writes its frames into hold 1 MiB (the most Linux gives an
/// unprivileged process by default) instead of 64 KiB: a 720p JPEG then arrives in one or
/// two reads rather than five, which takes a third off the capture side's CPU per frame
/// (benches/capture.rs). Best effort: a smaller pipe only costs reads.
pub fn widen_pipe(fd: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a descriptor we own; it touches no memory.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
}

const PIPE_SIZE: libc::c_int = 1 << 20;

/// A running camera program. Dropping it stops the program's whole process group.
pub struct ChildProgram {
    child: Option<Child>,
    stdout: ChildStdout,
    pgid: i32,
    /// The program's file name, for messages.
    pub program: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildProgram {
    /// Start `path` with `args` for camera `camera`. `secrets` never reach the log (the
    /// command line as logged and every stderr line are scrubbed).
    pub fn spawn(
        camera: &str,
        path: &Path,
        args: &[String],
        secrets: &[String],
    ) -> Result<ChildProgram, CaptureError> {
        let program = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let mut cmd = Command::new(path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a shell wrapper's children are stopped with it.
            .process_group(0)
            // A backstop if the stop below never runs (the runtime gone first).
            .kill_on_drop(true);
        // libcamera (under rpicam-vid) logs every start at INFO, a dozen lines: keep its
        // warnings and errors, unless the user's environment says otherwise.
        if std::env::var_os("LIBCAMERA_LOG_LEVELS").is_none() {
            cmd.env("LIBCAMERA_LOG_LEVELS", "*:WARN");
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours. It kills the
        // program when the thread that spawned it ends: a tokio worker, which lives as
        // long as the daemon, so in effect when the daemon dies without stopping it (a
        // crash, SIGKILL), a camera program must not keep the camera busy for the next
        // daemon.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|err| CaptureError::StartProgram {
            program: program.clone(),
            err,
        })?;
        let (Some(stdout), Some(stderr), Some(pid)) =
            (child.stdout.take(), child.stderr.take(), child.id())
        else {
            return Err(CaptureError::StartProgram {
                program,
                err: std::io::Error::other("no stdout/stderr pipe"),
            });
        };
        widen_pipe(&stdout);
        let shown = scrub(&args.join(" "), secrets);
        info!(
            "camera {camera}: started {} {shown} (pid {pid})",
            path.display()
        );
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(log_stderr(
            stderr,
            format!("camera {camera}: {program}"),
            secrets.to_vec(),
            tail.clone(),
        ));
        Ok(ChildProgram {
            child: Some(child),
            stdout,
            pgid: pid as i32,
            program,
            tail,
        })
    }

    /// Read what the program wrote next into `buf`'s spare room; 0 at its end.
    pub async fn read(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        self.stdout.read_buf(buf).await
    }

    /// Why the stream ended (stdout closed): the exit status, if the program exits soon,
    /// and its last words on stderr.
    pub async fn ended(&mut self) -> CaptureError {
        let status = match &mut self.child {
            Some(c) => match tokio::time::timeout(GRACE, c.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("status unknown: {e}"),
                Err(_) => "closed its output but did not exit".into(),
            },
            None => "gone".into(),
        };
        // The stderr task may still hold the last lines: give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = self.tail.lock().ok().and_then(|t| t.back().cloned());
        CaptureError::Exited {
            program: self.program.clone(),
            status,
            last,
        }
    }
}

impl Drop for ChildProgram {
    fn drop(&mut self) {
        // SIGCONT too: a stopped program (SIGSTOP) only acts on SIGTERM once it runs.
        // SAFETY: plain syscalls on our own child's process group.
        unsafe {
            libc::killpg(self.pgid, libc::SIGTERM);
            libc::killpg(self.pgid, libc::SIGCONT);
        }
        let (Some(mut child), pgid) = (self.child.take(), self.pgid) else {
            return;
        };
        // While the leader is unreaped its pid cannot be reused, so the group id is ours.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
                    // SAFETY: as above.
                    unsafe { libc::killpg(pgid, libc::SIGKILL) };
                    let _ = child.wait().await;
                }
            });
        }
    }
}

/// Log the program's stderr line by line until it closes: the first [`LOG_FIRST`] lines,
/// then every 2^n-th; keep the last few for [`ChildProgram::ended`].
async fn log_stderr(
    mut stderr: tokio::process::ChildStderr,
    who: String,
    secrets: Vec<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    let mut n = 0u64;
    let mut emit = |raw: &[u8]| {
        let text = String::from_utf8_lossy(raw);
        let text = scrub(text.trim_end(), &secrets);
        if text.is_empty() {
            return;
        }
        n += 1;
        if n <= LOG_FIRST || worth_logging(n) {
            warn!("{who}: {text}");
        }
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text);
        }
    };
    loop {
        let got = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(got) => got,
        };
        for &b in &buf[..got] {
            if b == b'\n' || b == b'\r' {
                emit(&line);
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
    emit(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_in_every_form() {
        let secrets = vec!["p%40ss".to_string(), "p@ss".to_string()];
        for (line, want) in [
            (
                "rtsp://admin:p%40ss@10.0.0.2/stream: 401 Unauthorized",
                "rtsp://admin:***@10.0.0.2/stream: 401 Unauthorized",
            ),
            ("password p@ss rejected", "password *** rejected"),
            ("nothing secret", "nothing secret"),
        ] {
            assert_eq!(scrub(line, &secrets), want);
        }
    }

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(find_program("sh").is_some_and(|p| p.is_absolute()));
        assert_eq!(find_program("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_program("edgesight-no-such-program"), None);
        // A directory or a file without an execute bit is not a program.
        assert_eq!(find_program("/tmp"), None);
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-a-program");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        assert_eq!(find_program(plain.to_str().unwrap()), None);
    }
}
