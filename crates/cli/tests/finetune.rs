//! finetune-lora end to end on the tiny fixture model: it learns, resumes bit for bit,
//! survives kill -9 and Ctrl-C, writes its metrics, and refuses bad settings clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use loratune_model::adapter::load_adapter;

const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const PREPARE: &str = env!("CARGO_BIN_EXE_prepare-alpaca");
const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");

/// A converted fixture checkpoint and a 16-record dataset prepared from it.
fn setup(test: &str, fixture: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = scratch(test);
    let ck = root.join("ck");
    copy_dir(&hf_fixture(fixture), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", ck.to_str().unwrap()]).ok);
    let records: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"instruction": "Count to {n}.", "input": "", "output": "{}"}}"#,
                (1..=(i % 5 + 2))
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                n = i % 5 + 2
            )
        })
        .collect();
    let data = root.join("data.json");
    std::fs::write(&data, format!("[{}]", records.join(","))).unwrap();
    let ds = root.join("ds");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-file",
            data.to_str().unwrap(),
            "--destination-path",
            ds.to_str().unwrap(),
            "--test-split-size",
            "4",
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
        ck.to_str().unwrap(),
        "--data-dir",
        ds.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--quiet",
        "--warmup-steps",
        "1",
    ];
    args.extend_from_slice(extra);
    run(FINETUNE, &args)
}

