//! chat end to end: a one-turn chat answers exactly what generate answers for the same prompt;
//! history is kept, and cut to the context when it grows; a message that cannot fit is
//! refused without ending the session; with the real SmolLM2 (CI), the tokenizer's chat
//! template is used and a follow-up question is answered from the history.

mod common;

use common::*;

const CHAT: &str = env!("CARGO_BIN_EXE_chat");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");

fn fixture_checkpoint(test: &str) -> String {
    let root = scratch(test);
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_untied"), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", ck.to_str().unwrap()]).ok);
    ck.to_str().unwrap().to_string()
}

#[test]
fn one_turn_equals_generate_and_history_is_bounded() {
    let ck = fixture_checkpoint("chat-fixture");
    let greedy = [
        "--checkpoint-dir",
        ck.as_str(),
        "--prompt-style",
        "plain",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
    ];
    let mut gen_args = greedy.to_vec();
    gen_args.extend(["--prompt", "Count to 3."]);
    let g = run(GENERATE, &gen_args);
    assert!(g.ok, "{}", g.stderr);
    let c = run_with_stdin(CHAT, &greedy, "Count to 3.\n/exit\nnever read\n");
    assert!(c.ok, "{}", c.stderr);
    assert_eq!(c.stdout, g.stdout, "a one-turn chat is a generate call");
    assert_eq!(c.stderr.matches("tokens; time to first token").count(), 1);

    // The fixture's context is 64 tokens, 20 of them kept for the reply: by the third
    // exchange the first no longer fits.
    let c = run_with_stdin(CHAT, &greedy, "a\nb\nc\nd\n");
    assert!(c.ok, "{}", c.stderr);
    assert_eq!(c.stdout.lines().count(), 4, "{}", c.stdout);
    assert!(
        c.stderr.contains("dropped the oldest turns"),
        "{}",
        c.stderr
    );

    // Too long for the context: refused, and the next message is still answered.
    let long = "word ".repeat(200);
    let c = run_with_stdin(CHAT, &greedy, &format!("{long}\nshort\n"));
    assert!(c.ok, "{}", c.stderr);
    assert!(
        c.stderr.contains("does not fit the 64-token context"),
        "{}",
        c.stderr
    );
    assert_eq!(c.stdout.lines().count(), 1, "{}", c.stdout);

    // /reset forgets: the same question after a reset gets the first answer again.
    let c = run_with_stdin(CHAT, &greedy, "Count to 3.\n/reset\nCount to 3.\n");
    let lines: Vec<&str> = c.stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], lines[1]);

    let r = run_with_stdin(
        CHAT,
        &[
            "--checkpoint-dir",
            ck.as_str(),
            "--prompt-style",
            "template",
        ],
        "",
    );
    assert!(
        !r.ok && r.stderr.contains("no chat_template"),
        "{}",
        r.stderr
    );
    let r = run_with_stdin(
        CHAT,
        &["--checkpoint-dir", ck.as_str(), "--prompt-style", "vicuna"],
        "",
    );
    assert!(!r.ok && r.stderr.contains("vicuna"), "{}", r.stderr);
}

#[test]
fn real_smollm2_chats_with_its_template_and_remembers() {
    let Ok(path) = std::env::var("LORATUNE_SMOLLM2_GGUF") else {
        eprintln!("LORATUNE_SMOLLM2_GGUF is not set: the real-model check runs in .ci/run");
        return;
    };
    let root = scratch("chat-smollm2");
    let ck = root.join("smol");
    let r = run(
        CONVERT,
        &["--gguf", &path, "--checkpoint-dir", ck.to_str().unwrap()],
    );
    assert!(r.ok, "{}", r.stderr);
    let c = run_with_stdin(
        CHAT,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
        ],
        "What is the capital of France?\nAnd of Germany?\n",
    );
    assert!(c.ok, "{}", c.stderr);
    assert!(c.stderr.contains("chat template"), "{}", c.stderr);
    let lines: Vec<&str> = c.stdout.lines().collect();
    assert!(lines[0].contains("Paris"), "{}", c.stdout);
    // "And of Germany?" only makes sense with the first exchange in the prompt.
    assert!(lines[1].contains("Berlin"), "{}", c.stdout);
}
