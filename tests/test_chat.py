"""rlhf.chat through a real terminal (pexpect): streamed replies, multi-turn history, /reset, /exit."""

from __future__ import annotations

import sys

import pexpect
import pytest
import torch
from helpers import REPO, trainer_env

from rlhf.config import ModelConfig
from rlhf.data.sft import encode_rendered
from rlhf.models.loading import load_causal_lm, load_tokenizer


def expected_reply(model_path, messages: list[dict]) -> str:
    """What greedy decoding of the chat-templated conversation gives, computed here directly."""
    cfg = ModelConfig(pretrain=str(model_path))
    tokenizer, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
    ids = encode_rendered(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect(r"Assistant: (.*?)\r\nUser: ", timeout=120)
    return child.match.group(1).decode().replace("\r\n", "\n")  # the terminal turns \n into \r\n


@pytest.mark.slow
def test_chat_in_a_terminal(chat_tiny_model):
    """Greedy replies equal transformers' for the same conversation; the second turn sees the first."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rlhf.chat", str(chat_tiny_model), "--max_new_tokens", "6", "--system_prompt", "Add."],
        cwd=str(REPO),
        env=trainer_env(),
        timeout=180,
    )
    try:
        child.expect("User: ", timeout=180)
        first = ask(child, "3+4=")
        second = ask(child, "5+5=")
        child.sendline("/reset")
        child.expect(r"\(conversation reset\)\r\nUser: ")
        again = ask(child, "3+4=")
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    assert child.exitstatus == 0
    system = {"role": "system", "content": "Add."}
    assert first and first == again == expected_reply(chat_tiny_model, [system, {"role": "user", "content": "3+4="}])
    with_history = [
        system,
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "5+5="},
    ]
    assert second == expected_reply(chat_tiny_model, with_history)
    assert second != expected_reply(chat_tiny_model, [system, {"role": "user", "content": "5+5="}])  # the history really went in
