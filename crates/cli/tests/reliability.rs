//! What loratune promises about a user's files, end to end on the real binaries: one run per
//! out-dir, no run mixed into another's files, checkpoints that resume only with the state
//! they were saved with, the newest valid checkpoint found past broken ones, temporary files
//! of killed writes cleaned up, clean failures under a file-size limit and a closed stdout,
//! files readable by others, and base models checked against the adapter.
//! (Refusals of bad input are in hostile.rs; signals in finetune.rs.)

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const PREPARE: &str = env!("CARGO_BIN_EXE_prepare-alpaca");
const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");
const CHAT: &str = env!("CARGO_BIN_EXE_chat");
const MERGE: &str = env!("CARGO_BIN_EXE_merge-lora");
const EXPORT: &str = env!("CARGO_BIN_EXE_export");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A converted tiny checkpoint and a 12-record dataset for it.
fn setup(test: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = scratch(test);
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", s(&ck)]).ok);
    let recs: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "output": "{i} {i} {i}"}}"#))
        .collect();
    std::fs::write(root.join("data.json"), format!("[{}]", recs.join(","))).unwrap();
    let ds = root.join("ds");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            s(&ck),
            "--data-file",
            s(&root.join("data.json")),
            "--destination-path",
            s(&ds),
            "--test-split-size",
            "2",
            "--prompt-style",
            "plain",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    (root, ck, ds)
}

fn finetune(ck: &Path, ds: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--checkpoint-dir",
        s(ck),
        "--data-dir",
        s(ds),
        "--out-dir",
        s(out),
        "--quiet",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--eval-iters",
        "1",
        "--eval-interval",
        "1000",
        "--save-interval",
        "1",
        "--lora-r",
        "2",
    ];
    args.extend_from_slice(extra);
    run(FINETUNE, &args)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn state_run_id(out: &Path, step: u64) -> String {
    let ckpt = loratune_train::checkpoint::ckpt_path(out, step);
    let loaded = loratune_train::checkpoint::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    loaded.state.run_id
}

/// The pid of a process that has exited (its temp files are stale).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_new_run_never_mixes_with_an_earlier_one() {
    let (root, ck, ds) = setup("rel-mix");
    let out = root.join("out");
    assert!(finetune(&ck, &ds, &out, &["--max-iters", "4"]).ok);
    let first: Vec<_> = metrics(&out);
    let run_a = first[0]["run_id"].as_str().unwrap().to_string();
    assert!(first.iter().all(|m| m["run_id"] == run_a.as_str()));
    // The run id is in every checkpoint, state file and the final adapter.
    let (meta, _) = loratune_model::adapter::load_adapter(
        &out.join("lit_model_lora_finetuned.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(meta.run_id.as_deref(), Some(run_a.as_str()));
    assert_eq!(state_run_id(&out, 2), run_a);

    // Without --resume or --overwrite the folder is refused, untouched.
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let r = finetune(&ck, &ds, &out, &["--max-iters", "2"]);
    assert!(
        !r.ok && r.stderr.contains("already holds") && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);

    // --overwrite starts over: the old checkpoints and metrics go, a user's file stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = finetune(&ck, &ds, &out, &["--max-iters", "2", "--overwrite"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("deleted the earlier run's"),
        "{}",
        r.stderr
    );
    assert_eq!(loratune_train::checkpoint::list(&out), vec![1, 2]);
    let second = metrics(&out);
    assert_eq!(second.len(), 2);
    assert_ne!(second[0]["run_id"], run_a.as_str());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(
        !out.join(".loratune.lock").exists(),
        "the lock note goes with the run"
    );
}

