//! Plumbing shared by the binaries: turning errors into one-line messages and exit codes,
//! output that never panics, stop signals, the `--device` and `--precision` flags, and
//! memory reporting. Each command in `commands/` parses its flags and calls the libraries;
//! no algorithm lives here. `src/bin/` holds one thin binary per command plus `loratune`,
//! which runs any of them.

#[macro_use]
pub mod output;
pub mod commands;
pub mod generation;
pub mod signals;

pub use output::{stdout_closed, write_stderr, write_stdout};

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use loratune_model::quant::{QuantKind, QUANTIZE_KINDS};

/// Runs a command body; an error becomes `error: <message with its causes>` on stderr and exit
/// status 1.
pub fn run(body: impl FnOnce() -> Result<()>) -> ExitCode {
    run_with_code(|| body().map(|()| ExitCode::SUCCESS))
}

/// [`run`] for a body that chooses its own exit status.
pub fn run_with_code(body: impl FnOnce() -> Result<ExitCode>) -> ExitCode {
    tune_allocator();
    ignore_file_size_signal();
    match body() {
        Ok(code) => code,
        Err(e) => {
            errln!("error: {}", one_line(&message(&e)));
            ExitCode::FAILURE
        }
    }
}

/// A file-size limit (`ulimit -f`) kills a process with SIGXFSZ by default, with no message
/// and a temporary file left behind. Ignored, the write fails with EFBIG instead, which the
/// atomic writers report (naming the file) after removing their temporary file.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Removes the temporary files that killed runs left in `dir`, and says so.
pub fn clean_stale_temps(dir: &Path) {
    let removed = loratune_model::io::remove_stale_temps(dir);
    if !removed.is_empty() {
        let names: Vec<String> = removed
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        errln!(
            "removed {} temporary file(s) that an interrupted run left in {}: {}",
            removed.len(),
            dir.display(),
            names.join(", ")
        );
    }
}

/// Refuses an output folder that is an input folder (writing there would replace the
/// input's files), and, without `overwrite`, one that already holds any of `outputs`.
pub fn check_out_dir(
    out: &Path,
    inputs: &[(&str, &Path)],
    outputs: &[&str],
    overwrite: bool,
) -> Result<()> {
    for (flag, input) in inputs {
        if loratune_model::io::same_path(out, input) {
            bail!(
                "--out-dir {} is the {flag} folder: writing there would replace its files; \
                 choose another folder",
                out.display()
            );
        }
    }
    if out.exists() && !out.is_dir() {
        bail!("--out-dir {}: is a file, expected a folder", out.display());
    }
    let present: Vec<&str> = outputs
        .iter()
        .copied()
        .filter(|f| out.join(f).exists())
        .collect();
    if !present.is_empty() && !overwrite {
        bail!(
            "--out-dir {} already holds {}; pass --overwrite to replace them",
            out.display(),
            present.join(", ")
        );
    }
    Ok(())
}

/// Training and generation allocate and free the same activation-sized buffers every step.
/// glibc serves big ones with fresh mmaps and hands freed memory back to the kernel, so every
/// step page-faults its buffers in again (7% of a training step, measured). Keep them in
/// the heap instead; peak memory is unchanged because the same sizes are reused.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any threads start work.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// An error with its causes, as `{e:#}` prints it, in this CLI's terms: the libraries name
/// a setting by its field in backticks (`` `micro_batch_size` ``), which becomes its flag
/// (`--micro-batch-size`, see [`flags`]), and a dataset folder that was never prepared says
/// which command prepares it.
pub fn message(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|cause| match not_prepared(cause) {
            Some((meta, dir)) => format!(
                "{} is missing: run prepare-alpaca --destination-path {} first (or it was \
                 interrupted)",
                meta.display(),
                dir.display()
            ),
            None => cause.to_string(),
        })
        .collect();
    flags(&parts.join(": "))
}

/// The files of a `NotPrepared` dataset error, also when the train crate carries it.
fn not_prepared<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<(&'a Path, &'a Path)> {
    let data = match cause.downcast_ref::<loratune_train::Error>() {
        Some(loratune_train::Error::Data(e)) => Some(e),
        _ => cause.downcast_ref::<loratune_data::Error>(),
    };
    match data? {
        loratune_data::Error::NotPrepared { meta, dir } => Some((meta, dir)),
        _ => None,
    }
}

