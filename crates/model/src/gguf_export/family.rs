//! Which configs each llama.cpp graph computes, and the `<arch>.*` hyperparameters it reads.
//! A config whose layout llama.cpp's graph for its family fixes differently (a norm, a bias,
//! a window, a query scale) is refused here, before anything is written, naming what differs.

use candle_core::quantized::gguf_file::Value;

use crate::config::{Config, MlpKind, NormKind, QkNorm, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf_arch::Arch;

pub(super) fn refuse(cfg: &Config, why: &str) -> Error {
    Error::Input(format!(
        "{} cannot be exported to GGUF: {why} (supported: the {} layouts)",
        cfg.repo_id(),
        Arch::names()
    ))
}

/// The llama.cpp architecture of `cfg`, or why its graph cannot compute `cfg`.
pub(super) fn arch_of(cfg: &Config) -> Result<Arch> {
    let arch = Arch::from_hf(crate::export::hf_arch(cfg)?);
    match arch {
        Arch::GptNeox => check_gptneox(cfg)?,
        Arch::Falcon => check_falcon(cfg)?,
        Arch::Phi3 => check_phi3(cfg)?,
        Arch::StableLm => check_stablelm(cfg)?,
        Arch::Olmo2 => check_olmo2(cfg)?,
        Arch::Gemma2 | Arch::Gemma3 => {
            check_full_rotary_rms(cfg)?;
            check_gemma(cfg, arch)?
        }
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => check_llama_like(cfg, arch)?,
    }
    Ok(arch)
}

fn check_full_rotary_rms(cfg: &Config) -> Result<()> {
    if cfg.rotary_percentage != 1.0 || cfg.norm != NormKind::RmsNorm {
        return Err(refuse(cfg, "partial rotary or a norm other than RMSNorm"));
    }
    Ok(())
}

/// llama.cpp's `llama`, `qwen2` and `qwen3` graphs: RMSNorm, a SwiGLU MLP, full rotary, qkv
/// biases in qwen2 only (optional), q/k norms in qwen3 only, no sliding window, rope scaling
/// linear or Llama 3's in `llama` only.
fn check_llama_like(cfg: &Config, arch: Arch) -> Result<()> {
    check_full_rotary_rms(cfg)?;
    if cfg.mlp != MlpKind::Llama || cfg.norm_unit_offset {
        return Err(refuse(cfg, "it is not a Llama MLP with plain RMSNorm"));
    }
    if cfg.sliding_window.is_some() && !(arch == Arch::Llama && window_everywhere(cfg)) {
        return Err(refuse(
            cfg,
            "it has a sliding window on some layers only, or outside the llama layout",
        ));
    }
    match (&cfg.rope_scaling, arch) {
        (None, _)
        | (Some(RopeScaling::Linear { .. } | RopeScaling::Llama3 { .. }), Arch::Llama) => {}
        _ => {
            return Err(refuse(
                cfg,
                "rope scaling other than linear or Llama 3's (llama layout only)",
            ))
        }
    }
    check_no_gemma_features(cfg, arch)?;
    if cfg.attn_bias && arch == Arch::Llama {
        return Err(refuse(cfg, "a llama layout with qkv biases"));
    }
    if cfg.qk_norm.is_some() != (arch == Arch::Qwen3) {
        return Err(refuse(cfg, "q/k norms outside qwen3"));
    }
    Ok(())
}

/// A sliding window on every layer (Mistral v0.1). llama.cpp's `llama` graph has none, but
/// within the window full attention is the same computation, so the export states the window
/// as the context length ([`context_length`]).
fn window_everywhere(cfg: &Config) -> bool {
    cfg.sliding_window.is_some()
        && cfg.sliding_window_layers == (0..cfg.n_layer).collect::<Vec<_>>()
}

/// The `context_length` written: the model's, or for a `llama` model with a sliding window on
/// every layer (Mistral v0.1) the window, the longest context llama.cpp computes as the model
/// does. (phi3 keeps its own window key, which llama.cpp reads.)
pub(super) fn context_length(cfg: &Config, arch: Arch) -> usize {
    match cfg.sliding_window {
        Some(w) if arch == Arch::Llama && window_everywhere(cfg) => w.min(cfg.block_size),
        _ => cfg.block_size,
    }
}

/// llama.cpp's `stablelm` graph as StableLM 2 1.6B / 3B use it: LayerNorm with biases before
/// attention and MLP, unbiased linears with optional q/k/v biases, a SwiGLU MLP, rotary on
/// the first `rope.dimension_count` channels. (The 12B's per-head q/k LayerNorms and parallel
/// residual are not a layout loratune computes.)
fn check_stablelm(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::LayerNorm
        || cfg.mlp != MlpKind::Llama
        || cfg.bias
        || cfg.parallel_residual
        || cfg.shared_attention_norm
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
    {
        return Err(refuse(
            cfg,
            "a StableLM layout without LayerNorm, a SwiGLU MLP, unbiased linears and a \
             sequential residual",
        ));
    }
    check_rotary(cfg)?;
    check_no_gemma_features(cfg, Arch::StableLm)?;
    check_no_window_or_scaling(cfg, Arch::StableLm)
}

/// llama.cpp's `olmo2` graph: no norm before attention or MLP, RMSNorm after each, RMSNorm
/// over all of q and of k before rotary, unbiased linears, a SwiGLU MLP, full rotary, heads
/// of n_embd / n_head channels.
fn check_olmo2(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::RmsNorm
        || cfg.norm_unit_offset
        || cfg.mlp != MlpKind::Llama
        || cfg.bias
        || cfg.attn_bias
        || cfg.parallel_residual
        || cfg.pre_norm
        || !cfg.post_attention_norm
        || !cfg.post_mlp_norm
        || cfg.qk_norm != Some(QkNorm::Whole)
        || cfg.rotary_percentage != 1.0
        || cfg.head_size * cfg.n_head != cfg.n_embd
    {
        return Err(refuse(
            cfg,
            "an OLMo 2 layout without post-norms only, whole q/k RMSNorms, unbiased linears, \
             full rotary or heads of n_embd / n_head channels",
        ));
    }
    check_no_gemma_features(cfg, Arch::Olmo2)?;
    check_no_window_or_scaling(cfg, Arch::Olmo2)
}

/// The rotary channels per head (`rope.dimension_count`).
pub(super) fn n_rot(cfg: &Config) -> usize {
    (cfg.rotary_percentage * cfg.head_size as f64) as usize
}

/// Partial rotary as llama.cpp reads it: a whole, even number of channels per head.
fn check_rotary(cfg: &Config) -> Result<()> {
    let rot = cfg.rotary_percentage * cfg.head_size as f64;
    if rot.fract() != 0.0 || !(rot as usize).is_multiple_of(2) {
        return Err(refuse(
            cfg,
            &format!("its rotary part ({rot} channels per head) is not an even whole number"),
        ));
    }
    Ok(())
}

/// Gemma's features, which no other llama.cpp graph reads: scaled embeddings, post-norms
/// (olmo2's graph has them too), a query scale, logit soft-capping.
fn check_no_gemma_features(cfg: &Config, arch: Arch) -> Result<()> {
    let post_norms = arch != Arch::Olmo2 && (cfg.post_attention_norm || cfg.post_mlp_norm);
    if cfg.scale_embeddings
        || post_norms
        || cfg.attention_scores_scalar.is_some()
        || cfg.attention_logit_softcapping.is_some()
        || cfg.final_logit_softcapping.is_some()
    {
        return Err(refuse(
            cfg,
            &format!(
                "scaled embeddings, post-norms, a query scale or soft-capping in a {} layout",
                arch.key()
            ),
        ));
    }
    Ok(())
}

/// llama.cpp's `gptneox` graph (Pythia, RedPajama-INCITE, StableLM-Alpha): LayerNorm with
/// biases, biased linears, one KV head per query head, rotary on the first
/// `rope.dimension_count` channels, parallel or sequential residual with two norms, a GELU MLP
/// (llama.cpp computes GELU with the tanh approximation, as its own converter's files do).
fn check_gptneox(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::LayerNorm
        || cfg.mlp != MlpKind::GptNeox
        || !cfg.bias
        || cfg.n_query_groups != cfg.n_head
        || cfg.shared_attention_norm
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
    {
        return Err(refuse(
            cfg,
            "a GPT-NeoX layout without LayerNorm, biases, a GELU MLP, two norms per block or \
             one KV head per query head",
        ));
    }
    check_rotary(cfg)?;
    check_no_gemma_features(cfg, Arch::GptNeox)?;
    check_no_window_or_scaling(cfg, Arch::GptNeox)
}

/// llama.cpp's `falcon` graph (Falcon 7B / 40B / 180B): LayerNorm with biases, unbiased
/// linears, a GELU MLP, attention and MLP in parallel from one shared norm or two, rotary on
/// every channel.
fn check_falcon(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::LayerNorm
        || cfg.mlp != MlpKind::GptNeox
        || cfg.bias
        || cfg.attn_bias
        || !cfg.parallel_residual
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
        || cfg.rotary_percentage != 1.0
    {
        return Err(refuse(
            cfg,
            "a Falcon layout without LayerNorm, unbiased linears, a GELU MLP, parallel attention \
             or full rotary",
        ));
    }
    check_no_gemma_features(cfg, Arch::Falcon)?;
    check_no_window_or_scaling(cfg, Arch::Falcon)
}

/// Neither a sliding window nor rope scaling: the gptneox, falcon, stablelm and olmo2 graphs
/// here read neither.
fn check_no_window_or_scaling(cfg: &Config, arch: Arch) -> Result<()> {
    if cfg.rope_scaling.is_some() || cfg.sliding_window.is_some() {
        return Err(refuse(
            cfg,
            &format!(
                "rope scaling or a sliding window in a {} layout",
                arch.key()
            ),
        ));
    }
    Ok(())
}

/// llama.cpp's `phi3` graph (Phi-3, Phi-3.5, Phi-4-mini): RMSNorm, unbiased linears, the
/// fused qkv and gate/up projections, partial rotary, LongRoPE factors as tensors. Its sliding
/// window key is written as the converter writes it, though llama.cpp currently ignores it
/// (full attention; the same only within the window).
fn check_phi3(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::RmsNorm
        || cfg.norm_unit_offset
        || cfg.mlp != MlpKind::Llama
        || cfg.bias
        || cfg.attn_bias
        || cfg.parallel_residual
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
    {
        return Err(refuse(
            cfg,
            "a Phi-3 layout with biases, another norm or MLP, or q/k norms",
        ));
    }
    check_rotary(cfg)?;
    check_no_gemma_features(cfg, Arch::Phi3)?;
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Longrope { .. }) => Ok(()),
        Some(_) => Err(refuse(
            cfg,
            "rope scaling other than LongRoPE in a phi3 layout",
        )),
    }
}

