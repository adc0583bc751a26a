//! Conversations and documents end to end: `messages` and ShareGPT files rendered by the
//! checkpoint's chat template with the loss on the assistant turns only, `.txt` documents packed
//! into windows, one clear line for each kind of bad conversation, and the rendering carried from
//! the dataset into the adapter and back out in generate-lora.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use loratune_data::chat::Rendering;
use loratune_data::records::DataFormat;
use loratune_data::{Dataset, DatasetMeta};
use loratune_model::Tokenizer;

const PREPARE: &str = env!("CARGO_BIN_EXE_prepare");
const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const MERGE: &str = env!("CARGO_BIN_EXE_merge-lora");

/// A fixture whose tokenizer has a ChatML chat template (EOS `<|im_end|>`).
fn chat_ck() -> PathBuf {
    hf_fixture("llama_gqa_tied")
}

fn prepare(ck: &Path, data: &Path, dest: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--data-file",
        data.to_str().unwrap(),
        "--destination-path",
        dest.to_str().unwrap(),
        "--max-seq-length",
        "256",
    ];
    args.extend_from_slice(extra);
    run(PREPARE, &args)
}

/// Six conversations (system, two exchanges), as `messages` JSON Lines and as ShareGPT.
fn conversations(root: &Path) -> (PathBuf, PathBuf) {
    let mut messages = String::new();
    let mut sharegpt = Vec::new();
    for i in 0..6 {
        let turns = [
            ("system", "Be brief.".to_string()),
            ("user", format!("Say {i}.")),
            ("assistant", format!("{i} {i}")),
            ("user", "Again?".to_string()),
            ("assistant", format!("yes {i}")),
        ];
        let m: Vec<_> = turns
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        messages.push_str(&format!("{}\n", serde_json::json!({ "messages": m })));
        let from = |r: &str| {
            match r {
                "user" => "human",
                "assistant" => "gpt",
                other => other,
            }
            .to_string()
        };
        let c: Vec<_> = turns
            .iter()
            .map(|(r, c)| serde_json::json!({"from": from(r), "value": c}))
            .collect();
        sharegpt.push(serde_json::json!({ "conversations": c }));
    }
    let (a, b) = (root.join("chat.jsonl"), root.join("chat_sharegpt.json"));
    std::fs::write(&a, messages).unwrap();
    std::fs::write(&b, serde_json::to_string(&sharegpt).unwrap()).unwrap();
    (a, b)
}

