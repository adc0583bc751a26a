//! prepare-alpaca end to end: golden token ids and labels (made by the Python tokenizers
//! package, see scripts/make_data_fixtures.py), a stable split, the tutorial's own-data
//! workflow, and a clear error with no output for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use loratune_data::{Dataset, DatasetMeta};

const BIN: &str = env!("CARGO_BIN_EXE_prepare-alpaca");

fn data_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/tests/fixtures")
        .join(name)
}

fn tok_dir() -> String {
    hf_fixture("neox_parallel_rot025").display().to_string()
}

fn prepare(data: &Path, dest: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--checkpoint-dir",
        &*Box::leak(tok_dir().into_boxed_str()),
        "--data-file",
        data.to_str().unwrap(),
        "--destination-path",
        dest.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(BIN, &args)
}

#[test]
fn golden_ids_and_labels_with_and_without_masking() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_fixture("golden.json")).unwrap())
            .unwrap();
    let records = data_fixture("records.json");
    let root = scratch("prepare-golden");
    for mask in [false, true] {
        let dest = root.join(format!("mask-{mask}"));
        // Every record in train: validate on the same file.
        let mut extra = vec![
            "--max-seq-length",
            "160",
            "--val-file",
            records.to_str().unwrap(),
        ];
        if mask {
            extra.push("--mask-inputs");
        }
        let r = prepare(&records, &dest, &extra);
        assert!(r.ok, "{}", r.stderr);
        assert!(
            r.stdout.contains("truncated 6 sample(s) to 160 tokens"),
            "{}",
            r.stdout
        );
        let ds = Dataset::open(&dest.join("train.safetensors")).unwrap();
        let samples = golden["samples"].as_array().unwrap();
        assert_eq!(ds.len(), samples.len());
        for (i, want) in samples.iter().enumerate() {
            let got = ds.get(i);
            let ids: Vec<u32> = serde_json::from_value(want["input_ids"].clone()).unwrap();
            let key = if mask { "labels_masked" } else { "labels" };
            let labels: Vec<i32> = serde_json::from_value(want[key].clone()).unwrap();
            assert_eq!(got.input_ids, ids, "record {i} ids");
            assert_eq!(got.labels, labels, "record {i} labels (mask {mask})");
        }
        let meta = DatasetMeta::read(&dest.join("meta.json")).unwrap();
        assert_eq!(
            (meta.mask_inputs, meta.max_seq_length, meta.train.count),
            (mask, 160, 4)
        );
    }
}

#[test]
fn split_is_stable_and_the_tutorials_own_data_works() {
    let root = scratch("prepare-split");
    // The tutorial's "Tune on your dataset" file shape, as JSON Lines too.
    let mydata = root.join("mydata.json");
    let rec = r#"{"instruction": "Arrange the given numbers in ascending order.", "input": "2, 4, 0, 8, 3", "output": "0, 2, 3, 4, 8"}"#;
    let many: Vec<String> = (0..30)
        .map(|i| rec.replace("2, 4, 0, 8, 3", &format!("{i}, 4, 0")))
        .collect();
    std::fs::write(&mydata, format!("[\n{}\n]", many.join(",\n"))).unwrap();
    let jsonl = root.join("mydata.jsonl");
    std::fs::write(&jsonl, many.join("\n")).unwrap();

    let a = root.join("a");
    let b = root.join("b");
    let c = root.join("c");
    for (src, dest) in [(&mydata, &a), (&mydata, &b), (&jsonl, &c)] {
        let r = prepare(
            src,
            dest,
            &["--test-split-size", "5", "--max-seq-length", "256"],
        );
        assert!(r.ok, "{}", r.stderr);
        assert!(r.stdout.contains("train:      25 samples"), "{}", r.stdout);
    }
    for f in ["train.safetensors", "val.safetensors"] {
        let fa = std::fs::read(a.join(f)).unwrap();
        assert!(
            fa == std::fs::read(b.join(f)).unwrap(),
            "{f}: same seed, same split"
        );
        assert!(
            fa == std::fs::read(c.join(f)).unwrap(),
            "{f}: JSON Lines reads the same"
        );
    }
    let r = prepare(
        &mydata,
        &root.join("d"),
        &[
            "--test-split-size",
            "5",
            "--max-seq-length",
            "256",
            "--seed",
            "7",
        ],
    );
    assert!(r.ok);
    assert!(
        std::fs::read(a.join("val.safetensors")).unwrap()
            != std::fs::read(root.join("d/val.safetensors")).unwrap()
    );
    let r = prepare(
        &mydata,
        &root.join("e"),
        &[
            "--test-split-fraction",
            "0.2",
            "--max-seq-length",
            "256",
            "--histogram",
        ],
    );
    assert!(
        r.ok && r.stdout.contains("train:      24 samples") && r.stdout.contains("####"),
        "{}",
        r.stdout
    );
}

