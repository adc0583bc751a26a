//! `PromptStyle`: how an instruction record becomes the text the model sees. The response
//! follows the prompt directly; generation splits the answer off after the prompt.

use serde::{Deserialize, Serialize};

/// One instruction-tuning example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// Stanford Alpaca / Lit-GPT template, with and without an input; ends in "### Response:".
    Alpaca,
    /// The instruction (and input, after a blank line) as it is, then a newline.
    Plain,
    /// The text exactly as given (input after a blank line), no template: a base model
    /// continues it (Lit-GPT's "default" style). Named "none" ("raw" is read too).
    #[serde(rename = "none", alias = "raw")]
    Raw,
    /// ChatML turns (`<|im_start|>user ... <|im_end|>`), as SmolLM2-Instruct and other ChatML
    /// chat templates expect; the response is closed by the tokenizer's EOS (`<|im_end|>`).
    Chatml,
}

impl PromptStyle {
    pub const ALL: [PromptStyle; 4] = [
        PromptStyle::Alpaca,
        PromptStyle::Plain,
        PromptStyle::Raw,
        PromptStyle::Chatml,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PromptStyle::Alpaca => "alpaca",
            PromptStyle::Plain => "plain",
            PromptStyle::Raw => "none",
            PromptStyle::Chatml => "chatml",
        }
    }

    pub fn parse(s: &str) -> Option<PromptStyle> {
        let s = s.to_ascii_lowercase();
        if s == "raw" {
            return Some(PromptStyle::Raw);
        }
        PromptStyle::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The prompt for an instruction and optional input (empty = none).
    pub fn prompt(self, instruction: &str, input: &str) -> String {
        match self {
            PromptStyle::Alpaca if !input.is_empty() => format!(
                "Below is an instruction that describes a task, paired with an input that provides \
                 further context. Write a response that appropriately completes the request.\n\n\
                 ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
            ),
            PromptStyle::Alpaca => format!(
                "Below is an instruction that describes a task. Write a response that \
                 appropriately completes the request.\n\n\
                 ### Instruction:\n{instruction}\n\n### Response:"
            ),
            PromptStyle::Plain if !input.is_empty() => format!("{instruction}\n\n{input}\n"),
            PromptStyle::Plain => format!("{instruction}\n"),
            PromptStyle::Raw if !input.is_empty() => format!("{instruction}\n\n{input}"),
            PromptStyle::Raw => instruction.to_string(),
            PromptStyle::Chatml => {
                let content = if input.is_empty() {
                    instruction.to_string()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                format!("<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
            }
        }
    }

    pub fn record_prompt(self, r: &Record) -> String {
        self.prompt(&r.instruction, &r.input)
    }

    /// The answer part of a generated text that starts with this style's prompt.
    pub fn answer<'a>(self, full: &'a str, prompt: &str) -> &'a str {
        full.strip_prefix(prompt).unwrap_or_else(|| {
            let marker = match self {
                PromptStyle::Alpaca => "### Response:",
                PromptStyle::Chatml => "<|im_start|>assistant\n",
                PromptStyle::Plain | PromptStyle::Raw => "",
            };
            match full.rfind(marker) {
                Some(i) if !marker.is_empty() => &full[i + marker.len()..],
                _ => full,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_matches_lit_gpt_exactly() {
        assert_eq!(
            PromptStyle::Alpaca.prompt("Sort these.", "2, 1"),
            "Below is an instruction that describes a task, paired with an input that provides further \
             context. Write a response that appropriately completes the request.\n\n### Instruction:\n\
             Sort these.\n\n### Input:\n2, 1\n\n### Response:"
        );
        assert_eq!(
            PromptStyle::Alpaca.prompt("Say hi.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:"
        );
    }

    #[test]
    fn names_and_answers() {
        for p in PromptStyle::ALL {
            assert_eq!(PromptStyle::parse(p.name()), Some(p));
            let prompt = p.prompt("Q?", "");
            assert_eq!(p.answer(&format!("{prompt}A."), &prompt), "A.");
        }
        assert_eq!(PromptStyle::parse("vicuna"), None);
        assert_eq!(
            PromptStyle::Alpaca.answer("x ### Response: yes", "other"),
            " yes"
        );
    }
}
