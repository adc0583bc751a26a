//! The llama.cpp architectures loratune reads and writes (`general.architecture`), and what
//! each one's converter does to the Hugging Face layout. One table for both directions: the
//! GGUF import (`gguf`) and the export (`gguf_export`) ask it the same questions.

use crate::hf_config::HfArch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
    GptNeox,
    Falcon,
    StableLm,
    Olmo2,
}

impl Arch {
    pub(crate) const ALL: [Arch; 10] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Phi3,
        Arch::GptNeox,
        Arch::Falcon,
        Arch::StableLm,
        Arch::Olmo2,
    ];

    /// Every name, for messages: "llama, qwen2, ...".
    pub(crate) fn names() -> String {
        Arch::ALL.map(Arch::key).join(", ")
    }

    pub(crate) fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.key() == name)
    }

    /// The metadata key prefix (`general.architecture`).
    pub(crate) fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
            Arch::GptNeox => "gptneox",
            Arch::Falcon => "falcon",
            Arch::StableLm => "stablelm",
            Arch::Olmo2 => "olmo2",
        }
    }

    /// The Hugging Face layout an imported file becomes.
    pub(crate) fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::GptNeox => "GPTNeoXForCausalLM",
            Arch::Falcon => "FalconForCausalLM",
            Arch::StableLm => "StableLmForCausalLM",
            Arch::Olmo2 => "Olmo2ForCausalLM",
        }
    }

    /// The llama.cpp architecture of a Hugging Face layout (Mistral is `llama`); whether that
    /// graph can compute a given config is `gguf_export`'s question.
    pub(crate) fn from_hf(hf: HfArch) -> Arch {
        match hf {
            HfArch::Llama | HfArch::Mistral => Arch::Llama,
            HfArch::Qwen2 => Arch::Qwen2,
            HfArch::Qwen3 => Arch::Qwen3,
            HfArch::Gemma2 => Arch::Gemma2,
            HfArch::Gemma3 => Arch::Gemma3,
            HfArch::Phi3 => Arch::Phi3,
            HfArch::GptNeox => Arch::GptNeox,
            HfArch::Falcon { .. } => Arch::Falcon,
            HfArch::StableLm => Arch::StableLm,
            HfArch::Olmo2 => Arch::Olmo2,
        }
    }

    /// Only llama.cpp's Llama converter permutes the query and key rows (into the interleaved
    /// rotary order); every other graph here rotates halves as transformers does.
    pub(crate) fn permuted(self) -> bool {
        self == Arch::Llama
    }

    /// Gemma's converters store every RMSNorm weight as 1 + w.
    pub(crate) fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// llama.cpp keeps the fused [Q | K | V] projection (`attn_qkv`) instead of three.
    pub(crate) fn fused_qkv(self) -> bool {
        matches!(self, Arch::GptNeox | Arch::Falcon | Arch::Phi3)
    }

    /// LayerNorm (eps under `attention.layer_norm_epsilon`) rather than RMSNorm.
    pub(crate) fn layer_norm(self) -> bool {
        matches!(self, Arch::GptNeox | Arch::Falcon | Arch::StableLm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_classes_round_trip() {
        for a in Arch::ALL {
            assert_eq!(Arch::from_name(a.key()), Some(a));
            // Falcon's class alone does not say which Falcon layout it is.
            if let Some(hf) = HfArch::from_class_name(a.hf_class()) {
                assert_eq!(Arch::from_hf(hf), a, "{}", a.hf_class());
            }
        }
        assert_eq!(Arch::from_name("mamba"), None);
        assert!(Arch::names().starts_with("llama, qwen2"));
    }
}