#[test]
fn conversations_train_on_the_assistant_turns_only() {
    let root = scratch("conv-assistant");
    let (messages, sharegpt) = conversations(&root);
    let ck = chat_ck();
    let r = prepare(&ck, &messages, &root.join("m"), &["--test-split-size", "2"]);
    assert!(r.ok, "{}", r.stderr);
    for want in [
        "read 6 messages records",
        "prompt style template",
        "loss on the assistant turns only",
        "turns per conversation: p50 4",
    ] {
        assert!(r.stdout.contains(want), "{want:?} in {}", r.stdout);
    }
    let meta = DatasetMeta::read(&root.join("m/meta.json")).unwrap();
    assert_eq!(meta.data_format, Some(DataFormat::Messages));
    assert_eq!(meta.prompt_style, Rendering::Template);
    let tok = Tokenizer::from_dir(&ck).unwrap();
    let template = tok.chat_template.clone().unwrap();
    assert_eq!(
        meta.chat_template_sha256.as_deref(),
        Some(loratune_model::io::sha256_hex(template.as_bytes()).as_str())
    );
    assert!(meta.mask_inputs);
    assert_eq!(meta.turns, Some((4, 4, 4)));

    // Each sample's trained tokens spell its two replies, each closed by <|im_end|> and the
    // newline after it; nothing of the system or user turns.
    let ds = Dataset::open(&root.join("m/train.safetensors")).unwrap();
    assert_eq!(ds.len(), 4);
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    for i in 0..ds.len() {
        let s = ds.get(i);
        let trained: Vec<u32> = s
            .input_ids
            .iter()
            .zip(&s.labels)
            .filter(|(_, l)| **l != -100)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(trained.iter().filter(|t| **t == im_end).count(), 2);
        let text = tok.decode(&trained).unwrap();
        let full = tok.decode(&s.input_ids).unwrap();
        let n = text.split_whitespace().next().unwrap();
        assert_eq!(text, format!("{n} {n}\nyes {n}\n"), "sample {i}: {full:?}");
        assert!(full.contains("Be brief.") && !text.contains("Again"));
    }
    assert_eq!(meta.train.trained_tokens, ds_trained(&ds));

    // The same conversations as ShareGPT make the same bytes.
    let r = prepare(&ck, &sharegpt, &root.join("s"), &["--test-split-size", "2"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("read 6 sharegpt records"), "{}", r.stdout);
    for f in ["train.safetensors", "val.safetensors"] {
        assert_eq!(
            std::fs::read(root.join("m").join(f)).unwrap(),
            std::fs::read(root.join("s").join(f)).unwrap(),
            "{f}"
        );
    }

    // A style instead of the template: each reply closed by EOS, the loss still on the
    // replies only.
    let r = prepare(
        &ck,
        &messages,
        &root.join("a"),
        &[
            "--test-split-size",
            "2",
            "--prompt-style",
            "alpaca",
            "--histogram",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("turns per conversation:\n") && r.stdout.contains("trained tokens per"),
        "{}",
        r.stdout
    );
    let ds = Dataset::open(&root.join("a/train.safetensors")).unwrap();
    let s = ds.get(0);
    let full = tok.decode(&s.input_ids).unwrap();
    assert!(
        full.contains("### Instruction:\nBe brief.\n\nSay"),
        "{full}"
    );
}

fn ds_trained(ds: &Dataset) -> usize {
    (0..ds.len())
        .map(|i| {
            ds.get(i)
                .labels
                .iter()
                .skip(1)
                .filter(|l| **l != -100)
                .count()
        })
        .sum()
}

#[test]
fn bad_conversations_name_the_file_record_and_reason() {
    let root = scratch("conv-bad");
    let ck = chat_ck();
    let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let cases = [
        (
            r#"{"messages": [{"role": "user", "content": "a"}]}"#,
            "no assistant turn",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}"#,
            "message 2 (assistant) is empty",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}"#,
            "comes before any user turn",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]}"#,
            "must be 0 or 1",
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "b"}]}"#,
            "only text parts",
        ),
        (
            r#"{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
            "role \"robot\"",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"}, {"from": "observation", "value": "1"}, {"from": "gpt", "value": "b"}], "tools": "[{\"name\": \"f\"}]"}"#,
            "does not render tools",
        ),
    ];
    for (i, (bad, why)) in cases.iter().enumerate() {
        let data = root.join(format!("bad{i}.jsonl"));
        // Messages and ShareGPT records are told apart by the first record: keep the bad
        // one's kind first when it is ShareGPT.
        let text = if bad.contains("conversations") {
            format!("{bad}\n{}\n", good.replace("messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]", "conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"gpt\", \"value\": \"b\"}]"))
        } else {
            format!("{good}\n{bad}\n{good}\n")
        };
        std::fs::write(&data, text).unwrap();
        let dest = root.join(format!("out{i}"));
        let r = prepare(&ck, &data, &dest, &["--test-split-size", "1"]);
        assert!(!r.ok, "case {i} should fail");
        let record = if bad.contains("conversations") { 1 } else { 2 };
        let line = r.stderr.trim();
        assert!(
            line.contains(&format!("bad{i}.jsonl: record {record}: ")) && line.contains(why),
            "case {i}: {line}"
        );
        assert_eq!(line.lines().count(), 1, "case {i}: {line}");
        assert!(!dest.join("meta.json").exists());
        if bad.contains("conversations") {
            // Counted and skipped when asked.
            let r = prepare(
                &ck,
                &data,
                &dest,
                &["--test-split-size", "1", "--skip-invalid"],
            );
            assert!(!r.ok, "one record left cannot be split");
        }
    }

    // A template that raises (roles must alternate): the template's own words, with the
    // record.
    let strict = root.join("strict");
    copy_dir(&ck, &strict);
    let cfg_path = strict.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::json!(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    );
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let data = root.join("alternate.jsonl");
    std::fs::write(
        &data,
        format!("{good}\n{good}\n{}\n", r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#),
    )
    .unwrap();
    let r = prepare(
        &strict,
        &data,
        &root.join("alt"),
        &["--val-file", data.to_str().unwrap()],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("alternate.jsonl: record 3: ")
            && r.stderr.contains("roles must alternate"),
        "{}",
        r.stderr
    );

    // A record whose first reply starts past --max-seq-length is skipped and counted, never
    // kept with every label masked.
    let long = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "b"}}]}}"#,
        "word ".repeat(60)
    );
    let data = root.join("long.jsonl");
    std::fs::write(&data, format!("{good}\n{long}\n{good}\n{good}\n")).unwrap();
    let dest = root.join("long");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-file",
            data.to_str().unwrap(),
            "--destination-path",
            dest.to_str().unwrap(),
            "--max-seq-length",
            "24",
            "--val-file",
            data.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("skipped 1 record(s) whose first trained token lies past --max-seq-length 24 (records 2)"),
        "{}",
        r.stdout
    );
    let meta = DatasetMeta::read(&dest.join("meta.json")).unwrap();
    assert_eq!((meta.records_too_long, meta.train.count), (2, 3));

    // --prompt-style template needs a template.
    let r = prepare(
        &hf_fixture("neox_parallel_rot025"),
        &root.join("alternate.jsonl"),
        &root.join("none"),
        &[
            "--prompt-style",
            "template",
            "--val-file",
            root.join("alternate.jsonl").to_str().unwrap(),
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("no chat_template"),
        "{}",
        r.stderr
    );
}

