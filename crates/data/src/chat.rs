//! Conversations and how they become text: the tokenizer's own Jinja chat template
//! (`tokenizer_config.json`'s `chat_template`, rendered with MiniJinja as transformers'
//! `apply_chat_template` does, tools included) or a fixed `PromptStyle`; which byte spans of
//! a rendered conversation are trained on (found by rendering it turn by turn); and cutting a
//! chat history to the newest turns that fit the context.

use std::ops::Range;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::Value;

use crate::error::{Error, Result};
use crate::prompt::PromptStyle;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, OpenAI-style (`[{"type": "function", "function":
    /// {"name", "arguments"}}]`), as templates that support tools read them.
    pub tool_calls: Option<Value>,
    /// Whether the loss looks at this message; `None`: assistant turns only.
    pub train: Option<bool>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            train: None,
        }
    }

    /// Whether this message's tokens are trained on.
    pub fn trained(&self) -> bool {
        self.train.unwrap_or(self.role == "assistant")
    }

    /// The message as a template sees it: `role`, `content` and, when present, `tool_calls`.
    fn to_value(&self) -> Value {
        let mut pairs = vec![
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ];
        if let Some(t) = &self.tool_calls {
            pairs.push(("tool_calls", t.clone()));
        }
        Value::from_pairs(pairs)
    }
}

/// A conversation to train on, with the tools it may call (a JSON list, as given).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Option<Value>,
}

impl Conversation {
    /// An instruction record as one exchange: the instruction (and input, after a blank
    /// line) from the user, the output from the assistant.
    pub fn from_record(r: &crate::prompt::Record) -> Conversation {
        Conversation {
            messages: vec![
                Message::new("user", &join(&r.instruction, &r.input)),
                Message::new("assistant", &r.output),
            ],
            tools: None,
        }
    }

    /// Whether it needs a template that renders tools: a tool list, a tool call or a tool
    /// result.
    pub fn uses_tools(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| t.len() != Some(0))
            || self
                .messages
                .iter()
                .any(|m| m.tool_calls.is_some() || m.role == "tool")
    }

    /// User and assistant turns (system and tool messages not counted).
    pub fn turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == "user" || m.role == "assistant")
            .count()
    }
}

/// A compiled Jinja chat template with the tokenizer's BOS and EOS strings.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    sha256: String,
    tools: bool,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // transformers' `tojson`: Python's json.dumps (", " and ": " separators, no HTML
        // escaping, keys in their given order), optionally indented.
        env.add_filter("tojson", py_tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Invalid(format!("the tokenizer's chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.into(),
            eos: eos.into(),
            sha256: loratune_model::io::sha256_hex(source.as_bytes()),
            tools: source.contains("tools"),
        })
    }

    /// sha256 of the template's source: datasets and adapters record which template they
    /// were rendered with.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether the template renders a tool list and tool calls (it reads `tools`).
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let messages: Vec<Value> = messages.iter().map(Message::to_value).collect();
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools.cloned(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| {
            let mut msg = e.to_string();
            // MiniJinja's message for raise_exception carries the template's own words.
            if let Some(d) = e.detail() {
                if !msg.contains(d) {
                    msg = format!("{msg}: {d}");
                }
            }
            Error::Invalid(format!("the chat template: {msg}"))
        })
    }
}

/// How a conversation becomes text.
#[derive(Debug)]
pub enum ChatFormat {
    /// The tokenizer's Jinja chat template.
    Template(Box<ChatTemplate>),
    /// A fixed style: each user turn is a prompt of that style, each reply ends with the
    /// tokenizer's EOS text (`eos`; blank lines when it has none).
    Style { style: PromptStyle, eos: String },
}