#[test]
fn two_runs_in_one_out_dir_are_refused_naming_the_holder() {
    let (root, ck, ds) = setup("rel-lock");
    let out = root.join("out");
    let mut a = Command::new(FINETUNE)
        .args([
            "--checkpoint-dir",
            s(&ck),
            "--data-dir",
            s(&ds),
            "--out-dir",
            s(&out),
            "--quiet",
            "--max-iters",
            "100000",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--eval-interval",
            "100000",
            "--save-interval",
            "100000",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !out.join("metrics.jsonl").exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = finetune(&ck, &ds, &out, &["--max-iters", "2", "--resume", "auto"]);
    let _ = Command::new("kill")
        .args(["-TERM", &a.id().to_string()])
        .status();
    a.wait().unwrap();
    assert!(
        !r.ok
            && r.stderr
                .contains(&format!("in use by finetune-lora (pid {}", a.id())),
        "{}",
        r.stderr
    );
}

#[test]
fn resume_takes_the_newest_valid_pair_and_refuses_mixed_up_ones() {
    let (root, ck, ds) = setup("rel-pairs");
    let out = root.join("out");
    assert!(finetune(&ck, &ds, &out, &["--max-iters", "4"]).ok);
    assert_eq!(loratune_train::checkpoint::list(&out), vec![1, 2, 3, 4]);
    // Step 2's state copied over step 4's: that pair is refused by name...
    std::fs::copy(
        loratune_train::checkpoint::state_path(&out, 2),
        loratune_train::checkpoint::state_path(&out, 4),
    )
    .unwrap();
    let ckpt4 = loratune_train::checkpoint::ckpt_path(&out, 4);
    let r = finetune(
        &ck,
        &ds,
        &out,
        &["--max-iters", "10", "--resume", s(&ckpt4)],
    );
    assert!(
        !r.ok && r.stderr.contains("does not belong to") && r.stderr.contains("state of step 2"),
        "{}",
        r.stderr
    );
    // ...and skipped by --resume auto, which says so and takes step 3.
    // A state file from another run with the right step is refused too.
    let other = root.join("other");
    assert!(finetune(&ck, &ds, &other, &["--max-iters", "6"]).ok);
    std::fs::copy(
        loratune_train::checkpoint::state_path(&other, 3),
        loratune_train::checkpoint::state_path(&out, 3),
    )
    .unwrap();
    // And a corrupt newest checkpoint file.
    let ckpt2 = loratune_train::checkpoint::ckpt_path(&out, 2);
    let bytes = std::fs::read(&ckpt2).unwrap();
    std::fs::write(&ckpt2, &bytes[..bytes.len() / 2]).unwrap();
    let r = finetune(&ck, &ds, &out, &["--max-iters", "6", "--resume", "auto"]);
    assert!(r.ok, "{}", r.stderr);
    for (step, why) in [
        (4, "state of step 2"),
        (3, "from run"),
        (2, "iter-000002-ckpt.safetensors"),
    ] {
        let line = r
            .stderr
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "skipping {}",
                    s(&loratune_train::checkpoint::ckpt_path(&out, step))
                ))
            })
            .unwrap_or_else(|| panic!("step {step} not skipped:\n{}", r.stderr));
        assert!(line.contains(why), "{line}");
    }
    assert!(r.stderr.contains("(step 1)"), "{}", r.stderr);
    // The metrics now describe one history: each step once, step 1 from before the resume.
    let m = metrics(&out);
    let steps: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}

