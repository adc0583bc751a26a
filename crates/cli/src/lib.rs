//! Plumbing shared by the binaries: turning errors into one-line messages and exit codes,
//! the `--device` and `--precision` flags, and memory reporting. Each binary in `src/bin/`
//! parses its flags and calls the libraries; no algorithm lives here.

pub mod generation;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Runs a command body; an error becomes `error: <message with its causes>` on stderr and exit
/// status 1.
pub fn run(body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
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
}

impl Precision {
    /// dtype of the frozen weights and activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32True => DType::F32,
            Precision::Bf16True => DType::BF16,
            Precision::F16True => DType::F16,
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
    Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("--device {s}: no usable CUDA device ({e})"))
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