impl ChatFormat {
    /// The format `rendering` names, for the tokenizer `tok`; `Template` needs the tokenizer
    /// to have a chat template.
    pub fn new(rendering: Rendering, tok: &loratune_model::Tokenizer) -> Result<ChatFormat> {
        let special = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        match rendering {
            Rendering::Template => match &tok.chat_template {
                Some(source) => Ok(ChatFormat::Template(Box::new(ChatTemplate::new(
                    source,
                    &special(tok.bos_id),
                    &special(tok.eos_id),
                )?))),
                None => Err(Error::Invalid(format!(
                    "`prompt_style` template: {} has no chat_template in tokenizer_config.json; \
                     pick a style (alpaca, plain, chatml or none)",
                    tok.path().parent().unwrap_or(tok.path()).display()
                ))),
            },
            Rendering::Style(style) => Ok(ChatFormat::Style {
                style,
                eos: special(tok.eos_id),
            }),
        }
    }

    pub fn rendering(&self) -> Rendering {
        match self {
            ChatFormat::Template(_) => Rendering::Template,
            ChatFormat::Style { style, .. } => Rendering::Style(*style),
        }
    }

    /// sha256 of the chat template, for a template.
    pub fn template_sha256(&self) -> Option<&str> {
        match self {
            ChatFormat::Template(t) => Some(t.sha256()),
            ChatFormat::Style { .. } => None,
        }
    }

    /// Whether encoded text gets the tokenizer's BOS: a template writes its own.
    pub fn adds_bos(&self) -> bool {
        matches!(self, ChatFormat::Style { .. })
    }