/// What llama.cpp's `gemma2` / `gemma3` graphs fix rather than read: the gated GELU MLP, 1 + w
/// norms before and after attention and MLP, scaled embeddings, q/k norms in Gemma 3 only,
/// queries scaled by 1/sqrt(head_size) (1/sqrt(n_embd / n_head) in the 27B models, 46 and 62
/// layers), local layers every other one (Gemma 2) or five of six (Gemma 3), attention
/// soft-capping in Gemma 2 only. A config that differs cannot be expressed.
fn check_gemma(cfg: &Config, arch: Arch) -> Result<()> {
    if cfg.mlp != MlpKind::Gemma
        || !cfg.norm_unit_offset
        || !cfg.scale_embeddings
        || !cfg.pre_norm
        || !cfg.post_attention_norm
        || !cfg.post_mlp_norm
    {
        return Err(refuse(
            cfg,
            "a Gemma layout without Gemma's MLP, 1 + w norms, post-norms or scaled embeddings",
        ));
    }
    if cfg.attn_bias || cfg.bias {
        return Err(refuse(cfg, "a Gemma layout with biases"));
    }
    let qk = if arch == Arch::Gemma3 {
        Some(QkNorm::PerHead)
    } else {
        None
    };
    if cfg.qk_norm != qk {
        return Err(refuse(cfg, "q/k norms other than Gemma's"));
    }
    let big =
        (arch == Arch::Gemma2 && cfg.n_layer == 46) || (arch == Arch::Gemma3 && cfg.n_layer == 62);
    let scalar = if big {
        cfg.n_embd / cfg.n_head
    } else {
        cfg.head_size
    } as f64;
    if cfg.attention_scores_scalar.unwrap_or(cfg.head_size as f64) != scalar {
        return Err(refuse(
            cfg,
            &format!(
                "queries are scaled by 1/sqrt({}), llama.cpp's {} graph by 1/sqrt({scalar})",
                cfg.attention_scores_scalar.unwrap_or(cfg.head_size as f64),
                arch.key()
            ),
        ));
    }
    let local: Vec<usize> = (0..cfg.n_layer)
        .filter(|&i| match arch {
            Arch::Gemma2 => i % 2 == 0,
            _ => (i + 1) % 6 != 0,
        })
        .collect();
    let ok = match (arch, cfg.sliding_window) {
        (_, Some(_)) => cfg.sliding_window_layers == local,
        (Arch::Gemma3, None) => true,
        _ => false,
    };
    if !ok {
        return Err(refuse(
            cfg,
            &format!(
                "its sliding-window layers {:?} are not llama.cpp's {} pattern {local:?}",
                cfg.sliding_window_layers,
                arch.key()
            ),
        ));
    }
    if arch == Arch::Gemma3 && cfg.attention_logit_softcapping.is_some() {
        return Err(refuse(cfg, "attention soft-capping in a gemma3 layout"));
    }
    match (&cfg.rope_scaling, arch) {
        (None, _) | (Some(RopeScaling::Linear { .. }), Arch::Gemma3) => {}
        _ => return Err(refuse(cfg, "rope scaling other than Gemma 3's linear")),
    }
    if arch == Arch::Gemma2 && cfg.rope_local_base.is_some_and(|b| b != cfg.rope_base) {
        return Err(refuse(
            cfg,
            "a local rotary base in a gemma2 layout (llama.cpp uses the global one)",
        ));
    }
    Ok(())
}

