//! Every command in README.md's shell blocks runs, as written, in a scratch folder: a tiny
//! GPT-NeoX fixture stands in for EleutherAI/pythia-160m (served by a local Hub-layout server
//! for `download`), the tiny GGUF fixture for the SmolLM2 file, and a small Alpaca file is
//! already in `data/alpaca/`. Flags that only make the run short (fewer iterations, fewer
//! tokens) are appended after the README's own (commands take a repeated flag's last value).
//! A README command this test does not know fails it; commands run elsewhere are listed with
//! where they run.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Commands that are run by another test or by .ci/run.
const ELSEWHERE: &[(&str, &str)] = &[
    ("scripts/quickstart.sh", "crates/cli/tests/quickstart.rs"),
    (
        "RAYON_NUM_THREADS=1 cargo test --release --workspace",
        ".ci/run",
    ),
    ("cargo build --release", "cargo test builds these binaries"),
    ("scripts/build-cuda.sh --check", ".ci/run"),
];

/// Appended to a command (by its program) to keep the run short on the tiny model.
fn short(program: &str) -> &'static [&'static str] {
    match program {
        "prepare-alpaca" => &["--test-split-size", "4"],
        // The stand-in for SmolLM2 has a 64-token context and no chat template: Alpaca-style
        // conversations would not fit it.
        "prepare" => &["--test-split-size", "4", "--prompt-style", "none"],
        "finetune-lora" => &[
            "--max-iters",
            "4",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--eval-iters",
            "1",
            "--warmup-steps",
            "1",
        ],
        "generate" | "generate-lora" | "chat" => &["--max-new-tokens", "5"],
        _ => &[],
    }
}

/// The shell commands of README.md: each ```bash block, continuation lines joined.
fn readme_commands() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = line.trim() == "```bash";
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
        } else {
            pending.push_str(line);
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

/// Splits a README command into words (double quotes group).
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmd.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn bin(program: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_loratune"))
        .parent()
        .unwrap()
        .to_path_buf();
    let p = dir.join(program);
    p.is_file().then_some(p)
}

#[test]
fn every_readme_command_runs() {
    let root = scratch("readme");
    // EleutherAI/pythia-160m on a local hub: the GPT-NeoX fixture, with a context long enough
    // for Alpaca prompts (rotary positions have no learned table, so only the config changes).
    let served = root.join("served");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &served);
    std::fs::remove_file(served.join("oracle.safetensors")).unwrap();
    let cfg_path = served.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 512.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (port, _) = serve_hub(served, "EleutherAI/pythia-160m");
    // The GGUF file and the data the README names.
    std::fs::copy(
        fixtures().join("gguf/tiny-llama.gguf"),
        root.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let records: Vec<String> = (0..24)
        .map(|i| {
            format!(
                r#"{{"instruction": "Count to {n}.", "input": "{}", "output": "{}"}}"#,
                if i % 3 == 0 { "slowly" } else { "" },
                (1..=i % 6 + 2)
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                n = i % 6 + 2
            )
        })
        .collect();
    let data = format!("[{}]", records.join(","));
    std::fs::create_dir_all(root.join("data/alpaca")).unwrap();
    std::fs::write(
        root.join("data/alpaca/alpaca_data_cleaned_archive.json"),
        &data,
    )
    .unwrap();
    std::fs::write(root.join("mydata.json"), &data).unwrap();
    let chats: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Count to {n}."}}, {{"role": "assistant", "content": "{}"}}, {{"role": "user", "content": "Again."}}, {{"role": "assistant", "content": "Done."}}]}}"#,
                (1..=i % 6 + 2)
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                n = i % 6 + 2
            )
        })
        .collect();
    std::fs::write(root.join("chats.jsonl"), chats.join("\n")).unwrap();

    let commands = readme_commands();
    assert!(
        commands.len() >= 15,
        "README has only {} commands?",
        commands.len()
    );
    let mut ran = Vec::new();
    for cmd in &commands {
        if let Some((_, where_)) = ELSEWHERE
            .iter()
            .find(|(c, _)| cmd == c || cmd.starts_with(&format!("{c} ")))
        {
            eprintln!("(run by {where_}) {cmd}");
            continue;
        }
        let w = words(cmd);
        let program = w[0].as_str();
        let exe = bin(program).unwrap_or_else(|| {
            panic!("README command {cmd:?}: {program} is neither a loratune binary nor known to run elsewhere")
        });
        let mut args: Vec<&str> = w[1..].iter().map(String::as_str).collect();
        if !cmd.contains("--test-split-fraction") {
            args.extend_from_slice(short(program));
        }
        let out = std::process::Command::new(&exe)
            .args(&args)
            .current_dir(&root)
            .env("RAYON_NUM_THREADS", "1")
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("HF_HOME", root.join("hf-home"))
            .env_remove("HF_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "README command failed: {cmd}\n{stderr}"
        );
        ran.push(program.to_string());
    }
    for needed in [
        "convert-hf-checkpoint",
        "download",
        "prepare-alpaca",
        "finetune-lora",
        "generate-lora",
        "chat",
        "merge-lora",
        "generate",
        "export",
    ] {
        assert!(
            ran.iter().any(|r| r == needed),
            "no README command ran {needed}"
        );
    }
    // What the commands were meant to produce.
    for f in [
        "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/lit_model.safetensors",
        "checkpoints/EleutherAI/pythia-160m/lit_model.safetensors",
        "data/alpaca/train.safetensors",
        "data/mydata/val.safetensors",
        "data/chats/train.safetensors",
        "out/lora/alpaca/lit_model_lora_finetuned.safetensors",
        "out/merged/lit_model.safetensors",
        "out/hf/model.safetensors",
        "out/hf/config.json",
        "out/peft/adapter_model.safetensors",
        "out/peft/adapter_config.json",
        "out/lora/chats/lit_model_lora_finetuned.safetensors",
        "out/gguf/model.gguf",
        "out/gguf-lora/lora.gguf",
    ] {
        assert!(
            root.join(f).is_file(),
            "README workflow did not produce {f}"
        );
    }
}
