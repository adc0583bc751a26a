//! chat: an interactive conversation with a checkpoint (and optionally a LoRA adapter),
//! formatted by the tokenizer's chat template or a prompt style, history kept within the
//! context window. Replies stream to stdout; prompts and timings go to stderr.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use loratune_data::chat::{fit_history, ChatFormat, Message};
use loratune_model::Rng;

use crate::generation::{load_model, stream_reply, GenerateArgs, StyleFlag};
use crate::Precision;

/// Chat with a model. Type a message and Enter; `/reset` forgets the conversation, `/exit`
/// (or end of input) quits.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    checkpoint_dir: PathBuf,
    /// A LoRA adapter from finetune-lora, merged before chatting.
    #[arg(long)]
    lora_path: Option<PathBuf>,
    /// template (the checkpoint's chat template), alpaca, plain, chatml or none; auto: what
    /// the adapter was trained with, else the chat template when the tokenizer has one, else
    /// alpaca.
    #[arg(long, default_value = "auto", value_parser = crate::generation::parse_rendering)]
    prompt_style: StyleFlag,
    /// A system message placed before the conversation.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Quantize the checkpoint's linear weights to this ggml type as they are loaded.
    #[arg(long, value_parser = crate::parse_quantize)]
    quantize: Option<loratune_model::quant::QuantKind>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Use the adapter even if it was trained on other base weights (a warning instead of an
    /// error).
    #[arg(long)]
    force: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| chat(Args::parse_from(argv)))
}

fn chat(args: Args) -> Result<()> {
    let gen_args = GenerateArgs {
        prompt: String::new(),
        input: String::new(),
        checkpoint_dir: args.checkpoint_dir.clone(),
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        num_samples: 1,
        precision: args.precision,
        quantize: args.quantize,
        device: args.device.clone(),
        prompt_style: args.prompt_style,
        system: None,
        truncate_prompt: false,
    };
    let sampling = crate::generation::sampling(args.temperature, args.top_k, args.top_p)?;
    let (model, tok, trained) = load_model(&gen_args, args.lora_path.as_deref(), args.force)?;
    let (format, note) =
        crate::generation::resolve_rendering(args.prompt_style.0, trained.as_ref(), &tok)?;
    let add_bos = format.adds_bos() && tok.add_bos;
    let block = model.config.block_size;
    if args.max_new_tokens >= block {
        bail!(
            "--max-new-tokens {} leaves no room for a prompt in the {block}-token context",
            args.max_new_tokens
        );
    }
    if let Some(note) = note {
        errln!("{note}");
    }
    let interactive = std::io::stdin().is_terminal();
    errln!(
        "chatting with {} ({}); /reset forgets, /exit quits",
        model.config.name,
        match &format {
            ChatFormat::Template(_) => "the tokenizer's chat template".to_string(),
            ChatFormat::Style { style, .. } => format!("{} prompts", style.name()),
        }
    );
    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &args.system {
        history.push(Message::new("system", s));
    }
    let mut rng = Rng::new(args.seed);
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        if interactive {
            err!(">> You: ");
        }
        buf.clear();
        if stdin.read_until(b'\n', &mut buf).context("reading stdin")? == 0 {
            break;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            errln!("error: that line is not UTF-8 text; it was ignored");
            continue;
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                errln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", text));
        let fitted = fit_history(&format, &history, block, args.max_new_tokens, |p| {
            Ok(tok.encode(p, add_bos, false)?.len())
        })?;
        let Some((prompt, start)) = fitted else {
            history.pop();
            errln!(
                "error: that message does not fit the {block}-token context with --max-new-tokens \
                 {}; send a shorter one",
                args.max_new_tokens
            );
            continue;
        };
        if start > 0 {
            // Older turns no longer fit: forget them for good.
            let system: Vec<Message> = history
                .iter()
                .filter(|m| m.role == "system")
                .cloned()
                .collect();
            let turns: Vec<Message> = history
                .iter()
                .filter(|m| m.role != "system")
                .cloned()
                .collect();
            history = system
                .into_iter()
                .chain(turns[start..].iter().cloned())
                .collect();
            errln!("(dropped the oldest turns to fit the context)");
        }
        let ids = tok.encode(&prompt, add_bos, false)?;
        let reply = stream_reply(&model, &tok, &ids, args.max_new_tokens, &sampling, &mut rng)?;
        if crate::stdout_closed() {
            break;
        }
        history.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}