    /// Renders `messages` (ending with the user turn to answer) into the prompt text that the
    /// reply continues.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.render_with(messages, None, true)
    }

    /// The prompt for one instruction (and optional input, after a blank line), with an
    /// optional system message.
    pub fn prompt(&self, instruction: &str, input: &str, system: Option<&str>) -> Result<String> {
        match self {
            ChatFormat::Style { style, .. } if system.is_none() => {
                Ok(style.prompt(instruction, input))
            }
            _ => {
                let mut messages: Vec<Message> = system
                    .map(|s| Message::new("system", s))
                    .into_iter()
                    .collect();
                messages.push(Message::new("user", &join(instruction, input)));
                self.render(&messages)
            }
        }
    }

    fn render_with(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self {
            ChatFormat::Template(t) => t.render(messages, tools, add_generation_prompt),
            ChatFormat::Style { style, eos } => {
                let mut out = String::new();
                let mut system = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" => system = m.content.clone(),
                        "user" => {
                            // The system message opens the first prompt.
                            let text = if system.is_empty() {
                                m.content.clone()
                            } else {
                                format!("{}\n\n{}", std::mem::take(&mut system), m.content)
                            };
                            out.push_str(&style.prompt(&text, ""));
                        }
                        "assistant" if m.tool_calls.is_none() => {
                            out.push_str(&m.content);
                            out.push_str(match style {
                                PromptStyle::Chatml => "<|im_end|>\n",
                                _ if !eos.is_empty() => eos,
                                _ => "\n\n",
                            });
                        }
                        role => {
                            return Err(Error::Invalid(format!(
                                "prompt style {} has no place for {} messages; use a chat \
                                 template that renders them (`prompt_style` template)",
                                style.name(),
                                if m.tool_calls.is_some() {
                                    "tool-call"
                                } else {
                                    role
                                }
                            )))
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Renders a whole conversation for training and returns the text with the byte spans
    /// the loss looks at: each trained message's span is what it adds to the text, found by
    /// rendering the conversation up to the message (with the generation prompt before an
    /// assistant turn, so the prompt is never trained on) and up to its end. Every such
    /// partial rendering must be a prefix of the whole; a template for which that fails (one
    /// that rewrites earlier turns) is an error, never a wrong mask.
    pub fn render_trained(&self, conv: &Conversation) -> Result<(String, Vec<Range<usize>>)> {
        let tools = conv.tools.as_ref();
        if conv.uses_tools() {
            if let ChatFormat::Template(t) = self {
                if !t.supports_tools() {
                    return Err(Error::Invalid(
                        "it has tools or tool calls, and the chat template does not render \
                         tools"
                            .into(),
                    ));
                }
            }
        }
        let full = self.render_with(&conv.messages, tools, false)?;
        let mut spans = Vec::new();
        for (i, m) in conv.messages.iter().enumerate() {
            if !m.trained() {
                continue;
            }
            let before = if i == 0 {
                String::new()
            } else {
                self.render_with(&conv.messages[..i], tools, m.role == "assistant")?
            };
            let after = self.render_with(&conv.messages[..=i], tools, false)?;
            for (what, part) in [("before", &before), ("through", &after)] {
                if !full.starts_with(part.as_str()) {
                    return Err(Error::Invalid(format!(
                        "the chat template renders the conversation {what} message {} \
                         differently from the whole conversation (it rewrites earlier \
                         turns), so the trained tokens cannot be told apart; use a prompt \
                         style or a template that renders turn by turn",
                        i + 1
                    )));
                }
            }
            if after.len() > before.len() {
                spans.push(before.len()..after.len());
            }
        }
        Ok((full, spans))
    }
}

/// An instruction and its optional input, as one user message.
pub fn join(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// Which rendering a dataset, adapter or command uses: the tokenizer's chat template or a
/// fixed style. Written as its name ("template", "alpaca", "none", ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendering {
    Template,
    Style(PromptStyle),
}

impl Rendering {
    pub fn name(self) -> &'static str {
        match self {
            Rendering::Template => "template",
            Rendering::Style(s) => s.name(),
        }
    }

    pub fn parse(s: &str) -> Option<Rendering> {
        match s.to_ascii_lowercase().as_str() {
            "template" => Some(Rendering::Template),
            other => PromptStyle::parse(other).map(Rendering::Style),
        }
    }

    /// The names a flag accepts, for messages.
    pub fn names() -> String {
        let mut names = vec!["template"];
        names.extend(PromptStyle::ALL.iter().map(|p| p.name()));
        names.join(", ")
    }
}

impl serde::Serialize for Rendering {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Rendering {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rendering::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown prompt style {s:?}; expected one of {}",
                Rendering::names()
            ))
        })
    }
}

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn py_tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    // Other keyword arguments Python accepts and templates do not use here.
    for key in ["ensure_ascii", "separators", "sort_keys"] {
        let _: Option<Value> = kwargs.get(key)?;
    }
    kwargs.assert_all_used()?;
    let indent = match indent {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&py_float(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or("")).expect("string"))
        }
        ValueKind::Map => {
            out.push('{');
            let keys: Vec<Value> = v.try_iter()?.collect();
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).expect("string"));
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let items: Vec<Value> = v.try_iter()?.collect();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).expect("string")),
    }
    Ok(())
}