#[test]
fn documents_are_packed_into_windows() {
    let root = scratch("conv-text");
    let docs: Vec<String> = (0..20)
        .map(|i| format!("Document {i} says hello to the world, number {i}."))
        .collect();
    let data = root.join("corpus.txt");
    std::fs::write(&data, docs.join("\n\n")).unwrap();
    let dest = root.join("d");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            chat_ck().to_str().unwrap(),
            "--data-file",
            data.to_str().unwrap(),
            "--destination-path",
            dest.to_str().unwrap(),
            "--max-seq-length",
            "32",
            "--test-split-size",
            "4",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("read 20 text records") && r.stdout.contains("packed into windows"),
        "{}",
        r.stdout
    );
    let tok = Tokenizer::from_dir(&chat_ck()).unwrap();
    let ds = Dataset::open(&dest.join("train.safetensors")).unwrap();
    let mut stream = Vec::new();
    for i in 0..ds.len() {
        let s = ds.get(i);
        assert!(i + 1 == ds.len() || s.input_ids.len() == 32, "window {i}");
        assert_eq!(
            s.labels,
            s.input_ids.iter().map(|&x| x as i32).collect::<Vec<_>>()
        );
        stream.extend(s.input_ids);
    }
    // 16 documents, each followed by EOS, nothing lost between windows.
    let eos = tok.eos_id.unwrap();
    assert_eq!(stream.iter().filter(|&&t| t == eos).count(), 16);
    let text = tok.decode(&stream).unwrap();
    assert_eq!(text.matches("says hello to the world").count(), 16);
    let meta = DatasetMeta::read(&dest.join("meta.json")).unwrap();
    assert_eq!(meta.data_format, Some(DataFormat::Text));
}