#[test]
fn stale_temporary_files_are_removed_on_the_next_run() {
    let (root, ck, ds) = setup("rel-temps");
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let pid = dead_pid();
    let stale = [
        out.join(format!(".iter-000002-ckpt.safetensors.tmp-{pid}")),
        out.join(format!(".lit_model_lora_finetuned.safetensors.tmp-{pid}")),
    ];
    for p in &stale {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
    }
    let r = finetune(&ck, &ds, &out, &["--max-iters", "2", "--resume", "auto"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("removed 2 temporary file(s)"),
        "{}",
        r.stderr
    );
    assert!(stale.iter().all(|p| !p.exists()));
    // The same in a checkpoint folder (a killed import leaves a big one there).
    let t = ck.join(format!(".lit_model.safetensors.tmp-{pid}"));
    std::fs::write(&t, b"half a model").unwrap();
    let r = run(CONVERT, &["--checkpoint-dir", s(&ck)]);
    assert!(r.ok && !t.exists(), "{}", r.stderr);
    assert!(
        r.stderr.contains("removed 1 temporary file(s)"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_file_size_limit_is_a_clean_error_without_leftovers() {
    let (root, ck, ds) = setup("rel-ulimit");
    let out = root.join("out");
    // 64 KiB: the metrics and hparams fit, a checkpoint with every target does not.
    let cmd = format!(
        "ulimit -f 64; exec {FINETUNE} --checkpoint-dir {} --data-dir {} --out-dir {} --quiet \
         --max-iters 2 --batch-size 2 --micro-batch-size 2 --eval-iters 1 --lora-r 32 \
         --lora-key --lora-projection --lora-mlp --lora-head --save-interval 1",
        s(&ck),
        s(&ds),
        s(&out)
    );
    let o = Command::new("bash")
        .args(["-c", &cmd])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: ")
            && stderr.contains("File too large")
            && stderr.contains(".safetensors"),
        "{stderr}"
    );
    assert!(
        temp_leftovers(&out).is_empty(),
        "{:?}",
        temp_leftovers(&out)
    );
}

#[test]
fn a_diverged_run_says_whether_a_checkpoint_was_kept() {
    let (root, ck, ds) = setup("rel-nan");
    let r = finetune(
        &ck,
        &ds,
        &root.join("out"),
        &[
            "--max-iters",
            "20",
            "--learning-rate",
            "1e30",
            "--save-interval",
            "1000",
            "--lora-dropout",
            "0",
        ],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("loss is") && r.stderr.contains("before any checkpoint was saved"),
        "{}",
        r.stderr
    );
}

/// What loratune writes is readable by others under the usual umask, like any other file.
#[test]
#[cfg(unix)]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let (root, ck, ds) = setup("rel-modes");
    let out = root.join("out");
    let sh = |cmd: String| {
        let o = Command::new("bash")
            .args(["-c", &format!("umask 022; exec {cmd}")])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    sh(format!(
        "{FINETUNE} --checkpoint-dir {} --data-dir {} --out-dir {} --quiet --max-iters 2 \
         --batch-size 2 --micro-batch-size 2 --eval-iters 1 --save-interval 1",
        s(&ck),
        s(&ds),
        s(&out)
    ));
    let adapter = out.join("lit_model_lora_finetuned.safetensors");
    sh(format!(
        "{MERGE} --checkpoint-dir {} --lora-path {} --out-dir {}",
        s(&ck),
        s(&adapter),
        s(&root.join("merged"))
    ));
    sh(format!(
        "{EXPORT} --format peft --checkpoint-dir {} --lora-path {} --out-dir {}",
        s(&ck),
        s(&adapter),
        s(&root.join("peft"))
    ));
    for p in [
        adapter.clone(),
        out.join("iter-000001-ckpt.safetensors"),
        out.join("iter-000001-state.safetensors"),
        out.join("metrics.jsonl"),
        root.join("merged/lit_model.safetensors"),
        root.join("merged/tokenizer.json"),
        root.join("peft/adapter_model.safetensors"),
        ck.join("lit_model.safetensors"),
        ds.join("train.safetensors"),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{} has mode {mode:o}", p.display());
    }
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let (root, ck, ds) = setup("rel-pipe");
    let out = root.join("out");
    assert!(finetune(&ck, &ds, &out, &["--max-iters", "2"]).ok);
    let adapter = out.join("lit_model_lora_finetuned.safetensors");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            GENERATE,
            vec![
                "--checkpoint-dir",
                s(&ck),
                "--num-samples",
                "50",
                "--max-new-tokens",
                "20",
                "--prompt-style",
                "plain",
                "--prompt",
                "Say 1.",
            ],
        ),
        (
            GENERATE_LORA,
            vec![
                "--checkpoint-dir",
                s(&ck),
                "--lora-path",
                s(&adapter),
                "--num-samples",
                "50",
                "--max-new-tokens",
                "20",
                "--prompt-style",
                "plain",
                "--prompt",
                "Say 1.",
            ],
        ),
    ];
    for (bin, args) in cases {
        let mut child = Command::new(bin)
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        stdout.read_exact(&mut one).unwrap();
        drop(stdout); // `| head -c 1`
        let t = Instant::now();
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{bin}: {stderr}");
        assert_eq!(o.status.code(), Some(0), "{bin}: {stderr}");
        // It stopped instead of generating 50 samples for nobody.
        assert!(
            stderr.matches(" tokens; time to first token").count() < 50,
            "{stderr}"
        );
        assert!(t.elapsed() < Duration::from_secs(60));
    }
    // A command whose job is files finishes it even when nobody reads its report.
    let ds2 = root.join("ds2");
    let mut child = Command::new(PREPARE)
        .args([
            "--checkpoint-dir",
            s(&ck),
            "--data-file",
            s(&root.join("data.json")),
            "--destination-path",
            s(&ds2),
            "--test-split-size",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(ds2.join("meta.json").is_file());
}

#[test]
fn an_adapter_on_changed_base_weights_needs_force() {
    let (root, ck, ds) = setup("rel-base");
    let out = root.join("out");
    assert!(finetune(&ck, &ds, &out, &["--max-iters", "2"]).ok);
    let adapter = out.join("lit_model_lora_finetuned.safetensors");
    let changed = root.join("changed");
    copy_dir(&ck, &changed);
    let w = changed.join("lit_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let args = |force: bool| {
        let mut a = vec![
            "--checkpoint-dir",
            s(&changed),
            "--lora-path",
            s(&adapter),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--prompt-style",
            "plain",
        ];
        if force {
            a.push("--force");
        }
        a
    };
    let r = run(GENERATE_LORA, &args(false));
    assert!(!r.ok && r.stderr.contains("--force"), "{}", r.stderr);
    let r = run(GENERATE_LORA, &args(true));
    assert!(r.ok, "{}", r.stderr);
    let warning = r.stderr.lines().next().unwrap();
    assert!(
        warning.starts_with("warning:") && warning.matches("sha256").count() == 2,
        "{warning}"
    );
}

#[test]
fn a_huge_block_size_costs_only_what_generation_needs() {
    let (root, ck, _) = setup("rel-block");
    let big = root.join("big");
    copy_dir(&ck, &big);
    let text = std::fs::read_to_string(big.join("lit_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["block_size"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(big.join("lit_config.json"), v.to_string()).unwrap();
    // (block_size 1e12 is refused: see hostile.rs.) A 1e9-position context must not be
    // allocated for an 8-token answer.
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            s(&big),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--prompt-style",
            "plain",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let rss: f64 = r
        .stderr
        .split("peak RSS ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(rss < 500.0, "peak RSS {rss} MiB for a tiny model");
}

#[test]
fn chat_survives_a_line_that_is_not_utf8() {
    let (_, ck, _) = setup("rel-chat");
    let mut child = Command::new(CHAT)
        .args([
            "--checkpoint-dir",
            s(&ck),
            "--prompt-style",
            "plain",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\xff\xfe broken\nhello\n/exit\n").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("not UTF-8 text; it was ignored"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches(" tokens; time to first token").count(),
        1,
        "the next line is answered: {stderr}"
    );
}

#[test]
fn prepare_reports_what_it_skipped_repeated_and_cut() {
    let (root, ck, _) = setup("rel-prepare");
    // A malformed JSON Lines line is skipped with --skip-invalid, like any invalid record.
    let jsonl = root.join("d.jsonl");
    let mut lines: Vec<String> = (0..6)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "output": "{i}"}}"#))
        .collect();
    lines.insert(2, "{\"instruction\": \"cut off".into());
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let prep = |data: &Path, dest: &str, extra: &[&str]| {
        let mut a = vec![
            "--checkpoint-dir",
            s(&ck),
            "--data-file",
            s(data),
            "--test-split-size",
            "2",
        ];
        let dest = root.join(dest);
        let dest = dest.to_str().unwrap().to_string();
        a.push("--destination-path");
        let mut owned: Vec<String> = a.iter().map(|x| x.to_string()).collect();
        owned.push(dest);
        owned.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        run(PREPARE, &refs)
    };
    let r = prep(&jsonl, "a", &[]);
    assert!(!r.ok && r.stderr.contains("line 3"), "{}", r.stderr);
    let r = prep(&jsonl, "a", &["--skip-invalid"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("skipped 1 invalid record(s)")
            && r.stdout.contains("record 3: invalid JSON at line 3"),
        "{}",
        r.stdout
    );

    // A key given twice: the last value wins, and it is said once.
    let dup = root.join("dup.json");
    let recs: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "output": "first", "output": "second"}}"#))
        .collect();
    std::fs::write(&dup, format!("[{}]", recs.join(","))).unwrap();
    let r = prep(&dup, "b", &["--prompt-style", "plain"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("give a key twice").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("4 record(s)") && r.stderr.contains("\"output\""),
        "{}",
        r.stderr
    );
    let val = std::fs::read_to_string(root.join("b/val.json")).unwrap();
    assert!(val.contains("second") && !val.contains("first"), "{val}");

    // Masked prompts cut before their answer: said, not just counted as truncated.
    let long = root.join("long.json");
    let recs: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"instruction": "{} {i}", "output": "yes"}}"#,
                "please answer this long question".repeat(3)
            )
        })
        .collect();
    std::fs::write(&long, format!("[{}]", recs.join(","))).unwrap();
    let r = prep(
        &long,
        "c",
        &[
            "--mask-inputs",
            "--max-seq-length",
            "8",
            "--prompt-style",
            "alpaca",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains(
            "6 of them have no response token left (with --mask-inputs they train only on EOS)"
        ),
        "{}",
        r.stdout
    );
}

#[test]
fn non_finite_weights_are_an_error_not_an_empty_answer() {
    let (root, ck, _) = setup("rel-nanbase");
    let bad = root.join("bad");
    copy_dir(&ck, &bad);
    let w = bad.join("lit_model.safetensors");
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        candle_core::safetensors::load(&w, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    for (name, t) in tensors.iter_mut() {
        if name == "transformer.ln_f.weight" {
            *t = (&*t * f64::NAN).unwrap();
        }
    }
    loratune_model::weights::save_safetensors(&w, &tensors, None).unwrap();
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            s(&bad),
            "--prompt-style",
            "plain",
            "--max-new-tokens",
            "4",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("logits are NaN"), "{}", r.stderr);
}
