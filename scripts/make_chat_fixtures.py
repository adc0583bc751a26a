#!/usr/bin/env python3
"""Golden chat-template fixtures: token ids and trained-token masks that Hugging Face
transformers gives for conversations rendered by the real models' own chat templates.

For each real instruct GGUF (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct; the Gemma 3
270M file is the base model and has no chat template) the
tokenizer and chat template come from transformers' own GGUF loading (independent of
loratune's conversion). Every case is a record exactly as a data file holds it (messages,
ShareGPT, Alpaca), turned into transformers' messages the way the formats define, rendered with
`apply_chat_template` (Jinja2) and tokenized without added special tokens. The mask marks the
tokens of each trained message (assistant turns; a message's 0/1 weight overrides): the text a
message adds to the rendering, from the conversation rendered up to it (with the generation
prompt before an assistant turn) to the conversation rendered through it, tokens marked from the
one holding its first character to the one holding its last (as return_assistant_tokens_mask
does). For SmolLM2 the mask is also computed by transformers itself
(`return_assistant_tokens_mask=True` on the template with `{% generation %}` around each reply)
and the script stops if the two disagree.

Run with the peer venv (transformers, gguf):
  eval "$(scripts/fetch_assets.sh)"
  ~/.cache/loratune-peer/.venv/bin/python scripts/make_chat_fixtures.py
Writes crates/data/tests/fixtures/chat_templates.json.
"""
import copy
import json
import os
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/data/tests/fixtures/chat_templates.json"


def llamafactory_file(name):
    sdist = Path(os.environ.get("LORATUNE_CACHE", Path.home() / ".cache/loratune")) / "dl/llamafactory-0.9.5.tar.gz"
    with tarfile.open(sdist) as t:
        return t.extractfile(f"llamafactory-0.9.5/data/{name}").read().decode()


def to_messages(record):
    """A record as transformers' (messages, tools), the way loratune reads its formats."""
    tools = None
    if "instruction" in record:
        user = record["instruction"] + (("\n\n" + record["input"]) if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], None, []
    msgs, weights = [], []
    if "messages" in record:
        for m in record["messages"]:
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", p.get("value")) for p in c)
            out = {"role": m["role"], "content": c or ""}
            if m.get("tool_calls"):
                out["tool_calls"] = m["tool_calls"]
            msgs.append(out)
            w = m.get("weight", m.get("loss_weight"))
            weights.append(None if w is None else bool(w))
        tools = record.get("tools")
    else:
        if record.get("system"):
            msgs.append({"role": "system", "content": record["system"]})
            weights.append(None)
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "observation": "tool", "tool": "tool"}
        for t in record["conversations"]:
            if t["from"] == "function_call":
                call = json.loads(t["value"])
                calls = call if isinstance(call, list) else [call]
                msgs.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": c} for c in calls]})
            else:
                msgs.append({"role": roles[t["from"]], "content": t["value"]})
            weights.append(None)
        tools = record.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    return msgs, (tools or None), weights


def spans_by_prefix(tok, msgs, tools, weights):
    def render(m, agp):
        return tok.apply_chat_template(m, tools=tools, tokenize=False, add_generation_prompt=agp)
    full = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        w = weights[i] if i < len(weights) else None
        trained = m["role"] == "assistant" if w is None else w
        if not trained:
            continue
        before = "" if i == 0 else render(msgs[:i], m["role"] == "assistant")
        after = render(msgs[: i + 1], False)
        assert full.startswith(before) and full.startswith(after), "template rewrites earlier turns"
        if len(after) > len(before):
            spans.append((len(before), len(after)))
    return full, spans


def mask_of(enc, n, spans):
    mask = [0] * n
    for start, end in spans:
        a, b = enc.char_to_token(start), enc.char_to_token(end - 1)
        if a is None:
            continue
        for t in range(a, (b if b is not None else n - 1) + 1):
            mask[t] = 1
    return mask


def smol_generation_template(src):
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in src, "SmolLM2's template changed: update the annotated copy"
    annotated = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
                 "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}" + plain + "{% endif %}")
    return src.replace(plain, annotated)


def cases():
    glaive = json.loads(llamafactory_file("glaive_toolcall_en_demo.json"))
    sft = [json.loads(l) for l in llamafactory_file("v1_sft_demo.jsonl").splitlines() if l.strip()]
    plain_multi = next(r for r in glaive if r["tools"] == "[]" and len(r["conversations"]) >= 4)
    tool_use = next(r for r in glaive if any(t["from"] == "function_call" for t in r["conversations"]))
    common = [
        ("messages_single", {"messages": [{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": "4."}]}),
        ("messages_system_multi", {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple 🍎"}]}),
        ("messages_parts_weights", sft[0]),
        ("messages_weights_override", {"messages": [
            {"role": "user", "content": "Repeat after me: cat", "weight": 1},
            {"role": "assistant", "content": "cat", "weight": 0},
            {"role": "user", "content": "And dog?"}, {"role": "assistant", "content": "dog"}]}),
        ("sharegpt_multi", plain_multi),
        ("alpaca_record", {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}),
        ("unicode_newlines", {"messages": [
            {"role": "user", "content": "Translate:\n\n  日本語 → English?"},
            {"role": "assistant", "content": "Japanese\n\t(the language) ✓"}]}),
    ]
    return {
        "smollm2": common,
        "qwen25": common + [("sharegpt_tools", tool_use)],
    }


def main():
    from transformers import AutoTokenizer
    import transformers
    # Gemma 3 270M is the base model: its GGUF carries no chat template (checked in the test).
    models = {"smollm2": "LORATUNE_SMOLLM2_GGUF", "qwen25": "LORATUNE_QWEN25_GGUF"}
    out = {"transformers": transformers.__version__, "models": {}}
    for key, env in models.items():
        d, f = os.path.split(os.environ[env])
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        if key == "smollm2":
            # transformers' GGUF conversion gives SmolLM's tokenizer plain ByteLevel splitting;
            # SmolLM2's own tokenizer.json (and llama.cpp's `smollm` pre-tokenizer, which the
            # GGUF names) first isolates each digit: "?\n\n3" is "?", "\n\n", "3", not
            # "?", "\n", "\n", "3". Restore the original pre-tokenizer.
            from tokenizers import pre_tokenizers as pt
            assert str(tok.backend_tokenizer.pre_tokenizer).startswith("ByteLevel")
            tok.backend_tokenizer.pre_tokenizer = pt.Sequence(
                [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
        entries = []
        for name, record in cases()[key]:
            msgs, tools, weights = to_messages(copy.deepcopy(record))
            entry = {"name": name, "record": record}
            text, spans = spans_by_prefix(tok, msgs, tools, weights)
            enc = tok(text, add_special_tokens=False)
            ids = enc["input_ids"]
            mask = mask_of(enc, len(ids), spans)
            if key == "smollm2" and all(w is None for w in weights):
                g = tok.apply_chat_template(msgs, tools=tools, chat_template=smol_generation_template(tok.chat_template),
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                assert g["input_ids"] == ids, name
                assert list(g["assistant_masks"]) == mask, f"{name}: transformers' own mask differs"
            entry.update({"text": text, "ids": ids, "mask": mask})
            entries.append(entry)
            print(key, name, len(ids), "tokens,", sum(mask), "trained")
        out["models"][key] = {"file": f, "cases": entries}
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
