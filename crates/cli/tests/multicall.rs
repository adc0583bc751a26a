//! The multi-call `loratune` binary runs every command, by subcommand or by the name it is
//! called through, and refuses unknown commands clearly.

mod common;

use common::*;

const LORATUNE: &str = env!("CARGO_BIN_EXE_loratune");

#[test]
fn runs_each_command_by_subcommand_and_by_link_name() {
    let r = run(LORATUNE, &["--help"]);
    assert!(r.ok, "{}", r.stderr);
    for cmd in [
        "download",
        "convert-hf-checkpoint",
        "prepare-alpaca",
        "finetune-lora",
        "generate",
        "generate-lora",
        "merge-lora",
        "chat",
        "export",
        "logits",
    ] {
        assert!(r.stdout.contains(cmd), "{cmd} missing from {}", r.stdout);
        let h = run(LORATUNE, &[cmd, "--help"]);
        assert!(h.ok && h.stdout.contains("--"), "{cmd}: {}", h.stderr);
    }
    // A real run through the subcommand: converting a fixture.
    let root = scratch("multicall");
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    let r = run(
        LORATUNE,
        &[
            "convert-hf-checkpoint",
            "--checkpoint-dir",
            ck.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(ck.join("lit_model.safetensors").is_file());
    // Called through a link named after a command.
    let link = root.join("generate");
    std::os::unix::fs::symlink(LORATUNE, &link).unwrap();
    let r = run(link.to_str().unwrap(), &["--help"]);
    assert!(r.ok && r.stdout.contains("--prompt"), "{}", r.stderr);

    let r = run(LORATUNE, &["train"]);
    assert!(
        !r.ok && r.stderr.contains("unknown command \"train\""),
        "{}",
        r.stderr
    );
    let r = run(LORATUNE, &[]);
    assert!(
        !r.ok && r.stderr.contains("usage: loratune"),
        "{}",
        r.stderr
    );
}
