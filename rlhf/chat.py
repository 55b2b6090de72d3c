"""Interactive chat with a model, in the terminal (OpenRLHF's interactive_chat).

    python -m rlhf.chat ./outputs/sft_tiny/model
    python -m rlhf.chat Qwen/Qwen2.5-0.5B-Instruct --system_prompt "You are terse." --temperature 0.7 --bf16

Each turn is rendered with the tokenizer's chat template (the whole conversation so far, with
the generation prompt) and the reply is printed token by token as it is generated. Commands:
``/reset`` forgets the conversation (the system prompt stays), ``/exit`` (or end of input)
quits. With ``--backend vllm`` the reply comes from a vLLM engine in this process and is
printed when complete.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import tyro

from rlhf.config import ModelConfig, RolloutConfig, parse_config
from rlhf.errors import UserError, exit_on_user_error, run_program

# torch, transformers and vLLM are imported where they are used, so that --help is instant.


@dataclass
class ChatConfig:
    """Chat with a model in the terminal: /reset forgets the conversation, /exit quits."""

    model: tyro.conf.Positional[Optional[str]] = None
    """HF folder or hub name of the model (or give it as --pretrain)."""
    pretrain: Optional[str] = None
    """The model, as OpenRLHF's interactive_chat names it (the same as MODEL)."""
    system_prompt: Optional[str] = None
    """System message placed first in every conversation."""
    max_new_tokens: int = 512
    """Longest reply, in tokens."""
    max_len: int = 4096
    """Longest conversation (prompt + reply), in tokens (OpenRLHF's --max_len): a reply stops there."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling."""
    backend: Literal["hf", "vllm"] = "hf"
    """transformers (streams tokens) or vLLM (prints each reply when complete)."""
    bf16: bool = False
    """Load the weights in bfloat16."""

    def validate(self) -> None:
        if self.model and self.pretrain and self.model != self.pretrain:
            raise UserError(f"two models given: MODEL {self.model!r} and --pretrain {self.pretrain!r}; give one")
        self.model = self.model or self.pretrain
        if not self.model:
            raise UserError("give the model: python -m rlhf.chat MODEL (or --pretrain MODEL)")
        if self.max_len < 2:
            raise UserError(f"--max_len must be >= 2, got {self.max_len}")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--max_new_tokens must be >= 1, --temperature >= 0 and --top_p in (0, 1]")


class Conversation:
    def __init__(self, tokenizer, system_prompt: Optional[str]):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template; rlhf.chat needs one (save a tokenizer with chat_template)")
        self.tokenizer, self.system = tokenizer, system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user_text: str) -> list[int]:
        from rlhf.data.sft import encode_rendered

        self.messages.append({"role": "user", "content": user_text})
        text = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return encode_rendered(self.tokenizer, text)

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def stream_hf(model, tokenizer, ids: list[int], cfg: ChatConfig) -> str:
    """Generate with transformers in a thread, printing tokens as they arrive; returns the reply."""
    import torch
    from transformers import TextIteratorStreamer

    from rlhf.rollout.hf import stop_token_ids

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 else {"do_sample": False}
    inputs = torch.tensor([ids], device=model.device)
    worker = threading.Thread(
        target=model.generate,
        kwargs=dict(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max(1, min(cfg.max_new_tokens, cfg.max_len - len(ids))),
            streamer=streamer,
            eos_token_id=stop_token_ids(tokenizer, model.generation_config),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        ),
    )
    worker.start()
    parts = []
    for piece in streamer:
        print(piece, end="", flush=True)
        parts.append(piece)
    worker.join()
    return "".join(parts)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(ChatConfig, argv, prog="python -m rlhf.chat")
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    model_cfg = ModelConfig(pretrain=cfg.model, bf16=cfg.bf16)
    tokenizer = load_tokenizer(model_cfg)
    conversation = Conversation(tokenizer, cfg.system_prompt)
    if cfg.backend == "vllm":
        from rlhf.distributed.env import init_distributed
        from rlhf.rollout.vllm_engine import VLLMGenerator

        init_distributed()  # vLLM's external launcher runs inside a (one-rank) process group
        rollout = RolloutConfig(generate_max_len=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, vllm_kv_cache_mb=256)
        engine = VLLMGenerator(
            resolve_model_path(cfg.model),
            tokenizer,
            rollout,
            max_model_len=cfg.max_len,
            dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            seed=0,
            tp_group=None,
        )
    else:
        model = load_causal_lm(model_cfg).eval()
    print("rlhf.chat: /reset forgets the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = input("User: ")
        except EOFError:
            print()
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            conversation.reset()
            print("(conversation reset)", flush=True)
            continue
        if not text:
            continue
        ids = conversation.prompt_ids(text)
        print("Assistant: ", end="", flush=True)
        if cfg.backend == "vllm":
            gen = engine.generate([ids], greedy=cfg.temperature == 0)
            reply = tokenizer.decode(gen.responses[0], skip_special_tokens=True)
            print(reply, end="", flush=True)
        else:
            with torch.no_grad():
                reply = stream_hf(model, tokenizer, ids, cfg)
        print(flush=True)
        conversation.reply(reply)
    sys.stdout.flush()


if __name__ == "__main__":
    run_program(main)
