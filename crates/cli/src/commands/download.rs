//! download: fetch a model from the Hugging Face Hub into checkpoints/<org>/<name>/ (with
//! hf-hub: HF_TOKEN, HF_HOME and HF_ENDPOINT are honoured), then convert it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hf_hub::api::sync::ApiBuilder;
use loratune_model::convert::{convert_hf_checkpoint, ConvertOptions};

/// Download a model's weights, config and tokenizer from the Hugging Face Hub and convert
/// them for loratune.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// e.g. EleutherAI/pythia-160m
    #[arg(long, required_unless_present = "list")]
    repo_id: Option<String>,
    /// Parent folder: files go to <checkpoint-dir>/<repo-id>.
    #[arg(long, default_value = "checkpoints")]
    checkpoint_dir: PathBuf,
    /// Hub token for gated models (default: $HF_TOKEN, then the token file in $HF_HOME).
    #[arg(long)]
    access_token: Option<String>,
    /// Print the names of the models with a preset and exit.
    #[arg(long)]
    list: bool,
    /// Only download; do not run convert-hf-checkpoint.
    #[arg(long)]
    skip_convert: bool,
}

/// Files besides the weights that a checkpoint needs (taken when the repo has them).
const EXTRA_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| download(&Args::parse_from(argv)))
}

/// Which files of the repo to fetch: safetensors weights (and their index) if there are any,
/// else PyTorch .bin weights, plus config and tokenizer files.
fn select(files: &[String]) -> Result<Vec<String>> {
    let pick = |ext: &str, index: &str| -> Vec<String> {
        files
            .iter()
            .filter(|f| !f.contains('/') && (f.ends_with(ext) || f.as_str() == index))
            .cloned()
            .collect()
    };
    let mut out = pick(".safetensors", "model.safetensors.index.json");
    if out.is_empty() {
        out = pick(".bin", "pytorch_model.bin.index.json");
        out.retain(|f| f.starts_with("pytorch_model"));
    }
    if out.is_empty() {
        bail!("the repository has no *.safetensors or pytorch_model*.bin weights");
    }
    out.extend(
        EXTRA_FILES
            .iter()
            .filter(|f| files.iter().any(|x| x == *f))
            .map(|f| f.to_string()),
    );
    if !out.iter().any(|f| f == "config.json") {
        bail!("the repository has no config.json");
    }
    Ok(out)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    loratune_model::io::write_atomic_with(to, |w| {
        let mut f = std::fs::File::open(from)?;
        std::io::copy(&mut f, w).map(|_| ())
    })?;
    Ok(())
}

fn download(args: &Args) -> Result<()> {
    if args.list {
        for name in loratune_model::config::preset_names() {
            outln!("{name}");
        }
        return Ok(());
    }
    let repo_id = args.repo_id.clone().expect("required unless --list");
    if repo_id.split('/').count() != 2 {
        bail!("--repo-id {repo_id:?}: expected <org>/<name>, e.g. EleutherAI/pythia-160m");
    }
    let t0 = Instant::now();
    let dir = args.checkpoint_dir.join(&repo_id);
    let token = args
        .access_token
        .clone()
        .or_else(|| std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()));
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let api = builder
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let repo = api.model(repo_id.clone());
    let offline = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "could not reach the Hugging Face Hub at {endpoint} for {repo_id} ({e}); without \
             network access, copy the model's files into {} and run convert-hf-checkpoint \
             --checkpoint-dir {}",
            dir.display(),
            dir.display()
        )
    };
    let gated = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        (text.contains("401") || text.contains("403")).then(|| {
            anyhow::anyhow!(
                "{repo_id} is gated or private: the Hub answered {} without access; accept its \
                 license on {endpoint}/{repo_id} while logged in, then pass --access-token \
                 (or set HF_TOKEN) with a token of that account",
                if text.contains("403") { "403" } else { "401" }
            )
        })
    };
    let info = repo
        .info()
        .map_err(|e| gated(&e).unwrap_or_else(|| offline(&e)))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let files = select(&names).with_context(|| format!("{repo_id} at revision {}", info.sha))?;
    loratune_model::io::create_out_dir(&dir).context("--checkpoint-dir")?;
    crate::clean_stale_temps(&dir);
    for f in &files {
        let cached = repo
            .get(f)
            .map_err(|e| gated(&e).unwrap_or_else(|| offline(&e)))?;
        copy_atomic(&cached, &dir.join(f))
            .with_context(|| format!("copying {f} into {}", dir.display()))?;
    }
    outln!(
        "downloaded {} files of {repo_id} (revision {}) into {} in {}",
        files.len(),
        info.sha,
        dir.display(),
        crate::elapsed(t0)
    );
    if !args.skip_convert {
        let report = convert_hf_checkpoint(&dir, &ConvertOptions::default())
            .with_context(|| format!("converting {}", dir.display()))?;
        outln!(
            "converted {} tensors into {}",
            report.n_tensors,
            report.weights_path.display()
        );
    }
    Ok(())
}
