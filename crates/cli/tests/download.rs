//! download against a local server that speaks the Hub's URL layout
//! (`/api/models/<repo>/revision/main`, `/<repo>/resolve/main/<file>` with Range requests),
//! started on 127.0.0.1 by the test: the real hf-hub client fetches a tiny model and the
//! result converts; an unreachable hub gives one sentence that names convert-hf-checkpoint.

mod common;

use std::path::PathBuf;

use common::*;

const DOWNLOAD: &str = env!("CARGO_BIN_EXE_download");
const REPO: &str = "tiny-org/tiny-neox";

fn download(args: &[&str], endpoint: &str, hf_home: &std::path::Path) -> Run {
    let out = std::process::Command::new(DOWNLOAD)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    finish(DOWNLOAD, out)
}

#[test]
fn downloads_from_a_hub_layout_and_converts() {
    let root = scratch("download");
    let served = root.join("served");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &served);
    std::fs::remove_file(served.join("oracle.safetensors")).unwrap();
    let (port, log) = serve_hub(served, REPO);
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

/// Today's families download and convert too; a gated repo without a token says how to get
/// access, and with one it downloads.
#[test]
fn gated_and_modern_models() {
    let root = scratch("download-gated");
    let served = root.join("served");
    copy_dir(&hf_fixture("qwen3_qknorm"), &served);
    std::fs::remove_file(served.join("oracle.safetensors")).unwrap();
    let repo = "gated-org/tiny-qwen3";
    let (port, _) = serve_hub(served, repo);
    let endpoint = format!("http://127.0.0.1:{port}");
    let ck = root.join("checkpoints");
    let args = ["--repo-id", repo, "--checkpoint-dir", ck.to_str().unwrap()];
    let r = download(&args, &endpoint, &root.join("hf-home"));
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    let msg = r.stderr.trim();
    assert!(
        msg.lines().count() == 1
            && msg.contains("is gated or private")
            && msg.contains("--access-token"),
        "{msg}"
    );
    let mut with_token = args.to_vec();
    with_token.extend(["--access-token", "hf_test"]);
    let r = download(&with_token, &endpoint, &root.join("hf-home"));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ck.join(repo).join("lit_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["hf_architecture"], "Qwen3ForCausalLM");
    assert_eq!(cfg["qk_norm"], "per_head");
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
    let (port, _) = serve_hub(served, REPO);
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
        // The tiny model's context (64) is shorter than an Alpaca prompt: with masked
        // prompts nothing would be left to train on (finetune-lora refuses that).
        .env("QS_STYLE", "plain")
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
