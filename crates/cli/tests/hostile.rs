//! Hostile invocations of every command, as a demanding user would try them: each must exit
//! non-zero without a panic, say what is wrong in one line naming the file, flag or record,
//! and leave every file that existed before byte for byte as it was (and write none).

mod common;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use loratune_model::adapter::{load_adapter, save_adapter};

const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const PREPARE: &str = env!("CARGO_BIN_EXE_prepare-alpaca");
const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");
const CHAT: &str = env!("CARGO_BIN_EXE_chat");
const MERGE: &str = env!("CARGO_BIN_EXE_merge-lora");
const EXPORT: &str = env!("CARGO_BIN_EXE_export");
const LOGITS: &str = env!("CARGO_BIN_EXE_logits");
const DOWNLOAD: &str = env!("CARGO_BIN_EXE_download");
const LORATUNE: &str = env!("CARGO_BIN_EXE_loratune");

/// Every file and folder under `root`, with a hash of each file's bytes and its mode.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, u32)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            #[cfg(unix)]
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            #[cfg(not(unix))]
            let mode = 0;
            if meta.is_dir() {
                out.insert(p.clone(), (0, mode));
                walk(&p, out);
            } else {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(p, (h.finish(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs `bin` with empty stdin; one still running after `limit` is killed and reported.
fn run_args(bin: &str, args: &[String], limit: Duration) -> Run {
    let mut child = Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = pipes;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = o.read_to_end(&mut out);
        let _ = e.read_to_end(&mut err);
        (out, err)
    });
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&err).into_owned();
    assert!(!stderr.contains("panicked"), "{bin} panicked:\n{stderr}");
    Run {
        ok: status.is_some_and(|s| s.success()),
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: if status.is_none() {
            format!("(still running after {limit:?}: killed)\n{stderr}")
        } else {
            stderr
        },
    }
}

/// The files the cases work on: a converted checkpoint, a dataset, a trained adapter and
/// its checkpoints, an earlier merge and export, and a collection of broken inputs.
struct World {
    root: PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl World {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    /// `line` split on spaces, with `{name}` replaced by the world's paths.
    fn args(&self, line: &str) -> Vec<String> {
        line.split_whitespace()
            .map(|a| {
                let mut a = a.to_string();
                for (k, v) in &self.vars {
                    a = a.replace(&format!("{{{k}}}"), v);
                }
                a = a.replace("{root}", &s(&self.root));
                a
            })
            .collect()
    }
}

fn build_world() -> World {
    let root = scratch("hostile");
    let w = World {
        root: root.clone(),
        vars: vec![
            ("ck", s(&root.join("ck"))),
            ("ds", s(&root.join("ds"))),
            ("run", s(&root.join("run"))),
            (
                "adapter",
                s(&root.join("run/lit_model_lora_finetuned.safetensors")),
            ),
            ("gguf", s(&fixtures().join("gguf/tiny-llama.gguf"))),
            (
                "unknown_quant",
                s(&fixtures().join("gguf/unknown-quant.gguf")),
            ),
        ],
    };
    let ck = w.path("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", &s(&ck)]).ok);
    let recs: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "output": "{i} {i} {i}"}}"#))
        .collect();
    w.write("data.json", format!("[{}]", recs.join(",")));
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            &s(&ck),
            "--data-file",
            &s(&w.path("data.json")),
            "--destination-path",
            &s(&w.path("ds")),
            "--test-split-size",
            "2",
            "--prompt-style",
            "plain",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    // A dataset whose samples train only on their answers (for a length with no target).
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            &s(&ck),
            "--data-file",
            &s(&w.path("data.json")),
            "--destination-path",
            &s(&w.path("ds-masked")),
            "--test-split-size",
            "2",
            "--mask-inputs",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let r = run(
        FINETUNE,
        &[
            "--checkpoint-dir",
            &s(&ck),
            "--data-dir",
            &s(&w.path("ds")),
            "--out-dir",
            &s(&w.path("run")),
            "--quiet",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--max-iters",
            "2",
            "--save-interval",
            "1",
            "--eval-iters",
            "1",
            "--lora-r",
            "2",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let adapter = w.path("run/lit_model_lora_finetuned.safetensors");
    let r = run(
        MERGE,
        &[
            "--checkpoint-dir",
            &s(&ck),
            "--lora-path",
            &s(&adapter),
            "--out-dir",
            &s(&w.path("merged")),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let r = run(
        EXPORT,
        &[
            "--format",
            "hf",
            "--checkpoint-dir",
            &s(&ck),
            "--out-dir",
            &s(&w.path("hf")),
        ],
    );
    assert!(r.ok, "{}", r.stderr);

    // Broken inputs.
    let (meta, tensors) = load_adapter(&adapter, &Device::Cpu).unwrap();
    let nan: std::collections::HashMap<_, _> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), (t * f64::NAN).unwrap()))
        .collect();
    save_adapter(&w.path("nan.safetensors"), &meta, &nan).unwrap();
    let mut loud = meta.clone();
    loud.lora.alpha = 1e30;
    save_adapter(&w.path("alpha.safetensors"), &loud, &tensors).unwrap();
    let mut other = meta.clone();
    other.base_model = "someone/else".into();
    save_adapter(&w.path("other-base.safetensors"), &other, &tensors).unwrap();
    // The same model name with other weights: a checkpoint whose bytes differ.
    copy_dir(&ck, &w.path("ck-changed"));
    let mut bytes = std::fs::read(w.path("ck/lit_model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    w.write("ck-changed/lit_model.safetensors", bytes);
    // Configs that lie about sizes, or are not configs.
    copy_dir(&ck, &w.path("ck-huge"));
    let text = std::fs::read_to_string(w.path("ck/lit_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["block_size"] = serde_json::json!(1_000_000_000_000u64);
    w.write("ck-huge/lit_config.json", v.to_string());
    copy_dir(&ck, &w.path("ck-badcfg"));
    w.write("ck-badcfg/lit_config.json", "{not json");
    copy_dir(&ck, &w.path("ck-cut"));
    let bytes = std::fs::read(w.path("ck/lit_model.safetensors")).unwrap();
    w.write("ck-cut/lit_model.safetensors", &bytes[..bytes.len() / 2]);
    // Hugging Face folders that do not convert.
    w.write("hf-badjson/config.json", "{\"architectures\": [");
    w.write(
        "hf-arch/config.json",
        r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba"}"#,
    );
    std::fs::create_dir_all(w.path("empty-dir")).unwrap();
    // Data files.
    w.write("bad.json", "[{\"instruction\": \"a\", \"output\": \"b\"},");
    w.write(
        "notutf8.json",
        b"[{\"instruction\": \"\xff\", \"output\": \"b\"}]",
    );
    w.write("empty.json", "");
    w.write(
        "missing-output.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#,
    );
    w.write(
        "all-bad.jsonl",
        "{\"instruction\": 1}\n{\"output\": \"x\"}\nnot json\n",
    );
    w.write("afile", "I am a file");
    w.write("cfg/bad.toml", "max_iters = [");
    w.write("cfg/unknown.yaml", "lora_rank: 3\n");
    w.write("garbage.safetensors", "this is not a safetensors file");
    let gguf = std::fs::read(fixtures().join("gguf/tiny-llama.gguf")).unwrap();
    w.write("truncated.gguf", &gguf[..gguf.len().min(1000)]);
    w.write("garbage.gguf", "GGUF but not really");
    // A dataset holding ids beyond the vocabulary, and one with a broken meta.json.
    copy_dir(&w.path("ds"), &w.path("ds-badids"));
    let huge = loratune_data::Sample {
        input_ids: vec![1, 2, 999_999],
        labels: vec![1, 2, 999_999],
    };
    loratune_data::dataset::write_dataset(&w.path("ds-badids/train.safetensors"), &[huge]).unwrap();
    copy_dir(&w.path("ds"), &w.path("ds-badmeta"));
    w.write("ds-badmeta/meta.json", "{}");
    let words = vec!["word"; 3000].join("_");
    w.write("long-prompt.txt", &words);
    w
}

struct Case {
    bin: &'static str,
    args: &'static str,
    /// What the one-line error must contain.
    want: &'static str,
}

const fn case(bin: &'static str, args: &'static str, want: &'static str) -> Case {
    Case { bin, args, want }
}

const CASES: &[Case] = &[
    // download: no hub is reachable from tests; these fail before any request.
    case(DOWNLOAD, "--repo-id noslash --checkpoint-dir {root}/dl", "noslash"),
    case(DOWNLOAD, "--checkpoint-dir {root}/dl", "--repo-id"),
    // convert-hf-checkpoint
    case(CONVERT, "--checkpoint-dir {root}/nowhere", "nowhere"),
    case(CONVERT, "--checkpoint-dir {root}/empty-dir", "config.json"),
    case(CONVERT, "--checkpoint-dir {root}/hf-badjson", "config.json"),
    case(CONVERT, "--checkpoint-dir {root}/hf-arch", "MambaForCausalLM"),
    case(CONVERT, "--checkpoint-dir {ck} --model-name no-such-model", "no-such-model"),
    case(CONVERT, "--checkpoint-dir {root}/g1 --gguf {root}/missing.gguf", "missing.gguf"),
    case(CONVERT, "--checkpoint-dir {root}/g2 --gguf {root}/garbage.gguf", "garbage.gguf"),
    case(CONVERT, "--checkpoint-dir {root}/g3 --gguf {root}/truncated.gguf", "truncated.gguf"),
    case(CONVERT, "--checkpoint-dir {root}/g4 --gguf {unknown_quant}", "unknown-quant.gguf"),
    case(CONVERT, "--checkpoint-dir {ck} --dtype float64", "--dtype"),
    // prepare-alpaca
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/missing.json --destination-path {root}/p", "missing.json"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/bad.json --destination-path {root}/p", "bad.json"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/notutf8.json --destination-path {root}/p", "not UTF-8"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/empty.json --destination-path {root}/p", "empty.json: the file is empty"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/missing-output.json --destination-path {root}/p", "record 2"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/all-bad.jsonl --destination-path {root}/p --skip-invalid", "all 3 records are invalid"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --test-split-size 0", "--test-split-size 0"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --test-split-size 50", "no training records"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --test-split-fraction 1.5", "--test-split-fraction"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --max-seq-length 1", "--max-seq-length"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --prompt-style nope", "--prompt-style"),
    case(PREPARE, "--checkpoint-dir {root}/nowhere --data-file {root}/data.json --destination-path {root}/p", "nowhere"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/afile --test-split-size 2", "--destination-path"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --max-record-bytes 3", "--max-record-bytes"),
    case(PREPARE, "--checkpoint-dir {ck} --data-file {root}/data.json --destination-path {root}/p --val-file {root}/missing-val.json", "missing-val.json"),
    // finetune-lora
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {root}/nowhere --out-dir {root}/o", "meta.json is missing"),
    case(FINETUNE, "--checkpoint-dir {root}/nowhere --data-dir {ds} --out-dir {root}/o", "nowhere"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {run}", "--out-dir"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/afile", "is a file"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --learning-rate inf", "--learning-rate"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --learning-rate=-1", "--learning-rate"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --weight-decay nan", "--weight-decay"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --max-seq-length 1", "--max-seq-length"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --micro-batch-size 0", "--micro-batch-size"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --batch-size 10 --micro-batch-size 4", "does not divide --batch-size 10"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --lora-r 0", "rank r"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --lora-r 100000", "rank r 100000"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --lora-alpha 1e30", "alpha"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --lora-dropout 1", "dropout"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --lora-query false --lora-value false", "no target"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --eval-interval 0", "--eval-interval"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --grad-clip 0", "--grad-clip"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --keep-last 0", "--keep-last"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --epochs=-1", "--epochs"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --config {root}/missing.toml", "missing.toml"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --config {root}/cfg/bad.toml", "bad.toml"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --config {root}/cfg/unknown.yaml", "lora_rank"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --resume {root}/missing-ckpt.safetensors", "missing-ckpt.safetensors"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --resume {run}/iter-000001-ckpt.safetensors --lora-r 4", "r 2, alpha 16"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --resume auto --overwrite", "--overwrite"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {root}/ds-badids --out-dir {root}/o", "token id 999999"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {root}/ds-badmeta --out-dir {root}/o", "meta.json"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {root}/ds-masked --out-dir {root}/o --max-seq-length 3", "none of the"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --device cuda:0", "--device cuda:0"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --precision fp8", "--precision"),
    case(FINETUNE, "--checkpoint-dir {ck} --data-dir {ds} --out-dir {root}/o --activation-checkpointing 0", "--activation-checkpointing"),
    // generate
    case(GENERATE, "--checkpoint-dir {root}/nowhere", "nowhere"),
    case(GENERATE, "--checkpoint-dir {ck} --temperature inf", "--temperature"),
    case(GENERATE, "--checkpoint-dir {ck} --temperature=-1", "--temperature"),
    case(GENERATE, "--checkpoint-dir {ck} --top-p 0", "--top-p"),
    case(GENERATE, "--checkpoint-dir {ck} --top-p 1.5", "--top-p"),
    case(GENERATE, "--checkpoint-dir {ck} --num-samples 0", "--num-samples"),
    case(GENERATE, "--checkpoint-dir {ck} --max-new-tokens 100000", "--max-new-tokens 100000"),
    case(GENERATE, "--checkpoint-dir {ck} --max-new-tokens 100000 --truncate-prompt", "leaves no room"),
    case(GENERATE, "--checkpoint-dir {ck} --prompt {long_prompt} --max-new-tokens 8", "--truncate-prompt"),
    case(GENERATE, "--checkpoint-dir {root}/ck-huge", "block_size"),
    case(GENERATE, "--checkpoint-dir {root}/ck-badcfg", "lit_config.json"),
    case(GENERATE, "--checkpoint-dir {root}/ck-cut", "lit_model.safetensors"),
    case(GENERATE, "--checkpoint-dir {ck} --device tpu", "--device"),
    // generate-lora
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {root}/missing.safetensors", "missing.safetensors"),
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {root}/garbage.safetensors", "garbage.safetensors"),
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {ck}/lit_model.safetensors", "not a loratune LoRA checkpoint"),
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {root}/nan.safetensors", "non-finite"),
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {root}/alpha.safetensors", "alpha"),
    case(GENERATE_LORA, "--checkpoint-dir {ck} --lora-path {root}/other-base.safetensors", "someone/else"),
    case(GENERATE_LORA, "--checkpoint-dir {root}/ck-changed --lora-path {adapter}", "--force"),
    // chat (stdin is empty)
    case(CHAT, "--checkpoint-dir {ck} --temperature nan", "--temperature"),
    case(CHAT, "--checkpoint-dir {ck} --max-new-tokens 100000", "--max-new-tokens"),
    case(CHAT, "--checkpoint-dir {ck} --lora-path {root}/nan.safetensors", "non-finite"),
    case(CHAT, "--checkpoint-dir {ck} --prompt-style nope", "--prompt-style"),
    // merge-lora
    case(MERGE, "--checkpoint-dir {ck} --lora-path {adapter} --out-dir {ck}", "is the --checkpoint-dir folder"),
    case(MERGE, "--checkpoint-dir {ck} --lora-path {adapter} --out-dir {root}/./ck/../ck/", "is the --checkpoint-dir folder"),
    case(MERGE, "--checkpoint-dir {ck} --lora-path {adapter} --out-dir {root}/merged", "--overwrite"),
    case(MERGE, "--checkpoint-dir {ck} --lora-path {root}/missing.safetensors --out-dir {root}/m2", "missing.safetensors"),
    case(MERGE, "--checkpoint-dir {ck} --lora-path {adapter} --out-dir {root}/afile", "is a file"),
    case(MERGE, "--checkpoint-dir {root}/ck-changed --lora-path {adapter} --out-dir {root}/m3", "sha256"),
    case(MERGE, "--checkpoint-dir {root}/nowhere --lora-path {adapter} --out-dir {root}/m4", "nowhere"),
    // export
    case(EXPORT, "--format hf --checkpoint-dir {ck} --out-dir {ck}", "is the --checkpoint-dir folder"),
    case(EXPORT, "--format hf --checkpoint-dir {ck} --lora-path {adapter} --out-dir {root}/hf", "--overwrite"),
    case(EXPORT, "--format peft --checkpoint-dir {ck} --out-dir {root}/e1", "--lora-path"),
    case(EXPORT, "--format peft --checkpoint-dir {ck} --lora-path {adapter} --dtype float16 --out-dir {root}/e2", "--dtype"),
    case(EXPORT, "--format onnx --checkpoint-dir {ck} --out-dir {root}/e3", "--format"),
    case(EXPORT, "--format peft --checkpoint-dir {ck} --lora-path {root}/nan.safetensors --out-dir {root}/e4", "non-finite"),
    case(EXPORT, "--format peft --checkpoint-dir {root}/ck-changed --lora-path {adapter} --out-dir {root}/e5", "--force"),
    // logits
    case(LOGITS, "--checkpoint-dir {ck} --tokens 1,x", "--tokens"),
    case(LOGITS, "--checkpoint-dir {ck} --tokens 999999", "outside"),
    case(LOGITS, "--checkpoint-dir {ck}", "--tokens"),
    // the multi-call binary
    case(LORATUNE, "no-such-command", "no-such-command"),
];

#[test]
fn hostile_invocations_fail_cleanly_and_touch_nothing() {
    let mut w = build_world();
    w.vars.push((
        "long_prompt",
        std::fs::read_to_string(w.path("long-prompt.txt")).unwrap(),
    ));
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let mut before = snapshot(&w.root);
    let mut failures = Vec::new();
    for c in CASES {
        let args = w.args(c.args);
        let name = Path::new(c.bin).file_name().unwrap().to_string_lossy();
        let r = run_args(c.bin, &args, Duration::from_secs(30));
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let first = lines.first().copied().unwrap_or("");
        // clap's usage errors (exit 2) add usage lines after the one-line error (and may
        // name the flag on the next line).
        let clap = r.code == Some(2);
        let named = if clap {
            r.stderr.contains(c.want)
        } else {
            first.contains(c.want)
        };
        let one_line = clap || lines.len() == 1;
        eprintln!("{name}: {first}");
        if r.ok || !first.starts_with("error:") || !named || !one_line {
            failures.push(format!(
                "{name} {}: exit {:?}, want one line with {:?}; stderr:\n{}",
                c.args, r.code, c.want, r.stderr
            ));
        }
        let after = snapshot(&w.root);
        if after != before {
            let changed: Vec<String> = after
                .iter()
                .filter(|(p, v)| before.get(*p) != Some(v))
                .map(|(p, _)| format!("+{}", p.display()))
                .chain(
                    before
                        .keys()
                        .filter(|p| !after.contains_key(*p))
                        .map(|p| format!("-{}", p.display())),
                )
                .collect();
            failures.push(format!("{name} {}: changed {changed:?}", c.args));
            before = after;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}