/// `msg` with each setting the libraries name in backticks (`` `max_seq_length` ``: a
/// lower-case field name) written as its flag (`--max-seq-length`); anything else in
/// backticks stays as it is.
pub fn flags(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find('`') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let name = after.find('`').map(|j| &after[..j]).filter(|n| {
            n.starts_with(|c: char| c.is_ascii_lowercase())
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
        match name {
            Some(n) => {
                out.push_str("--");
                out.push_str(&n.replace('_', "-"));
                rest = &after[n.len() + 1..];
            }
            None => {
                out.push('`');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// An error message without the backtrace frames candle appends when RUST_BACKTRACE is set.
fn one_line(msg: &str) -> String {
    msg.lines()
        .filter(|l| {
            let t = l.trim_start();
            let frame = t
                .split_once(": ")
                .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
            !(frame || t.starts_with("at ") || t.is_empty())
        })
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--quantize TYPE`'s parser: a ggml type the linear weights can be quantized to.
pub fn parse_quantize(s: &str) -> std::result::Result<QuantKind, String> {
    QuantKind::parse_target(s).map_err(|_| format!("expected one of {}", QUANTIZE_KINDS.join(", ")))
}

/// `--precision`, Lit-GPT's names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Precision {
    #[value(name = "32-true")]
    #[serde(rename = "32-true")]
    F32True,
    #[value(name = "bf16-true")]
    #[serde(rename = "bf16-true")]
    Bf16True,
    #[value(name = "16-true")]
    #[serde(rename = "16-true")]
    F16True,
    /// bf16 linear and embedding weights; norms, residual stream, softmax and loss in f32.
    #[value(name = "bf16-mixed")]
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    #[value(name = "16-mixed")]
    #[serde(rename = "16-mixed")]
    F16Mixed,
}

impl Precision {
    /// dtype of the frozen linear and embedding weights.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32True => DType::F32,
            Precision::Bf16True | Precision::Bf16Mixed => DType::BF16,
            Precision::F16True | Precision::F16Mixed => DType::F16,
        }
    }

    /// Loads a converted checkpoint folder in this precision; `quantize` (`--quantize`)
    /// quantizes its dense linear weights as they are read.
    pub fn load_model(
        self,
        dir: &std::path::Path,
        device: &Device,
        quantize: Option<QuantKind>,
    ) -> Result<loratune_model::Gpt> {
        let activations = match self {
            Precision::Bf16Mixed | Precision::F16Mixed => Some(DType::F32),
            _ => None,
        };
        let opts = loratune_model::LoadOptions {
            weights: self.dtype(),
            activations,
            quantize,
        };
        // The CPU's bf16 kernel (and a bad LORATUNE_BF16_KERNEL) is settled before loading.
        if let Some(choice) = self.cpu_bf16_kernel(device)? {
            errln!(
                "CPU bf16 products: {} ({})",
                choice.kernel.name(),
                choice.reason
            );
        }
        let model = loratune_model::Gpt::open(dir, &opts, device)?;
        let q = model.quantization();
        if let Some(kind) = quantize {
            if !q.dense_names.is_empty() {
                errln!(
                    "warning: --quantize {kind}: {} of {} linears kept dense, their rows are not \
                     whole {kind} blocks of {} values (first: {})",
                    q.dense_names.len(),
                    q.quantized + q.dense,
                    kind.block_size(),
                    q.dense_names[0]
                );
            }
        }
        Ok(model)
    }

    /// The kernel that multiplies many rows against bf16 weights, where this precision
    /// has them on the CPU (chosen once per process; `LORATUNE_BF16_KERNEL` checked).
    pub fn cpu_bf16_kernel(
        self,
        device: &Device,
    ) -> Result<Option<&'static loratune_model::Bf16KernelChoice>> {
        if device.is_cpu() && self.dtype() == DType::BF16 {
            Ok(Some(loratune_model::bf16_kernel()?))
        } else {
            Ok(None)
        }
    }

    /// Lit-GPT's default: bf16-true on a GPU, 32-true on a CPU.
    pub fn default_for(device: &Device) -> Precision {
        if device.is_cuda() {
            Precision::Bf16True
        } else {
            Precision::F32True
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32True => "32-true",
            Precision::Bf16True => "bf16-true",
            Precision::F16True => "16-true",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "16-mixed",
        }
    }
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N`. Asking for CUDA where this build or this
/// machine has none is an error, not a crash.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
        None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device {s}: this build of loratune has no CUDA support \
             (build with `cargo build --release --features cuda`)"
        );
    }
    // cudarc panics instead of erroring when the driver is missing or broken; turn that into
    // the same one-line error as any other failure.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => bail!("--device {s}: no usable CUDA device ({e})"),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the CUDA driver could not be initialised");
            bail!(
                "--device {s}: no usable CUDA device ({}); is the NVIDIA driver installed and \
                 is libcuda.so.1 on LD_LIBRARY_PATH?",
                one_line(why)
            )
        }
    }
}

pub use loratune_model::io::peak_rss_mib;

/// "1.2 s" / "340 ms" since `t`.
pub fn elapsed(t: Instant) -> String {
    let s = t.elapsed().as_secs_f64();
    if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_flags() {
        assert_eq!(
            flags("`micro_batch_size` 3 does not divide `batch_size` 8"),
            "--micro-batch-size 3 does not divide --batch-size 8"
        );
        assert_eq!(
            flags("limit (`max_record_bytes`)"),
            "limit (--max-record-bytes)"
        );
        // Not a setting name, or an unmatched backtick: left alone.
        assert_eq!(flags("`Gpt::load` and `a"), "`Gpt::load` and `a");
        let e = anyhow::Error::new(loratune_data::Error::NotPrepared {
            meta: "d/meta.json".into(),
            dir: "d".into(),
        })
        .context("opening the dataset");
        assert_eq!(
            message(&e),
            "opening the dataset: d/meta.json is missing: run prepare-alpaca --destination-path d \
             first (or it was interrupted)"
        );
    }

    #[test]
    fn backtraces_are_dropped_from_messages() {
        let msg = "x.gguf: bad (unknown dtype 20\n   0: bt\n             at src/error.rs:260:25\n  1: from_u32\n)";
        assert_eq!(one_line(msg), "x.gguf: bad (unknown dtype 20 )");
    }

    #[test]
    fn device_flag() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("no CUDA support"), "{err}");
        }
    }
}