#[test]
fn default_length_comes_from_the_checkpoint() {
    let root = scratch("prepare-default-len");
    let ck = root.join("ck");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &ck);
    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-file",
            data_fixture("records.json").to_str().unwrap(),
            "--destination-path",
            root.join("d").to_str().unwrap(),
            "--test-split-size",
            "1",
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("lit_config.json") && r.stderr.contains("--max-seq-length"),
        "{}",
        r.stderr
    );
    assert!(
        run(
            env!("CARGO_BIN_EXE_convert-hf-checkpoint"),
            &["--checkpoint-dir", ck.to_str().unwrap()]
        )
        .ok
    );
    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-file",
            data_fixture("records.json").to_str().unwrap(),
            "--destination-path",
            root.join("d").to_str().unwrap(),
            "--test-split-size",
            "1",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("max length 64"), "{}", r.stdout);
    let ds = Dataset::open(&root.join("d/train.safetensors")).unwrap();
    assert!(
        (0..ds.len()).all(|i| ds.sample_len(i) <= 64 && *ds.get(i).input_ids.last().unwrap() == 0)
    );
}

fn assert_bad(name: &str, content: &[u8], extra: &[&str], expect: &[&str]) {
    let root = scratch(&format!("prepare-bad-{name}"));
    let file = root.join("data.json");
    std::fs::write(&file, content).unwrap();
    let dest = root.join("out");
    let mut args = vec!["--max-seq-length", "64"];
    if !extra.iter().any(|a| a.starts_with("--test-split")) {
        args.extend(["--test-split-size", "1"]);
    }
    args.extend_from_slice(extra);
    let r = prepare(&file, &dest, &args);
    assert_eq!(r.code, Some(1), "{name}: should fail\n{}", r.stdout);
    let msg = r.stderr.trim();
    assert_eq!(msg.lines().count(), 1, "{name}: one line expected:\n{msg}");
    for e in expect {
        assert!(msg.contains(e), "{name}: expected {e:?} in: {msg}");
    }
    for f in ["train.safetensors", "val.safetensors", "meta.json"] {
        assert!(!dest.join(f).exists(), "{name}: {f} must not be written");
    }
    if dest.exists() {
        assert!(temp_leftovers(&dest).is_empty());
    }
}