/// A float as Python's `repr` writes it: "1.0", "0.5", "1e-05", "1e+20", "inf" -> JSON's
/// "Infinity".
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let exp = if x == 0.0 {
        0
    } else {
        x.abs().log10().floor() as i32
    };
    if (-4..16).contains(&exp) {
        let s = format!("{x:?}");
        if s.contains('e') {
            // Rust's shortest form chose an exponent Python would not: spell it out.
            format!("{x}")
        } else {
            s
        }
    } else {
        let s = format!("{x:e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", e.abs())
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
        ChatFormat::Template(Box::new(ChatTemplate::new(src, "<s>", "</s>").unwrap()))
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
        let err = ChatTemplate::new("{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat template"), "{err}");
    }

    #[test]
    fn trained_spans_are_the_assistant_turns_only() {
        let conv = Conversation {
            messages: vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello!"),
                Message::new("user", "2+2?"),
                Message::new("assistant", "4"),
            ],
            tools: None,
        };
        let (text, spans) = template(SMOL).render_trained(&conv).unwrap();
        let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(pieces, ["Hello!<|im_end|>\n", "4<|im_end|>\n"]);
        assert!(
            text.ends_with("<|im_start|>assistant\n4<|im_end|>\n"),
            "{text}"
        );
        // A per-message weight trains a user turn too (header and all) or skips a reply.
        let mut weighted = conv.clone();
        weighted.messages[0].train = Some(true);
        weighted.messages[1].train = Some(false);
        let (text, spans) = template(SMOL).render_trained(&weighted).unwrap();
        let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(pieces.len(), 2);
        assert!(
            pieces[0].ends_with("<|im_start|>user\nHi<|im_end|>\n"),
            "{pieces:?}"
        );
        assert_eq!(pieces[1], "4<|im_end|>\n");

        // A template that rewrites earlier turns (here: only the last reply is kept whole)
        // cannot give a mask: an error, not a guess.
        let rewriting = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[reply]{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let err = template(rewriting)
            .render_trained(&conv)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differently from the whole"), "{err}");

        // Styles: each reply ends with EOS; the system message opens the first prompt only.
        let style = ChatFormat::Style {
            style: PromptStyle::Alpaca,
            eos: "</s>".into(),
        };
        let mut with_system = conv.clone();
        with_system
            .messages
            .insert(0, Message::new("system", "Be brief."));
        let (text, spans) = style.render_trained(&with_system).unwrap();
        assert!(text.starts_with(&PromptStyle::Alpaca.prompt("Be brief.\n\nHi", "")));
        assert!(text.contains(&format!(
            "Hello!</s>{}",
            PromptStyle::Alpaca.prompt("2+2?", "")
        )));
        let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(pieces, ["Hello!</s>", "4</s>"]);
        let mut tool = conv.clone();
        tool.messages[1].role = "tool".into();
        let err = style.render_trained(&tool).unwrap_err().to_string();
        assert!(err.contains("no place for tool messages"), "{err}");
        let err = template(SMOL)
            .render_trained(&Conversation {
                tools: Some(Value::from(vec![Value::from("f")])),
                ..conv
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not render tools"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = template("{{ x | tojson }}|{{ x | tojson(indent=2) }}");
        let x: Value = serde_json::from_str(
            r#"{"name": "f", "b": [1, 2.5, 1e-05, true, null, 2.0], "a": "<é\n>", "e": {}}"#,
        )
        .unwrap();
        let ChatFormat::Template(t) = t else {
            unreachable!()
        };
        let env = &t.env;
        let out = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! { x => x })
            .unwrap();
        // json.dumps(x, ensure_ascii=False) and json.dumps(x, ensure_ascii=False, indent=2).
        assert_eq!(
            out,
            "{\"name\": \"f\", \"b\": [1, 2.5, 1e-05, true, null, 2.0], \"a\": \"<é\\n>\", \"e\": {}}|\
             {\n  \"name\": \"f\",\n  \"b\": [\n    1,\n    2.5,\n    1e-05,\n    true,\n    null,\n    2.0\n  ],\n  \"a\": \"<é\\n>\",\n  \"e\": {}\n}"
        );
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_float(123456.0), "123456.0");
        assert_eq!(py_float(0.0001), "0.0001");
    }

    #[test]
    fn styles_and_history_fitting() {
        let f = ChatFormat::Style {
            style: PromptStyle::Alpaca,
            eos: String::new(),
        };
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

    #[test]
    fn renderings_by_name() {
        for name in ["template", "alpaca", "plain", "none", "chatml"] {
            let r = Rendering::parse(name).unwrap();
            assert_eq!(r.name(), name);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Rendering>(&json).unwrap(), r);
        }
        // "raw" is the older name of "none".
        assert_eq!(
            Rendering::parse("raw"),
            Some(Rendering::Style(PromptStyle::Raw))
        );
        assert!(serde_json::from_str::<Rendering>("\"vicuna\"").is_err());
    }
}
