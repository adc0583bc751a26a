//! download against a local server that speaks the Hub's URL layout
//! (`/api/models/<repo>/revision/main`, `/<repo>/resolve/main/<file>` with Range requests),
//! started on 127.0.0.1 by the test: the real hf-hub client fetches a tiny model and the
//! result converts; an unreachable hub gives one sentence that names convert-hf-checkpoint.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;

const DOWNLOAD: &str = env!("CARGO_BIN_EXE_download");
const REPO: &str = "tiny-org/tiny-neox";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves the files of `dir` as the model REPO; records the request paths.
fn serve(dir: PathBuf) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            let log = log2.clone();
            std::thread::spawn(move || handle(stream, &dir, &log));
        }
    });
    (port, log)
}

fn handle(mut stream: TcpStream, dir: &std::path::Path, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start: Option<u64> = None;
    let mut range_end: Option<u64> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
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
    let api = format!("/api/models/{REPO}/revision/main");
    let resolve = format!("/{REPO}/resolve/main/");
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path == api {
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

fn download(args: &[&str], endpoint: &str, hf_home: &std::path::Path) -> Run {
    let out = std::process::Command::new(DOWNLOAD)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let r = Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r
}

#[test]
fn downloads_from_a_hub_layout_and_converts() {
    let root = scratch("download");
    let served = root.join("served");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &served);
    std::fs::remove_file(served.join("oracle.safetensors")).unwrap();
    let (port, log) = serve(served);
    let ck = root.join("checkpoints");
    let r = download(
        &["--repo-id", REPO, "--checkpoint-dir", ck.to_str().unwrap()],
        &format!("http://127.0.0.1:{port}"),
        &root.join("hf-home"),
    );
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("revision {COMMIT}")),
        "{}",
        r.stdout
    );
    let dir = ck.join(REPO);
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "lit_model.safetensors",
        "lit_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(hf_fixture("neox_parallel_rot025").join("model.safetensors")).unwrap()
    );
    let paths = log.lock().unwrap().clone();
    assert!(
        paths.iter().any(|p| p.contains("/api/models/")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("/resolve/main/model.safetensors")),
        "{paths:?}"
    );
}

#[test]
fn unreachable_hub_is_one_sentence_and_list_works() {
    let root = scratch("download-offline");
    let r = download(
        &[
            "--repo-id",
            REPO,
            "--checkpoint-dir",
            root.join("ck").to_str().unwrap(),
        ],
        "http://127.0.0.1:9",
        &root.join("hf-home"),
    );
    assert_eq!(r.code, Some(1));
    let msg = r.stderr.trim();
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(
        msg.contains("could not reach the Hugging Face Hub")
            && msg.contains("convert-hf-checkpoint"),
        "{msg}"
    );
    let r = download(&["--list"], "http://127.0.0.1:9", &root.join("hf-home"));
    assert!(
        r.ok && r.stdout.contains("EleutherAI/pythia-160m")
            && r.stdout.contains("HuggingFaceTB/SmolLM2-135M-Instruct")
    );
}

/// The quickstart's `--repo-id` path: the same script, with the model from the (local) hub.
#[test]
fn quickstart_takes_a_repo_id() {
    let root = scratch("download-quickstart");
    let served = root.join("served");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &served);
    let (port, _) = serve(served);
    let data = root.join("demo.json");
    let recs: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"instruction": "Echo {i}.", "input": "", "output": "{i}"}}"#))
        .collect();
    std::fs::write(&data, format!("[{}]", recs.join(","))).unwrap();
    let bin_dir = PathBuf::from(DOWNLOAD).parent().unwrap().to_path_buf();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/quickstart.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["--max-iters", "4", "--repo-id", REPO])
        .env("LORATUNE_BIN", &bin_dir)
        .env("LORATUNE_WORKDIR", root.join("work"))
        .env("LORATUNE_SMOLLM2_GGUF", "unused")
        .env("LORATUNE_ALPACA_DEMO", &data)
        .env("QS_VAL", "4")
        .env("QS_MAX_NEW", "8")
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("HF_HOME", root.join("hf-home"))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("== downloading tiny-org/tiny-neox")
            && stdout.contains("--- reference ---"),
        "{stdout}"
    );
}
