//! Helpers for the end-to-end tests: fixture paths, scratch folders, running a binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// The commit the local hub reports.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

pub fn hf_fixture(name: &str) -> PathBuf {
    fixtures().join("hf").join(name)
}

/// A fresh, empty scratch folder unique to this test. What earlier runs of the same test left
/// behind (a failed assertion skips a test's cleanup; some real-model folders are GBs) is
/// removed first when the process that made it is gone (Linux: no /proc/<pid>), so repeated
/// runs do not fill the disk.
pub fn scratch(test: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    let prefix = format!("loratune-{test}-");
    if Path::new("/proc/self").exists() {
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("loratune-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(bin: &str, args: &[&str]) -> Run {
    let out: Output = Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    finish(bin, out)
}

/// A finished process as a `Run`; a panic message on stderr fails the test.
pub fn finish(bin: &str, out: Output) -> Run {
    let r = Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !r.stderr.contains("panicked"),
        "{bin} panicked:\n{}",
        r.stderr
    );
    r
}

/// Files in `dir` whose name starts with '.' and contains ".tmp" (atomic-write leftovers).
pub fn temp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".tmp"))
        .collect()
}

/// Runs `bin` with `input` on its stdin.
pub fn run_with_stdin(bin: &str, args: &[&str], input: &str) -> Run {
    let mut child = Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    finish(bin, child.wait_with_output().unwrap())
}

/// Serves the files of `dir` as the Hub model `repo` on 127.0.0.1 (the Hub's URL layout:
/// `/api/models/<repo>/revision/main`, `/<repo>/resolve/main/<file>` with Range requests);
/// returns the port and the log of request paths. A repo whose org starts with `gated`
/// answers 401 to requests without an Authorization header, as the Hub does for gated models.
pub fn serve_hub(dir: PathBuf, repo: &str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let repo = repo.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            let log = log2.clone();
            let repo = repo.clone();
            std::thread::spawn(move || handle(stream, &dir, &repo, &log));
        }
    });
    (port, log)
}

fn handle(mut stream: TcpStream, dir: &Path, repo: &str, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start: Option<u64> = None;
    let mut range_end: Option<u64> = None;
    let mut authorized = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        authorized |= lower.starts_with("authorization: bearer ");
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let (a, b) = r.trim().split_once('-').unwrap();
            range_start = a.parse().ok();
            range_end = b.parse().ok();
        }
    }
    log.lock().unwrap().push(path.clone());
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let api = format!("/api/models/{repo}/revision/main");
    let resolve = format!("/{repo}/resolve/main/");
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) =
        if repo.starts_with("gated") && !authorized {
            (
                "401 Unauthorized",
                vec![],
                b"{\"error\": \"Access to model is restricted.\"}".to_vec(),
            )
        } else if path == api {
            let siblings: Vec<String> = files
                .iter()
                .map(|f| format!(r#"{{"rfilename": "{f}"}}"#))
                .collect();
            let body = format!(
                r#"{{"sha": "{COMMIT}", "siblings": [{}]}}"#,
                siblings.join(",")
            );
            (
                "200 OK",
                vec!["Content-Type: application/json".into()],
                body.into_bytes(),
            )
        } else if let Some(name) = path.strip_prefix(&resolve) {
            match std::fs::read(dir.join(name)) {
                Ok(data) => {
                    let size = data.len() as u64;
                    let a = range_start.unwrap_or(0).min(size);
                    let b = range_end.map(|e| e + 1).unwrap_or(size).min(size);
                    let etag = format!("\"etag-{}-{size}\"", name.replace('.', "-"));
                    let hdrs = vec![
                        format!("ETag: {etag}"),
                        format!("X-Repo-Commit: {COMMIT}"),
                        format!("Content-Range: bytes {a}-{}/{size}", b.saturating_sub(1)),
                    ];
                    (
                        "206 Partial Content",
                        hdrs,
                        data[a as usize..b as usize].to_vec(),
                    )
                }
                Err(_) => ("404 Not Found", vec![], b"not found".to_vec()),
            }
        } else {
            ("404 Not Found", vec![], b"not found".to_vec())
        };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        resp.push_str(&h);
        resp.push_str("\r\n");
    }
    resp.push_str("\r\n");
    let _ = stream.write_all(resp.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    let mut sink = [0u8; 1];
    let _ = stream.read(&mut sink);
}
