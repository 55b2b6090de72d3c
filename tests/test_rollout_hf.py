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

    forced = HFGenerator(model, tokenizer, RolloutConfig(generate_max_len=12, micro_rollout_batch_size=16, ignore_eos=True)).generate(
        prompts
    )
    assert [len(r) for r in forced.responses] == [12] * 16 and not any(forced.finished)
    assert all(tokenizer.eos_token_id not in r for r in forced.responses)


def test_actor_logprobs_at_the_sampling_temperature_equal_the_samplers(sft_tiny_model):
    """Rollouts at temperature T sample from softmax(logits / T); the log-probs PPO takes for the
    ratio and the KL (``policy_logp`` at T) must be those of that distribution. transformers'
    ``generate`` reports the scores it sampled from (after its temperature warper): at T = 0.7
    the two agree per token (ratio 1), while unscaled log-probs are far off."""
    import torch

    from rlhf.data.sft import Sample
    from rlhf.rl.forward import policy_logp, to_batch

    model_cfg = ModelConfig(pretrain=str(sft_tiny_model))
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg).eval()
    prompt = load_prompts("embedded:arith/prompts_eval.jsonl", None, tokenizer, PromptDataConfig(), 0)[0].ids
    torch.manual_seed(0)
    out = model.generate(
        input_ids=torch.tensor([prompt] * 8),
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=4,
        min_new_tokens=4,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    response = out.sequences[:, len(prompt) :]  # [8, 4]; min_new_tokens: no EOS, no padding
    scores = torch.stack(out.scores, dim=1).float()  # [8, 4, V] as sampled from (EOS masked by min_new_tokens)
    scores[..., tokenizer.eos_token_id] = model(input_ids=out.sequences).logits[:, len(prompt) - 1 : -1, tokenizer.eos_token_id] / 0.7
    sampler = torch.log_softmax(scores, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)  # [8, 4]
    batch = to_batch([Sample(row, [0] * len(prompt) + [1] * 4) for row in out.sequences.tolist()], tokenizer.pad_token_id)
    with torch.no_grad():
        at_t = policy_logp(model, batch, 0.7)[0][:, len(prompt) - 1 :]  # [8, 4]: the response tokens
        unscaled = policy_logp(model, batch, 1.0)[0][:, len(prompt) - 1 :]
    assert torch.allclose(at_t, sampler, atol=1e-4), (at_t - sampler).abs().max()
    assert (unscaled - sampler).abs().mean() > 0.01, (unscaled - sampler).abs().mean()