/// A run's hparams.json.
fn hparams(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("hparams.json")).unwrap()).unwrap()
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn overfits_a_small_dataset_and_writes_metrics() {
    let (root, ck, ds) = setup("ft-overfit", "neox_parallel_rot025");
    let out = root.join("out");
    let r = finetune(
        &ck,
        &ds,
        &out,
        &[
            "--batch-size",
            "16",
            "--micro-batch-size",
            "4",
            "--max-iters",
            "640",
            "--learning-rate",
            "1e-2",
            "--lora-dropout",
            "0",
            "--lora-key",
            "--lora-projection",
            "--lora-mlp",
            "--eval-interval",
            "20",
            "--eval-iters",
            "1",
            "--save-interval",
            "30",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let m = metrics(&out);
    assert_eq!(m.len(), 160, "one line per step");
    let first = m[0]["loss"].as_f64().unwrap();
    // Mean of the last 10 steps: single steps of a 16-example overfit are noisy.
    let last = m[150..]
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 10.0;
    assert!(
        last < 0.1 * first,
        "loss {first} -> {last}: should fall below 10% of its start"
    );
    for key in [
        "step",
        "iter",
        "loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "peak_rss_mib",
    ] {
        assert!(m[10].get(key).is_some(), "metrics line lacks {key}");
    }
    assert!(m[19]["val_loss"].as_f64().is_some() && m[18]["val_loss"].is_null());
    eprintln!("overfit: loss {first} -> {last}");
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("<circle"));
    let hp = hparams(&out);
    assert_eq!(hp["args"]["learning_rate"], 1e-2);
    assert_eq!(hp["accumulation"], 4);
    let (meta, tensors) = load_adapter(
        &out.join("lit_model_lora_finetuned.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        (meta.step, meta.lora.r, meta.lora.targets.key),
        (160, 8, true)
    );
    assert_eq!(tensors.len(), 2 * 2 * (3 + 1 + 2));
    assert!(
        r.stdout.contains("finished after 160 steps"),
        "{}",
        r.stdout
    );
}

fn adapter_bytes(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (_, t) = load_adapter(path, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_gives_the_same_weights_bit_for_bit() {
    let (root, ck, ds) = setup("ft-resume", "llama_gqa_tied");
    let common = [
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--save-interval",
        "3",
        "--eval-interval",
        "100",
        "--eval-iters",
        "1",
        "--lora-dropout",
        "0.1",
    ];
    let straight = root.join("straight");
    let mut args = common.to_vec();
    args.extend(["--max-iters", "16"]);
    assert!(finetune(&ck, &ds, &straight, &args).ok);

    let split = root.join("split");
    let mut first = common.to_vec();
    first.extend(["--max-iters", "6"]);
    assert!(finetune(&ck, &ds, &split, &first).ok);
    let mut second = common.to_vec();
    second.extend(["--max-iters", "16", "--resume", "auto"]);
    let r = finetune(&ck, &ds, &split, &second);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("resumed from") && r.stderr.contains("(step 3)"),
        "{}",
        r.stderr
    );
    let a = adapter_bytes(&straight.join("lit_model_lora_finetuned.safetensors"));
    let b = adapter_bytes(&split.join("lit_model_lora_finetuned.safetensors"));
    assert!(
        a == b,
        "3 steps + resume + 5 steps must equal 8 steps exactly"
    );

    // Another LoRA setting is refused, naming the difference.
    let mut other = common.to_vec();
    other.extend(["--max-iters", "20", "--resume", "auto", "--lora-r", "4"]);
    let r = finetune(&ck, &ds, &split, &other);
    assert!(
        !r.ok && r.stderr.contains("cannot resume") && r.stderr.contains("trained with LoRA r 8"),
        "{}",
        r.stderr
    );
}

#[test]
fn kill_9_at_any_moment_leaves_a_loadable_checkpoint() {
    let (root, ck, ds) = setup("ft-kill", "neox_parallel_rot025");
    let out = root.join("out");
    for (round, delay_ms) in [150u64, 400, 700, 1000].into_iter().enumerate() {
        let mut child = Command::new(FINETUNE)
            .args([
                "--checkpoint-dir",
                ck.to_str().unwrap(),
                "--data-dir",
                ds.to_str().unwrap(),
                "--out-dir",
                out.to_str().unwrap(),
                "--quiet",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "4",
                "--max-iters",
                "100000",
                "--save-interval",
                "1",
                "--eval-interval",
                "100000",
                "--resume",
                "auto",
                "--keep-last",
                "3",
            ])
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let steps = loratune_train::checkpoint::list(&out);
        assert!(
            !steps.is_empty(),
            "round {round}: no checkpoint after {delay_ms} ms"
        );
        assert!(
            steps.len() <= 4,
            "--keep-last 3 keeps few checkpoints: {steps:?}"
        );
        for s in steps {
            let p = loratune_train::checkpoint::ckpt_path(&out, s);
            loratune_train::checkpoint::load(&p, &Device::Cpu)
                .unwrap_or_else(|e| panic!("round {round}: {} does not load: {e}", p.display()));
        }
    }
}

/// Ctrl-C (SIGINT) and SIGTERM (kill, timeout, Slurm, Kubernetes) both finish the step,
/// save it, and exit 128 + the signal's number so that scripts can tell.
#[test]
fn ctrl_c_and_sigterm_save_and_exit_with_the_signal_status() {
    let (root, ck, ds) = setup("ft-ctrlc", "neox_parallel_rot025");
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let out = root.join(format!("out-{signal}"));
        let child = Command::new(FINETUNE)
            .args([
                "--checkpoint-dir",
                ck.to_str().unwrap(),
                "--data-dir",
                ds.to_str().unwrap(),
                "--out-dir",
                out.to_str().unwrap(),
                "--quiet",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "4",
                "--max-iters",
                "100000",
                "--save-interval",
                "100000",
                "--eval-interval",
                "100000",
            ])
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !out.join("metrics.jsonl").exists() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let outp = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&outp.stderr);
        assert_eq!(outp.status.code(), Some(code), "SIG{signal}: {stderr}");
        assert!(stderr.contains("interrupted: saved step"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let steps = loratune_train::checkpoint::list(&out);
        assert_eq!(steps.len(), 1, "the interrupted step is saved");
        assert!(!out.join("lit_model_lora_finetuned.safetensors").exists());
        // And it continues from there.
        let r = finetune(
            &ck,
            &ds,
            &out,
            &[
                "--batch-size",
                "4",
                "--micro-batch-size",
                "4",
                "--max-iters",
                &(steps[0] + 1).to_string(),
                "--resume",
                "--eval-interval",
                "100000",
            ],
        );
        assert!(r.ok, "{}", r.stderr);
        assert!(
            r.stderr.contains(&format!("(step {})", steps[0])),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let (root, ck, ds) = setup("ft-nan", "neox_parallel_rot025");
    let out = root.join("out");
    let r = finetune(
        &ck,
        &ds,
        &out,
        &[
            "--batch-size",
            "4",
            "--micro-batch-size",
            "4",
            "--max-iters",
            "40",
            "--learning-rate",
            "1e30",
            "--save-interval",
            "1",
            "--eval-interval",
            "1000",
            "--lora-dropout",
            "0",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr.contains("loss is") && r.stderr.contains("at step"),
        "{}",
        r.stderr
    );
    let steps = loratune_train::checkpoint::list(&out);
    assert!(!steps.is_empty());
    let last = loratune_train::checkpoint::ckpt_path(&out, *steps.last().unwrap());
    let (_, t) = load_adapter(&last, &Device::Cpu).unwrap();
    for (n, v) in t {
        let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{n} in the kept checkpoint is not finite"
        );
    }
}

#[test]
fn config_file_sets_flags_and_flags_win() {
    let (root, ck, ds) = setup("ft-config", "neox_parallel_rot025");
    let toml = root.join("c.toml");
    std::fs::write(
        &toml,
        "micro_batch_size = 2\nbatch_size = 4\nmax_iters = 4\nlearning_rate = 0.001\nlora_r = 4\n",
    )
    .unwrap();
    let out = root.join("out");
    let r = finetune(
        &ck,
        &ds,
        &out,
        &["--config", toml.to_str().unwrap(), "--lora-r", "2"],
    );
    assert!(r.ok, "{}", r.stderr);
    let hp = hparams(&out);
    assert_eq!(
        (
            hp["args"]["lora_r"].as_u64(),
            hp["args"]["micro_batch_size"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(hp["args"]["learning_rate"], 0.001);
    let yaml = root.join("c.yaml");
    std::fs::write(
        &yaml,
        "max_iters: 2\nbatch_size: 4\nmicro_batch_size: 4\nlora_rank: 3\n",
    )
    .unwrap();
    let r = finetune(
        &ck,
        &ds,
        &root.join("out2"),
        &["--config", yaml.to_str().unwrap()],
    );
    assert!(
        !r.ok && r.stderr.contains("unknown setting \"lora_rank\""),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_settings_are_refused_with_one_line() {
    let (root, ck, ds) = setup("ft-bad", "neox_parallel_rot025");
    let out = root.join("out");
    let expect = |extra: &[&str], data: &Path, want: &str| {
        let r = finetune(&ck, data, &out, extra);
        assert_eq!(r.code, Some(1), "{extra:?}: {}", r.stdout);
        assert!(
            r.stderr.trim().lines().count() == 1 && r.stderr.contains(want),
            "{extra:?}: {}",
            r.stderr
        );
    };
    expect(
        &[
            "--batch-size",
            "10",
            "--micro-batch-size",
            "4",
            "--max-iters",
            "1",
        ],
        &ds,
        "does not divide --batch-size 10",
    );
    expect(
        &["--lora-r", "0", "--max-iters", "1"],
        &ds,
        "rank r must be at least 1",
    );
    expect(
        &["--device", "cuda:0", "--max-iters", "1"],
        &ds,
        "--device cuda:0",
    );
    expect(
        &["--max-iters", "1"],
        &root.join("nowhere"),
        "meta.json is missing: run prepare-alpaca",
    );

    // A dataset made with another tokenizer.
    let other_ck = root.join("other");
    copy_dir(&ck, &other_ck);
    let tj = std::fs::read_to_string(other_ck.join("tokenizer.json")).unwrap();
    std::fs::write(other_ck.join("tokenizer.json"), format!("{tj}\n")).unwrap();
    let other_ds = root.join("other-ds");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            other_ck.to_str().unwrap(),
            "--data-file",
            root.join("data.json").to_str().unwrap(),
            "--destination-path",
            other_ds.to_str().unwrap(),
            "--test-split-size",
            "4",
        ],
    );
    assert!(r.ok);
    expect(
        &["--max-iters", "1"],
        &other_ds,
        "was tokenized with a different tokenizer",
    );

    // An empty dataset.
    let empty = root.join("empty-ds");
    copy_dir(&ds, &empty);
    loratune_data::dataset::write_dataset(&empty.join("train.safetensors"), &[]).unwrap();
    expect(&["--max-iters", "1"], &empty, "the dataset is empty");
    assert!(!out.join("lit_model_lora_finetuned.safetensors").exists());
}

#[test]
fn activation_checkpointing_and_bf16_mixed_train_the_same_adapters() {
    let (root, ck, ds) = setup("ft-ckpt-mixed", "neox_sequential_rot100");
    let common = [
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-iters",
        "8",
        "--eval-iters",
        "1",
        "--lora-dropout",
        "0.1",
    ];
    let plain = root.join("plain");
    let r = finetune(&ck, &ds, &plain, &common);
    assert!(r.ok, "{}", r.stderr);
    let recompute = root.join("recompute");
    let mut args = common.to_vec();
    args.push("--activation-checkpointing");
    let r = finetune(&ck, &ds, &recompute, &args);
    assert!(r.ok, "{}", r.stderr);
    let hp = hparams(&recompute);
    assert_eq!(hp["args"]["activation_checkpointing"], true, "{hp}");
    let a = adapter_bytes(&plain.join("lit_model_lora_finetuned.safetensors"));
    let b = adapter_bytes(&recompute.join("lit_model_lora_finetuned.safetensors"));
    // Same masks, same math; only the fused vs composite norm kernels differ in rounding.
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let err = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err < 1e-4, "{name}: checkpointed run differs by {err}");
    }

    let mixed = root.join("mixed");
    let mut args = common.to_vec();
    args.extend(["--precision", "bf16-mixed"]);
    let r = finetune(&ck, &ds, &mixed, &args);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("precision bf16-mixed"), "{}", r.stderr);
    // The run records the CPU kernel its bf16 products took (32-true has none).
    let kernel = |dir: &Path| hparams(dir)["cpu_bf16_kernel"].clone();
    let named = kernel(&mixed);
    assert!(
        ["widened", "vdpbf16ps", "vdpbf16ps-portable"].contains(&named.as_str().unwrap_or("")),
        "{named}"
    );
    assert!(r
        .stderr
        .contains(&format!("CPU bf16 products: {}", named.as_str().unwrap())));
    assert_eq!(kernel(&plain), serde_json::Value::Null);
    let m = metrics(&mixed);
    let (p, q) = (metrics(&plain), m.clone());
    let (lp, lq) = (
        p.last().unwrap()["loss"].as_f64().unwrap(),
        q.last().unwrap()["loss"].as_f64().unwrap(),
    );
    assert!(
        (lp - lq).abs() < 0.05 * lp,
        "bf16-mixed loss {lq} strays from 32-true's {lp}"
    );
}

const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");
const MERGE: &str = env!("CARGO_BIN_EXE_merge-lora");

/// QLoRA with `--quantize`: every linear quantized to q8_0 at load, the run trains (loss
/// tracks the 32-true run's), its adapter records the quantization, and resuming without
/// `--quantize` is refused; generate-lora on the dense base warns naming both, merge-lora
/// writes a dense checkpoint; a bogus type and ragged rows are refused or reported.
#[test]
fn quantize_trains_a_qlora_adapter_that_generate_and_merge_accept() {
    let (root, ck, ds) = setup("ft-qlora", "llama_gqa_untied");
    let common = [
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-iters",
        "12",
        "--eval-iters",
        "1",
        "--save-interval",
        "3",
        "--activation-checkpointing",
        "--lora-mlp",
    ];
    let dense = root.join("dense");
    assert!(finetune(&ck, &ds, &dense, &common).ok);
    let qlora = root.join("qlora");
    let mut args = common.to_vec();
    args.extend(["--quantize", "q8_0"]);
    let r = finetune(&ck, &ds, &qlora, &args);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("base weights: 11 of 11 linears quantized: q8_0 x 11"),
        "{}",
        r.stderr
    );
    let (d, q) = (metrics(&dense), metrics(&qlora));
    let (first, ld, lq) = (
        q[0]["loss"].as_f64().unwrap(),
        d.last().unwrap()["loss"].as_f64().unwrap(),
        q.last().unwrap()["loss"].as_f64().unwrap(),
    );
    assert!(lq < first, "QLoRA loss did not fall: {first} -> {lq}");
    assert!(
        (ld - lq).abs() < 0.05 * ld,
        "QLoRA loss {lq} strays from 32-true's {ld}"
    );
    let adapter = qlora.join("lit_model_lora_finetuned.safetensors");
    let (meta, _) = load_adapter(&adapter, &Device::Cpu).unwrap();
    assert_eq!(meta.base_quantization.as_deref(), Some("q8_0 x 11"));

    let mut resume = common.to_vec();
    resume.extend(["--max-iters", "15", "--resume", "auto"]);
    let r = finetune(&ck, &ds, &qlora, &resume);
    assert!(
        !r.ok
            && r.stderr
                .contains("trained on q8_0 x 11 linear weights, this run has dense"),
        "{}",
        r.stderr
    );

    let gen = |extra: &[&str]| {
        let mut a = vec![
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            adapter.to_str().unwrap(),
            "--prompt",
            "Count to 3.",
            "--max-new-tokens",
            "4",
            "--prompt-style",
            "plain",
        ];
        a.extend_from_slice(extra);
        run(GENERATE_LORA, &a)
    };
    let r = gen(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("trained on")
            && r.stderr
                .contains("q8_0 x 11 linear weights; this base has dense"),
        "{}",
        r.stderr
    );
    let r = gen(&["--quantize", "q8_0"]);
    assert!(r.ok && !r.stderr.contains("warning"), "{}", r.stderr);

    let merged = root.join("merged");
    let r = run(
        MERGE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            adapter.to_str().unwrap(),
            "--out-dir",
            merged.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let w = loratune_model::Weights::from_safetensors(
        &merged.join("lit_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(!w.holds_quantized());

    let r = finetune(&ck, &ds, &root.join("bogus"), &["--quantize", "q3_x"]);
    assert!(
        !r.ok && r.stderr.contains("q3_x") && r.stderr.contains("q8_0, q4_0"),
        "{}",
        r.stderr
    );
    let mut args = common.to_vec();
    args.extend(["--quantize", "q4_k", "--max-iters", "1"]);
    let r = finetune(&ck, &ds, &root.join("ragged"), &args);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--quantize q4_k: 11 of 11 linears kept dense")
            && r.stderr.contains("256 values"),
        "{}",
        r.stderr
    );
}
