//! Conversations: turns of (role, text) rendered into one prompt, either by the tokenizer's
//! own Jinja chat template (`tokenizer_config.json`'s `chat_template`, rendered with
//! MiniJinja as transformers' `apply_chat_template` does) or by a `PromptStyle`, and cut to
//! the newest turns that fit the context.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::prompt::PromptStyle;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a conversation becomes a prompt.
#[derive(Debug, Clone)]
pub enum ChatFormat {
    /// A Jinja chat template, with the tokenizer's BOS and EOS strings.
    Template {
        source: String,
        bos: String,
        eos: String,
    },
    /// A fixed style: each user turn is a prompt of that style, followed by the reply.
    Style(PromptStyle),
}

impl ChatFormat {
    /// Renders `messages` (ending with the user turn to answer) into the prompt text that the
    /// reply continues.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        match self {
            ChatFormat::Template { source, bos, eos } => {
                let mut env = minijinja::Environment::new();
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> std::result::Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template("chat", source)
                    .map_err(|e| Error::Invalid(format!("the tokenizer's chat template: {e}")))?;
                let tmpl = env
                    .get_template("chat")
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                tmpl.render(minijinja::context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| Error::Invalid(format!("the tokenizer's chat template: {e}")))
            }
            ChatFormat::Style(style) => {
                let mut out = String::new();
                let mut system = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" => system = m.content.clone(),
                        "user" => {
                            let text = if system.is_empty() {
                                m.content.clone()
                            } else {
                                format!("{system}\n\n{}", m.content)
                            };
                            out.push_str(&style.prompt(&text, ""));
                        }
                        _ => {
                            out.push_str(&m.content);
                            out.push_str(match style {
                                PromptStyle::Chatml => "<|im_end|>\n",
                                _ => "\n\n",
                            });
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The longest suffix of `history` (whole user + assistant exchanges, system message kept)
/// whose prompt, as counted by `count`, leaves `reserve` tokens free in `context`. `None`
/// when even the last user turn alone does not fit.
pub fn fit_history(
    format: &ChatFormat,
    history: &[Message],
    context: usize,
    reserve: usize,
    mut count: impl FnMut(&str) -> Result<usize>,
) -> Result<Option<(String, usize)>> {
    let (system, turns): (Vec<&Message>, Vec<&Message>) =
        history.iter().partition(|m| m.role == "system");
    let mut start = 0;
    loop {
        let kept: Vec<Message> = system
            .iter()
            .chain(turns[start..].iter())
            .map(|m| (*m).clone())
            .collect();
        let prompt = format.render(&kept)?;
        let n = count(&prompt)?;
        if n + reserve <= context {
            return Ok(Some((prompt, start)));
        }
        // Drop the oldest exchange: a user turn and the reply after it.
        let next = turns[start..]
            .iter()
            .skip(1)
            .position(|m| m.role == "user")
            .map(|p| start + 1 + p);
        match next {
            Some(s) => start = s,
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(src: &str) -> ChatFormat {
        ChatFormat::Template {
            source: src.into(),
            bos: "<s>".into(),
            eos: "</s>".into(),
        }
    }

    #[test]
    fn renders_the_tokenizers_template_like_transformers() {
        // Expected text from transformers' apply_chat_template(add_generation_prompt=True).
        let got = template(SMOL)
            .render(&[
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello!"),
                Message::new("user", "2+2?"),
            ])
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Python-style string methods and raise_exception, as Llama / Mistral templates use.
        let strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% endfor %}";
        assert_eq!(
            template(strict)
                .render(&[Message::new("user", " x ")])
                .unwrap(),
            "<s>x"
        );
        let err = template(strict)
            .render(&[Message::new("assistant", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("user first"), "{err}");
        let err = template("{% for %}").render(&[]).unwrap_err().to_string();
        assert!(err.contains("chat template"), "{err}");
    }

    #[test]
    fn styles_and_history_fitting() {
        let f = ChatFormat::Style(PromptStyle::Alpaca);
        let h = vec![
            Message::new("user", "one"),
            Message::new("assistant", "1"),
            Message::new("user", "two"),
        ];
        let text = f.render(&h).unwrap();
        assert!(text.starts_with(&PromptStyle::Alpaca.prompt("one", "")));
        assert!(text.ends_with(&format!("1\n\n{}", PromptStyle::Alpaca.prompt("two", ""))));
        // Count characters: with room for everything nothing is dropped ...
        let chars = |s: &str| Ok(s.chars().count());
        let (p, start) = fit_history(&f, &h, 10_000, 10, chars).unwrap().unwrap();
        assert_eq!((p, start), (text.clone(), 0));
        // ... with less, the oldest exchange goes, the system message stays ...
        let mut hs = vec![Message::new("system", "Be brief.")];
        hs.extend(h.clone());
        let last = f.render(&[hs[0].clone(), hs[3].clone()]).unwrap();
        let (p, start) = fit_history(&f, &hs, last.len() + 10, 10, chars)
            .unwrap()
            .unwrap();
        assert_eq!((p.as_str(), start), (last.as_str(), 2));
        // ... and a last turn that cannot fit is None.
        assert!(fit_history(&f, &h, 20, 10, chars).unwrap().is_none());
    }
}