#[test]
fn the_adapter_carries_the_template_into_generate_lora() {
    let root = scratch("conv-adapter");
    let ck = root.join("ck");
    copy_dir(&chat_ck(), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", ck.to_str().unwrap()]).ok);
    let (messages, _) = conversations(&root);
    let ds = root.join("ds");
    let r = prepare(&ck, &messages, &ds, &["--test-split-size", "2"]);
    assert!(r.ok, "{}", r.stderr);
    let out = root.join("out");
    let r = run(
        FINETUNE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-dir",
            ds.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--quiet",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--max-iters",
            "4",
            "--eval-interval",
            "100",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let adapter = out.join("lit_model_lora_finetuned.safetensors");
    let (meta, _) =
        loratune_model::adapter::load_adapter(&adapter, &candle_core::Device::Cpu).unwrap();
    assert_eq!(meta.prompt_style.as_deref(), Some("template"));
    assert!(meta.chat_template_sha256.is_some());

    let gen = |bin: &str, extra: &[&str]| {
        let mut args = vec![
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            "Say 3.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        run(bin, &args)
    };
    let lora = ["--lora-path", adapter.to_str().unwrap()];
    let r = gen(GENERATE_LORA, &lora);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("prompt style template (as the adapter's training data"),
        "{}",
        r.stderr
    );
    // The flag wins, silently.
    let r = gen(
        GENERATE_LORA,
        &[&lora[..], &["--prompt-style", "none"]].concat(),
    );
    assert!(r.ok && !r.stderr.contains("prompt style"), "{}", r.stderr);
    // No adapter: the tokenizer's template, said.
    let r = gen(GENERATE, &[]);
    assert!(
        r.ok && r
            .stderr
            .contains("prompt style template (the tokenizer's chat template"),
        "{}",
        r.stderr
    );
    // Merged, the checkpoint keeps the adapter's rendering (prompt.json).
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
    let prompt = std::fs::read_to_string(merged.join("prompt.json")).unwrap();
    assert!(prompt.contains("\"template\""), "{prompt}");
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            merged.to_str().unwrap(),
            "--prompt",
            "Say 3.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ],
    );
    assert!(
        r.ok && r
            .stderr
            .contains("prompt style template (as the merged adapter's training data"),
        "{}",
        r.stderr
    );
}

/// LLaMA-Factory's demo data (fetched by scripts/fetch_assets.sh) through the real models'
/// templates: 500 `messages` records with content parts and loss weights through SmolLM2's;
/// the 300 ShareGPT conversations with tools through Qwen2.5's (which renders tools), and
/// through SmolLM2's (which does not) only the 109 without tools, the rest refused, then
/// skipped and counted with --skip-invalid.
#[test]
fn real_llamafactory_demo_data_prepares() {
    let vars = [
        "LORATUNE_SFT_DEMO",
        "LORATUNE_GLAIVE_DEMO",
        "LORATUNE_SMOLLM2_GGUF",
        "LORATUNE_QWEN25_GGUF",
    ];
    let Ok(v) = vars
        .iter()
        .map(std::env::var)
        .collect::<Result<Vec<_>, _>>()
    else {
        eprintln!(
            "skipped: {} not all set (the real-data check runs in .ci/run)",
            vars.join(", ")
        );
        return;
    };
    let (sft, glaive) = (Path::new(&v[0]), Path::new(&v[1]));
    let root = scratch("conv-real");
    let smol = root.join("smol");
    let qwen = root.join("qwen");
    loratune_model::gguf::import_tokenizer(Path::new(&v[2]), &smol).unwrap();
    loratune_model::gguf::import_tokenizer(Path::new(&v[3]), &qwen).unwrap();
    let go = |ck: &Path, data: &Path, dest: &str, extra: &[&str]| {
        let mut args = vec!["--max-seq-length", "2048", "--test-split-size", "20"];
        args.extend_from_slice(extra);
        prepare(ck, data, &root.join(dest), &args)
    };

    let r = go(&smol, sft, "sft", &[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("read 500 messages records, skipped 0; prompt style template"),
        "{}",
        r.stdout
    );

    let r = go(&qwen, glaive, "glaive-qwen", &[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("read 300 sharegpt records, skipped 0"),
        "{}",
        r.stdout
    );
    let meta = DatasetMeta::read(&root.join("glaive-qwen/meta.json")).unwrap();
    assert_eq!(meta.turns.map(|t| t.2), Some(14));

    let r = go(&smol, glaive, "glaive-smol", &[]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("glaive_toolcall_en_demo.json: record 1: ")
            && r.stderr.contains(
                "it has tools or tool calls, and the chat template does not render tools"
            ),
        "{}",
        r.stderr
    );
    let r = go(&smol, glaive, "glaive-smol", &["--skip-invalid"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("read 300 sharegpt records, skipped 191"),
        "{}",
        r.stdout
    );
    // One of the 109 opens with a user turn longer than the 2048-token limit.
    let meta = DatasetMeta::read(&root.join("glaive-smol/meta.json")).unwrap();
    assert_eq!(meta.records_too_long, 1);
    assert_eq!(meta.train.count + meta.val.count, 108);
}
