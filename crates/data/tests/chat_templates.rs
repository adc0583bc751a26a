//! The real instruct models' own chat templates (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-
//! Instruct, their GGUFs fetched by scripts/fetch_assets.sh) render conversations read from
//! every data format to exactly the token ids transformers gives, and train on exactly the
//! tokens transformers marks (fixture: scripts/make_chat_fixtures.py; for SmolLM2 the mask is
//! transformers' own `return_assistant_tokens_mask`). Skipped, saying so, when the assets are
//! not fetched; `.ci/run` fetches them.

use std::path::PathBuf;

use loratune_data::chat::{ChatFormat, Conversation, Rendering};
use loratune_data::prepare::encode_conversations;
use loratune_data::records::{read_records, Example, ReadOptions};
use loratune_model::Tokenizer;

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A scratch folder under the system's temporary folder, removed when dropped (also when
/// the test fails), so that test runs leave nothing behind.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("lt-chat-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

/// The tokenizer files of the GGUF at `$env`, or None (said) when it is not fetched.
fn tokenizer(env: &str, key: &str) -> Option<(Tokenizer, Scratch)> {
    let Ok(gguf) = std::env::var(env) else {
        eprintln!("skipped: {env} is not set (the real-model check runs in .ci/run)");
        return None;
    };
    let dir = Scratch::new(key);
    loratune_model::gguf::import_tokenizer(std::path::Path::new(&gguf), &dir).unwrap();
    Some((Tokenizer::from_dir(&dir).unwrap(), dir))
}

fn check(env: &str, key: &str) {
    let Some((tok, dir)) = tokenizer(env, key) else {
        return;
    };
    let format = ChatFormat::new(Rendering::Template, &tok).unwrap();
    let cases = fixture()["models"][key]["cases"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!cases.is_empty());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        // The record as a data file holds it: the format is detected from its keys.
        let file = dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, format!("{}\n", case["record"])).unwrap();
        let read = read_records(&file, ReadOptions::default()).unwrap();
        let conv = match &read.examples[0].1 {
            Example::Conversation(c) => c.clone(),
            Example::Instruction(r) => Conversation::from_record(r),
            Example::Text(_) => panic!("{name}: read as text"),
        };
        let (text, _) = format.render_trained(&conv).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{key} {name}: text");
        let (samples, report) = encode_conversations(
            &[(1, conv)],
            &format,
            &tok,
            -100,
            4096,
            &file,
            false,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.truncated, 0);
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(samples[0].input_ids, want, "{key} {name}: ids");
        let mask: Vec<bool> = case["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() == 1)
            .collect();
        let got: Vec<bool> = samples[0].labels.iter().map(|&l| l != -100).collect();
        assert_eq!(got, mask, "{key} {name}: trained tokens");
        for (l, id) in samples[0].labels.iter().zip(&want) {
            assert!(*l == -100 || *l == *id as i32);
        }
        eprintln!(
            "{key} {name}: {} tokens, {} trained, as transformers",
            want.len(),
            mask.iter().filter(|m| **m).count()
        );
    }
}

#[test]
fn smollm2_template_matches_transformers() {
    check("LORATUNE_SMOLLM2_GGUF", "smollm2");
}

#[test]
fn qwen25_template_with_tools_matches_transformers() {
    check("LORATUNE_QWEN25_GGUF", "qwen25");
}

#[test]
fn gemma3_base_has_no_template_and_says_so() {
    let Some((tok, _)) = tokenizer("LORATUNE_GEMMA3_GGUF", "gemma3") else {
        return;
    };
    assert!(tok.chat_template.is_none());
    let err = ChatFormat::new(Rendering::Template, &tok)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat_template"), "{err}");
}