/// The architecture's hyperparameters as llama.cpp reads them (`<arch>.*` keys).
pub(super) fn hparams(cfg: &Config, arch: Arch) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{}.{s}", arch.key());
    let u = |x: usize| Value::U32(x as u32);
    let mut out = vec![
        (k("context_length"), u(context_length(cfg, arch))),
        (k("embedding_length"), u(cfg.n_embd)),
        (k("block_count"), u(cfg.n_layer)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.n_head)),
        (k("attention.head_count_kv"), u(cfg.n_query_groups)),
        (k("rope.freq_base"), Value::F32(cfg.rope_base as f32)),
        (k("vocab_size"), u(cfg.padded_vocab_size)),
    ];
    let eps = Value::F32(cfg.norm_eps as f32);
    if arch.layer_norm() {
        out.push((k("attention.layer_norm_epsilon"), eps));
    } else {
        out.push((k("attention.layer_norm_rms_epsilon"), eps));
    }
    if matches!(
        arch,
        Arch::Llama | Arch::GptNeox | Arch::StableLm | Arch::Phi3
    ) {
        out.push((k("rope.dimension_count"), u(n_rot(cfg))));
    }
    if matches!(arch, Arch::GptNeox | Arch::StableLm) {
        out.push((
            k("use_parallel_residual"),
            Value::Bool(cfg.parallel_residual),
        ));
    }
    if cfg.head_size * cfg.n_head != cfg.n_embd {
        out.push((k("attention.key_length"), u(cfg.head_size)));
        out.push((k("attention.value_length"), u(cfg.head_size)));
    }
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        out.push((k("rope.scaling.type"), Value::String("linear".into())));
        out.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    if arch == Arch::Phi3 {
        out.push((
            k("attention.sliding_window"),
            u(cfg.sliding_window.unwrap_or(0)),
        ));
        if let Some(RopeScaling::Longrope {
            attention_factor,
            original_max_position_embeddings,
            ..
        }) = &cfg.rope_scaling
        {
            out.push((
                k("rope.scaling.original_context_length"),
                u(*original_max_position_embeddings),
            ));
            out.push((
                k("rope.scaling.attn_factor"),
                Value::F32(*attention_factor as f32),
            ));
        }
    }
    if arch.gemma() {
        let f = |x: f64| Value::F32(x as f32);
        if let Some(w) = cfg.sliding_window {
            out.push((k("attention.sliding_window"), u(w)));
        }
        if let Some(b) = cfg.rope_local_base.filter(|_| arch == Arch::Gemma3) {
            out.push((k("rope.freq_base_swa"), f(b)));
        }
        if let Some(c) = cfg.attention_logit_softcapping {
            out.push((k("attn_logit_softcapping"), f(c)));
        }
        if let Some(c) = cfg.final_logit_softcapping {
            out.push((k("final_logit_softcapping"), f(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(cfg: &Config) -> String {
        match arch_of(cfg) {
            Err(e) => e.to_string(),
            Ok(a) => panic!("{} exported as {}", cfg.name, a.key()),
        }
    }

    /// The Gemma presets are what llama.cpp's graphs compute; a change llama.cpp cannot
    /// express is refused, saying what differs.
    #[test]
    fn gemma_layouts_export_only_what_llama_cpp_computes() {
        for (name, arch) in [
            ("gemma-2-2b", Arch::Gemma2),
            ("gemma-3-270m-it", Arch::Gemma3),
            ("gemma-3-4b", Arch::Gemma3),
        ] {
            let cfg = Config::from_name(name).unwrap();
            assert_eq!(arch_of(&cfg).unwrap(), arch, "{name}");
        }
        let mut c = Config::from_name("gemma-3-270m").unwrap();
        c.sliding_window_layers = vec![0, 2, 4];
        assert!(refused(&c).contains("not llama.cpp's gemma3 pattern"));
        let mut c = Config::from_name("gemma-3-270m").unwrap();
        c.attention_scores_scalar = Some(24.0);
        assert!(refused(&c).contains("1/sqrt(24)"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.rope_local_base = Some(20000.0);
        assert!(refused(&c).contains("local rotary base"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.post_mlp_norm = false;
        assert!(refused(&c).contains("post-norms"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.sliding_window = None;
        assert!(refused(&c).contains("pattern"));
    }

    /// StableLM 2 and OLMo 2 presets map to llama.cpp's `stablelm` and `olmo2`; what those
    /// graphs fix differently is refused.
    #[test]
    fn stablelm2_and_olmo2_presets_export() {
        for (name, arch) in [
            ("stablelm-2-1_6b", Arch::StableLm),
            ("stablelm-2-1_6b-chat", Arch::StableLm),
            ("OLMo-2-0425-1B", Arch::Olmo2),
        ] {
            assert_eq!(arch_of(&Config::from_name(name).unwrap()).unwrap(), arch);
        }
        let mut c = Config::from_name("stablelm-2-1_6b").unwrap();
        c.parallel_residual = true;
        assert!(refused(&c).contains("sequential residual"));
        let mut c = Config::from_name("stablelm-2-1_6b").unwrap();
        c.rotary_percentage = 0.3;
        assert!(refused(&c).contains("rotary part"));
        let mut c = Config::from_name("OLMo-2-0425-1B").unwrap();
        c.qk_norm = Some(QkNorm::PerHead);
        assert!(refused(&c).contains("whole q/k RMSNorms"));
        let mut c = Config::from_name("OLMo-2-0425-1B").unwrap();
        c.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
        assert!(refused(&c).contains("rope scaling"));
    }
}