#[test]
fn bad_inputs_are_named_and_leave_nothing() {
    let ok = r#"{"instruction": "a", "input": "", "output": "b"}"#;
    assert_bad(
        "syntax",
        b"[\n {\"instruction\": \"a\",\n  \"output\": }\n]",
        &[],
        &["invalid JSON at line 3, column 13", "data.json"],
    );
    assert_bad(
        "jsonl",
        format!("{ok}\n{{\"instruction\": oops}}\n").as_bytes(),
        &[],
        &["line 2"],
    );
    assert_bad(
        "not-object",
        format!("[{ok}, 7, {ok}]").as_bytes(),
        &[],
        &["record 2", "expected an object, found a number"],
    );
    assert_bad(
        "missing",
        format!("[{ok}, {{\"output\": \"x\"}}]").as_bytes(),
        &[],
        &["record 2", "missing \"instruction\"", "--skip-invalid"],
    );
    assert_bad(
        "non-string",
        format!("[{ok}, {ok}, {{\"instruction\": \"a\", \"output\": 5}}]").as_bytes(),
        &[],
        &["record 3", "\"output\" must be a string, found a number"],
    );
    assert_bad("empty", b"  \n", &[], &["data.json", "empty"]);
    assert_bad("empty-list", b"[]", &[], &["no records"]);
    assert_bad(
        "utf8",
        b"[{\"instruction\": \"caf\xe9\", \"output\": \"x\"}]",
        &[],
        &["not UTF-8", "offset 21"],
    );
    assert_bad(
        "split-train",
        format!("[{ok}, {ok}]").as_bytes(),
        &["--test-split-size", "2"],
        &["--test-split-size 2 leaves no training records"],
    );
    assert_bad(
        "split-val",
        format!("[{ok}, {ok}]").as_bytes(),
        &["--test-split-fraction", "0.1"],
        &["validation split empty"],
    );
    let big = format!(
        "[{ok}, {{\"instruction\": \"a\", \"output\": \"{}\"}}]",
        "x".repeat(50 << 20)
    );
    assert_bad(
        "huge",
        big.as_bytes(),
        &[],
        &["record 2", "more than the 1048576-byte limit"],
    );
    assert_bad(
        "all-invalid",
        b"[1, 2]",
        &["--skip-invalid"],
        &["all 2 records are invalid"],
    );
}

#[test]
fn skip_invalid_counts_and_continues() {
    let root = scratch("prepare-skip");
    let ok = r#"{"instruction": "a", "input": "", "output": "b"}"#;
    let file = root.join("d.json");
    std::fs::write(
        &file,
        format!("[{ok}, 3, {ok}, {{\"instruction\": 1, \"output\": \"x\"}}, {ok}]"),
    )
    .unwrap();
    let r = prepare(
        &file,
        &root.join("out"),
        &[
            "--max-seq-length",
            "64",
            "--test-split-size",
            "1",
            "--skip-invalid",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("skipped 2 invalid record(s)")
            && r.stdout
                .contains("record 4: \"instruction\" must be a string"),
        "{}",
        r.stdout
    );
    let meta = DatasetMeta::read(&root.join("out/meta.json")).unwrap();
    assert_eq!(
        (
            meta.records_read,
            meta.records_skipped,
            meta.train.count,
            meta.val.count
        ),
        (5, 2, 2, 1)
    );
}

#[test]
fn no_network_names_the_data_file_flag() {
    let root = scratch("prepare-offline");
    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            &tok_dir(),
            "--destination-path",
            root.join("d").to_str().unwrap(),
            "--data-file-url",
            "http://127.0.0.1:9/alpaca.json",
            "--max-seq-length",
            "64",
        ],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("could not download") && r.stderr.contains("--data-file PATH"),
        "{}",
        r.stderr
    );
    assert!(!root.join("d/alpaca_data_cleaned_archive.json").exists());
}

/// The real 999-record Alpaca demo set (LORATUNE_ALPACA_DEMO, fetched from PyPI by
/// scripts/fetch_assets.sh; .ci/run sets it).
#[test]
fn real_alpaca_demo_set_prepares() {
    let Ok(path) = std::env::var("LORATUNE_ALPACA_DEMO") else {
        eprintln!("LORATUNE_ALPACA_DEMO is not set: the real-data check runs in .ci/run");
        return;
    };
    let root = scratch("prepare-demo");
    let r = prepare(
        Path::new(&path),
        &root.join("d"),
        &[
            "--test-split-size",
            "50",
            "--max-seq-length",
            "256",
            "--mask-inputs",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("read 999 alpaca records, skipped 0")
            && r.stdout.contains("train:     949 samples"),
        "{}",
        r.stdout
    );
    let val: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("d/val.json")).unwrap()).unwrap();
    assert_eq!(val.len(), 50);
}
