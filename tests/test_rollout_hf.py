"""The transformers rollout backend on its own (no trainer around it)."""

from rlhf.config import ModelConfig, PromptDataConfig, RolloutConfig
from rlhf.data.prompts import load_prompts
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rollout.hf import HFGenerator


def test_ignore_eos_generates_exactly_the_max_length(sft_tiny_model):
    model_cfg = ModelConfig(pretrain=str(sft_tiny_model))
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg)
    prompts = [p.ids for p in load_prompts("embedded:arith/prompts_eval.jsonl", None, tokenizer, PromptDataConfig(), 0)[:16]]

    stopping = HFGenerator(model, tokenizer, RolloutConfig(generate_max_len=12, micro_rollout_batch_size=16)).generate(prompts)
    # The SFT'd model answers a sum in a few tokens and ends it with EOS.
    assert all(stopping.finished) and max(len(r) for r in stopping.responses) < 12
    assert all(r[-1] == tokenizer.eos_token_id for r in stopping.responses)

    forced = HFGenerator(model, tokenizer, RolloutConfig(generate_max_len=12, micro_rollout_batch_size=16, ignore_eos=True)).generate(prompts)
    assert [len(r) for r in forced.responses] == [12] * 16 and not any(forced.finished)
    assert all(tokenizer.eos_token_id not in r for r in forced.responses)
