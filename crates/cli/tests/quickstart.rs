//! scripts/quickstart.sh end to end on tiny fixtures: the same script the README's first
//! command runs, with the real SmolLM2 GGUF and Alpaca demo set swapped for the tiny GGUF
//! fixture and a generated 30-record file.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[test]
fn quickstart_script_runs_every_stage() {
    let root = scratch("quickstart");
    let data = root.join("demo.json");
    let recs: Vec<String> = (0..30)
        .map(|i| {
            format!(
                r#"{{"instruction": "What is {i} plus one?", "input": "", "output": "{}."}}"#,
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, format!("[{}]", recs.join(","))).unwrap();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_finetune-lora"))
        .parent()
        .unwrap()
        .to_path_buf();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/quickstart.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--max-iters", "8"])
        .env("LORATUNE_BIN", &bin_dir)
        .env("LORATUNE_WORKDIR", root.join("work"))
        .env(
            "LORATUNE_SMOLLM2_GGUF",
            fixtures().join("gguf/tiny-llama.gguf"),
        )
        .env("LORATUNE_ALPACA_DEMO", &data)
        .env("QS_VAL", "5")
        .env("QS_MAX_NEW", "8")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{stderr}"
    );
    for want in [
        "== importing the GGUF",
        "imported 17 tensors",
        "== preparing the data",
        "train:      25 samples",
        "step 0: val loss",
        "finished after 4 steps",
        "val loss",
        "--- loratune (finetuned) ---",
        "--- reference ---",
        "time to first token",
    ] {
        assert!(
            stdout.contains(want),
            "quickstart output lacks {want:?}:\n{stdout}"
        );
    }
    let work = root.join("work");
    assert!(work
        .join("out/lora/quickstart/lit_model_lora_finetuned.safetensors")
        .is_file());
    assert!(work
        .join("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/lit_config.json")
        .is_file());
}
