"""Real data shapes and real tokenizer families (tests/realdata.py builds both locally).

First the tokenisation, in-process: which tokens the loss mask covers, how often BOS appears,
what padding falls back to, and that the prompt ids RL trains on are the ids the tokenizer's own
``apply_chat_template`` gives. Then every trainer runs a step or two on the dataset shape it is
used with, under each tokenizer family where the family changes what happens.
"""

from __future__ import annotations

import dataclasses

import pytest
import realdata
from helpers import read_jsonl, run_trainer


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {name: realdata.build_family(name, root / name) for name in realdata.FAMILIES}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    return realdata.write_datasets(tmp_path_factory.mktemp("realdata"))


def load_tok(folder):
    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(pretrain=str(folder)))


def rows_of(path):
    from rlhf.data.sources import load_mixture

    return load_mixture(str(path), None, "train", 10**6, 0)


def masked_spans(tok, ids, mask) -> list[str]:
    """The decoded text of each maximal run of loss-masked tokens."""
    spans, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


# Each family's end of an assistant turn as the loss mask must cover it: ChatML's <|im_end|> and
# the newline the template writes after it; Llama-3's <|eot_id|>.
TURN_END = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}
# A preference pair's side ends at the end token itself, as a rollout does (see the RM test below).
PAIR_END = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}
BOS = {"qwen2": None, "llama3": "<|begin_of_text|>"}


# ----------------------------------------------------------------------------------------------
# Tokenisation


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
def test_chat_sft_masks_exactly_the_assistant_turns(families, data, family):
    from rlhf.config import DataConfig
    from rlhf.data.sft import tokenize_sft

    tok = load_tok(families[family])
    rows = rows_of(data["chat"])
    samples = tokenize_sft(rows, tok, DataConfig(input_key="messages", output_key=None, apply_chat_template=True, max_len=1024))
    assert len(samples) == len(rows)
    for row, s in zip(rows, samples):
        assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert masked_spans(tok, s.input_ids, s.loss_mask) == [a + TURN_END[family] for a in assistant]
        # The ids are the tokenizer's own rendering of the conversation, BOS included once.
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert s.input_ids == tok.encode(rendered, add_special_tokens=False)
        bos = tok.convert_tokens_to_ids(BOS[family]) if BOS[family] else None
        assert s.input_ids.count(bos) == (1 if bos is not None else 0) and (bos is None or s.input_ids[0] == bos)


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
def test_prompt_response_rows_mask_the_response_and_one_end_token(families, data, family):
    """OpenOrca without a chat template: BOS (Llama-3) once, the response and the tokenizer's EOS
    are the targets; with the template the response is an assistant turn."""
    from rlhf.config import DataConfig
    from rlhf.data.sft import tokenize_sft

    tok = load_tok(families[family])
    rows = rows_of(data["openorca"])
    plain = tokenize_sft(rows, tok, DataConfig(input_key="question", output_key="response", max_len=1024))
    chat = tokenize_sft(rows, tok, DataConfig(input_key="question", output_key="response", apply_chat_template=True, max_len=1024))
    for row, p, c in zip(rows, plain, chat):
        assert masked_spans(tok, p.input_ids, p.loss_mask) == [row["response"] + tok.eos_token]
        assert masked_spans(tok, c.input_ids, c.loss_mask) == [row["response"] + TURN_END[family]]
        for s in (p, c):
            if BOS[family]:
                assert s.input_ids[0] == tok.bos_token_id and s.input_ids.count(tok.bos_token_id) == 1


def test_alpaca_input_template_takes_instruction_and_input(families, data):
    """alpaca keeps the instruction and the input in two fields; '{instruction}' in
    --input_template brings the first in, '{}' is --input_key's; a field the row lacks is named."""
    from rlhf.config import DataConfig, PromptDataConfig
    from rlhf.data.prompts import tokenize_prompts
    from rlhf.data.sft import tokenize_sft
    from rlhf.errors import UserError

    tok = load_tok(families["qwen2"])
    rows = rows_of(data["alpaca"])
    samples = tokenize_sft(rows, tok, DataConfig(input_key="input", output_key="output", input_template=ALPACA_TEMPLATE, max_len=1024))
    prompts = tokenize_prompts(rows, tok, PromptDataConfig(input_key="input", label_key="output", input_template=ALPACA_TEMPLATE))
    for row, s, p in zip(rows, samples, prompts):
        prompt = f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
        assert tok.decode(s.input_ids) == prompt + row["output"] + tok.eos_token and p.text == prompt
        assert masked_spans(tok, s.input_ids, s.loss_mask) == [row["output"] + tok.eos_token]
    with pytest.raises(
        UserError,
        match=r"alpaca.jsonl:1: --input_template names field 'context', which the row lacks \(it has: "
        r"instruction, input, output\)",
    ):
        tokenize_sft(rows, tok, DataConfig(input_key="input", output_key="output", input_template="{context}: {}"))


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
def test_reward_model_pairs_end_like_rollouts(families, data, family):
    """A reward model reads its score at the last token, so its training sequences must end the
    way PPO's do: the RL prompt ids, the response, and the end token generation stops at. ChatML
    writes a newline after <|im_end|>; a pair side that kept it trained the score at the newline
    while PPO read it at <|im_end|> (regression)."""
    from transformers import GenerationConfig

    from rlhf.config import PreferenceDataConfig, PromptDataConfig
    from rlhf.data.preference import tokenize_pairs
    from rlhf.data.prompts import tokenize_prompts
    from rlhf.rollout.hf import stop_token_ids

    tok = load_tok(families[family])
    stops = stop_token_ids(tok, GenerationConfig.from_pretrained(families[family]))
    rows = rows_of(data["ultrafeedback"])
    pairs = tokenize_pairs(rows, tok, PreferenceDataConfig(prompt_key=None, apply_chat_template=True, max_len=1024))
    prompts = tokenize_prompts(
        [{"p": row["chosen"][:-1]} for row in rows], tok, PromptDataConfig(input_key="p", label_key=None, apply_chat_template=True)
    )
    for pair, prompt in zip(pairs, prompts):
        for side in (pair.chosen, pair.rejected):
            assert side.input_ids[: len(prompt.ids)] == prompt.ids and side.loss_mask.index(1) == len(prompt.ids)
            assert side.input_ids[-1] in stops and not any(t in stops for t in side.input_ids[len(prompt.ids) : -1])


def test_llama3_like_has_no_pad_token_and_falls_back_to_eos(families):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(families["llama3"])
    assert raw.pad_token is None  # as shipped
    tok = load_tok(families["llama3"])
    assert tok.pad_token == tok.eos_token == "<|end_of_text|>" and tok.pad_token_id is not None


def test_qwen2_like_embedding_is_padded_past_the_tokenizer(families):
    from transformers import AutoConfig

    tok = load_tok(families["qwen2"])
    assert AutoConfig.from_pretrained(families["qwen2"]).vocab_size == len(tok) + 128 and tok.bos_token is None


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
@pytest.mark.parametrize("shape", ["prompt_collection", "gsm8k"])
def test_rl_prompt_ids_equal_the_tokenizers_generation_prompt(families, data, family, shape):
    """The ids PPO generates from (and trains on) are exactly
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``: no second BOS, no
    lost default system message, nothing re-tokenised differently."""
    from rlhf.config import PromptDataConfig
    from rlhf.data.prompts import tokenize_prompts

    tok = load_tok(families[family])
    key, label = ("context_messages", None) if shape == "prompt_collection" else ("question", "answer")
    rows = rows_of(data[shape])
    prompts = tokenize_prompts(rows, tok, PromptDataConfig(input_key=key, label_key=label, apply_chat_template=True))
    for row, p in zip(rows, prompts):
        messages = row[key] if isinstance(row[key], list) else [{"role": "user", "content": row[key]}]
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert p.ids == list(expected)
        assert p.text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert p.label == (row["answer"] if label else None)


def test_prompt_config_tokenizer_chat_template_override(families):
    """--tokenizer_chat_template reaches RL prompts (issue 12 item 1: the field was missing)."""
    from rlhf.config import PromptDataConfig
    from rlhf.data.prompts import tokenize_prompts

    tok = load_tok(families["qwen2"])
    cfg = PromptDataConfig(input_key="q", label_key=None, apply_chat_template=True)
    [default] = tokenize_prompts([{"q": "hi"}], tok, cfg)
    assert default.text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    [custom] = tokenize_prompts([{"q": "hi"}], tok, dataclasses.replace(cfg, tokenizer_chat_template="Q: {{ messages[0]['content'] }}\nA:"))
    assert custom.text == "Q: hi\nA:"


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
def test_preference_shapes_tokenise(families, data, family):
    """HH-RLHF whole dialogues (no template), UltraFeedback message lists and KTO-mix message
    lists (templated): the response masks hold exactly the differing answers."""
    from rlhf.config import PreferenceDataConfig
    from rlhf.data.preference import tokenize_pairs, tokenize_unpaired

    tok = load_tok(families[family])
    hh_rows = rows_of(data["hh_rlhf"])
    hh = tokenize_pairs(hh_rows, tok, PreferenceDataConfig(prompt_key=None, max_len=1024))
    for row, pair in zip(hh_rows, hh):
        chosen = masked_spans(tok, pair.chosen.input_ids, pair.chosen.loss_mask)
        assert len(chosen) == 1 and row["chosen"].endswith(chosen[0].removesuffix(tok.eos_token)), chosen
    uf_rows = rows_of(data["ultrafeedback"])
    uf = tokenize_pairs(uf_rows, tok, PreferenceDataConfig(prompt_key=None, apply_chat_template=True, max_len=1024))
    for row, pair in zip(uf_rows, uf):
        for side, sample in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            assert masked_spans(tok, sample.input_ids, sample.loss_mask) == [row[side][-1]["content"] + PAIR_END[family]]
    kto_rows = rows_of(data["kto_mix"])
    kto = tokenize_unpaired(
        kto_rows, tok, PreferenceDataConfig(input_key="prompt", output_key="completion", apply_chat_template=True, max_len=1024)
    )
    for row, ex in zip(kto_rows, kto):
        assert ex.desirable == row["label"]
        assert masked_spans(tok, ex.sample.input_ids, ex.sample.loss_mask) == [row["completion"][0]["content"] + TURN_END[family]]


# ----------------------------------------------------------------------------------------------
# Chat-templated RL: rollouts stop at the template's end token


@pytest.fixture(scope="session")
def llama3_chat(tmp_path_factory):
    """The Llama-3-like model taught to answer in its chat format (it ends turns with <|eot_id|>,
    which is not its tokenizer's EOS)."""
    return realdata.teach_chat(realdata.build_family("llama3", tmp_path_factory.mktemp("llama3-chat") / "model"))


@pytest.mark.slow
def test_hf_rollouts_stop_at_the_templates_end_token(llama3_chat, data):
    """Regression: generation stopped only at the tokenizer's EOS (<|end_of_text|>), so a
    Llama-3-style chat model talked past its <|eot_id|> into new turns until the length limit."""
    from rlhf.config import ModelConfig, PromptDataConfig, RolloutConfig
    from rlhf.data.prompts import load_prompts
    from rlhf.models.loading import load_causal_lm
    from rlhf.rollout.hf import HFGenerator

    tok = load_tok(llama3_chat)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompts = load_prompts(
        str(data["gsm8k_messages"]),
        None,
        tok,
        PromptDataConfig(input_key="context_messages", label_key="answer", apply_chat_template=True),
        0,
    )
    model = load_causal_lm(ModelConfig(pretrain=str(llama3_chat))).eval()
    gen = HFGenerator(model, tok, RolloutConfig(generate_max_len=24, micro_rollout_batch_size=8)).generate(
        [p.ids for p in prompts], greedy=True
    )
    assert all(gen.finished), [tok.decode(r) for r in gen.responses]
    assert all(r[-1] == eot and eot not in r[:-1] for r in gen.responses)


def rl_args(model, data, out, *extra) -> list[str]:
    """GRPO on GSM8K chat prompts (message lists with system turns) with the verifiable reward
    file; 2 steps, greedy eval before, after each step."""
    return [
        "--pretrain",
        str(model),
        "--prompt_data",
        str(data["gsm8k_messages"]),
        "--input_key",
        "context_messages",
        "--label_key",
        "answer",
        "--apply_chat_template",
        "--eval_prompt_data",
        str(data["gsm8k_messages"]),
        "--eval_every",
        "1",
        "--reward_func",
        f"{data['gsm8k_reward']}:reward",
        "--advantage_estimator",
        "group_norm",
        "--n_samples_per_prompt",
        "2",
        "--rollout_batch_size",
        "4",
        "--micro_rollout_batch_size",
        "8",
        "--train_batch_size",
        "8",
        "--micro_train_batch_size",
        "4",
        "--generate_max_len",
        "24",
        "--prompt_max_len",
        "128",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-5",
        "--init_kl_coef",
        "0",
        "--zero_stage",
        "2",
        "--save_path",
        str(out / "model"),
        "--ckpt_path",
        str(out / "ckpt"),
        *extra,
    ]


def reward_calls(log_prefix) -> list[dict]:
    return [call for path in sorted(log_prefix.parent.glob(log_prefix.name + "*")) for call in read_jsonl(path)]


def check_chat_rl_run(model, data, out, generate_max_len=24):
    """What a chat-templated RL run must show: rollouts that end at <|eot_id|> (not cut by the
    length limit), a greedy eval at the start and after every step, and a reward function that saw
    the rendered chat prompt, the decoded response without special tokens, and the row's answer."""
    records = read_jsonl(out / "model" / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert len(steps) == 2 and len(evals) == 3, records
    for r in steps:
        assert r["truncated"] <= 0.25 and r["response_length"] < generate_max_len, r
    tok = load_tok(model)
    answers = {
        tok.apply_chat_template(row["context_messages"], add_generation_prompt=True, tokenize=False): row["answer"]
        for row in rows_of(data["gsm8k_messages"])
    }
    calls = reward_calls(out / "rewards.jsonl")
    assert len(calls) >= 2 * 3 + 2  # two ranks: 3 evals and 2 rollouts each
    for call in calls:
        for prompt, response, label in zip(call["prompts"], call["responses"], call["labels"]):
            assert answers[prompt] == label  # the label is the answer of that very prompt's row
            assert "<|" not in response, response  # decoded without the template's special tokens
    return evals


# PPO proper: a critic (GAE) and the KL penalty in the reward, so reference and critic see the chat ids too.
PPO_FLAGS = ["--advantage_estimator", "gae", "--critic_learning_rate", "1e-4", "--init_kl_coef", "0.01"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_on_chat_prompts(llama3_chat, data, tmp_path, backend, algo):
    extra = ["--rollout_backend", "vllm", "--vllm_kv_cache_mb", "64"] if backend == "vllm" else []
    extra += PPO_FLAGS if algo == "ppo" else []
    run_trainer("rlhf.ppo", rl_args(llama3_chat, data, tmp_path, *extra), env={"RLHF_REWARD_LOG": str(tmp_path / "rewards.jsonl")})
    evals = check_chat_rl_run(llama3_chat, data, tmp_path)
    print("eval_reward", algo, backend, evals)


@pytest.mark.parametrize("task", ["generate", pytest.param("generate_vllm", marks=pytest.mark.slow)])  # vLLM: ~70 s here
def test_batch_inference_with_a_chat_template(llama3_chat, data, tmp_path, task):
    """rlhf.generate --apply_chat_template (issue 12 item 1: it crashed at start-up): greedy
    answers to chat prompts, written with the rendered prompt, ending at the turn's end, scored
    by the reward file against each row's answer."""
    out = tmp_path / "gen.jsonl"
    run_trainer(
        "rlhf.generate",
        [
            "--pretrain",
            str(llama3_chat),
            "--eval_task",
            task,
            "--dataset",
            str(data["gsm8k_messages"]),
            "--input_key",
            "context_messages",
            "--label_key",
            "answer",
            "--apply_chat_template",
            "--temperature",
            "0",
            "--generate_max_len",
            "24",
            "--prompt_max_len",
            "128",
            "--reward_func",
            f"{data['gsm8k_reward']}:reward",
            "--vllm_kv_cache_mb",
            "64",
            "--output_path",
            str(out),
        ],
    )
    tok = load_tok(llama3_chat)
    rows = rows_of(data["gsm8k_messages"])
    records = read_jsonl(out)
    assert len(records) == len(rows)
    for row, record in zip(rows, records):
        assert record["prompt"] == tok.apply_chat_template(row["context_messages"], add_generation_prompt=True, tokenize=False)
        assert record["finished"] and "<|" not in record["output"], record
        want = row["answer"].split("#### ")[-1]
        assert record["reward"] == float(record["output"].rstrip(".").split()[-1] == want), record  # "The answer is N"
    print(task, "greedy accuracy", sum(r["reward"] for r in records) / len(records))


# ----------------------------------------------------------------------------------------------
# Every trainer on the shape it is used with: (trainer, dataset, family, flags)

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{}\n\n### Response:\n"
COMMON = [
    "--max_steps",
    "2",
    "--micro_train_batch_size",
    "2",
    "--train_batch_size",
    "2",
    "--max_len",
    "256",
    "--learning_rate",
    "1e-4",
    "--lr_warmup_ratio",
    "0",
    "--zero_stage",
    "2",
]
SHAPES = {
    "sft-chat-qwen2": ("rlhf.sft", "chat", "qwen2", ["--input_key", "messages", "--output_key", "None", "--apply_chat_template"]),
    "sft-chat-llama3": ("rlhf.sft", "chat", "llama3", ["--input_key", "messages", "--output_key", "None", "--apply_chat_template"]),
    "sft-openorca-llama3": ("rlhf.sft", "openorca", "llama3", ["--input_key", "question", "--output_key", "response", "--packing_samples"]),
    "sft-alpaca-qwen2": (
        "rlhf.sft",
        "alpaca",
        "qwen2",
        ["--input_key", "input", "--output_key", "output", "--input_template", ALPACA_TEMPLATE],
    ),
    "rm-hh-llama3": ("rlhf.rm", "hh_rlhf", "llama3", ["--prompt_key", "None"]),
    "rm-ultrafeedback-snapshot-qwen2": (
        "rlhf.rm",
        "ultrafeedback_snapshot",
        "qwen2",
        [
            "--train_split",
            "train_prefs",
            "--eval_split",
            "test_prefs",
            "--chosen_key",
            "chosen",
            "--rejected_key",
            "rejected",
            "--apply_chat_template",
        ],
    ),
    "dpo-ultrafeedback-llama3": (
        "rlhf.dpo",
        "ultrafeedback",
        "llama3",
        ["--chosen_key", "chosen", "--rejected_key", "rejected", "--apply_chat_template", "--beta", "0.1"],
    ),
    "dpo-hh-qwen2": ("rlhf.dpo", "hh_rlhf", "qwen2", ["--prompt_key", "None"]),
    "kto-mix-llama3": (
        "rlhf.kto",
        "kto_mix",
        "llama3",
        ["--input_key", "prompt", "--output_key", "completion", "--label_key", "label", "--apply_chat_template"],
    ),
    "kto-mix-qwen2": (
        "rlhf.kto",
        "kto_mix",
        "qwen2",
        ["--input_key", "prompt", "--output_key", "completion", "--label_key", "label", "--apply_chat_template"],
    ),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.slow
def test_trainer_runs_on_real_shape(families, data, tmp_path, name):
    module, shape, family, flags = SHAPES[name]
    eval_flags = ["--eval_dataset", str(data[shape])] if shape == "ultrafeedback_snapshot" else ["--eval_holdout_ratio", "0.25"]
    run_trainer(
        module,
        [
            "--pretrain",
            str(families[family]),
            "--dataset",
            str(data[shape]),
            *eval_flags,
            *COMMON,
            *flags,
            "--save_path",
            str(tmp_path / "model"),
            "--ckpt_path",
            str(tmp_path / "ckpt"),
        ],
        nproc=0,
    )
    records = read_jsonl(tmp_path / "model" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(loss == loss and abs(loss) < 1e3 for loss in losses), records
    assert any(key.startswith("eval_") for r in records for key in r), records
    assert (tmp_path / "model" / "config.json").is_file()


def test_chat_reply_ends_at_the_turn_end(llama3_chat):
    """rlhf.chat with a Llama-3-style model: the reply stops at <|eot_id|> instead of running on
    into a made-up next turn (its tokenizer's EOS is <|end_of_text|>)."""
    import subprocess
    import sys

    from helpers import REPO, trainer_env

    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.chat", str(llama3_chat), "--max_new_tokens", "40"],
        input="What do bees make?\n/exit\n",
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [reply] = [line for line in proc.stdout.splitlines() if line.startswith("User: Assistant: ") or line.startswith("Assistant: ")]
    assert reply.endswith("Assistant: Bees make honey."), proc.stdout


@pytest.mark.parametrize("family", list(realdata.FAMILIES))
def test_long_rl_prompts_keep_their_end_and_bos(families, data, family):
    """--prompt_max_len cuts a prompt from the left (the question and the generation prompt are
    at the end); a Llama-3-style prompt keeps its BOS in front instead of losing it."""
    from rlhf.config import PromptDataConfig
    from rlhf.data.prompts import tokenize_prompts

    tok = load_tok(families[family])
    rows = rows_of(data["gsm8k_messages"])
    cfg = PromptDataConfig(input_key="context_messages", label_key="answer", apply_chat_template=True)
    full = tokenize_prompts(rows, tok, cfg)
    cut = tokenize_prompts(rows, tok, dataclasses.replace(cfg, prompt_max_len=20))
    for f, c in zip(full, cut):
        assert len(c.ids) == 20
        if BOS[family]:
            assert c.ids[0] == tok.bos_token_id and c.ids[1:] == f.ids[-19:] and c.ids.count(tok.bos_token_id) == 1
        else:
            assert c.ids == f.ids[-20:]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_grpo_on_prompt_collection_with_a_padded_vocab(families, data, tmp_path, backend):
    """OpenRLHF's prompt-collection (``context_messages``) under the Qwen2-like tokenizer, whose
    random model samples the 128 embedding rows past the tokenizer's vocabulary too (near-uniform
    logits: about one token in six is an id no tokenizer decodes): rollouts, rewards and the update
    still go through."""
    extra = ["--rollout_backend", "vllm", "--vllm_kv_cache_mb", "64"] if backend == "vllm" else []
    run_trainer(
        "rlhf.ppo",
        [
            *rl_args(families["qwen2"], data, tmp_path, "--max_steps", "1", "--eval_prompt_data", "None", "--eval_every", "5", *extra),
            "--prompt_data",
            str(data["prompt_collection"]),
            "--label_key",
            "None",
            "--generate_max_len",
            "16",
        ],
        nproc=1,
    )
    [record] = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "reward" in r]
    assert record["response_length"] > 0 and record["reward"] == 0.0, record  # no labels: the reward file gives 0


def test_scored_responses_continue_the_prompt_without_a_second_bos(families):
    """rlhf.generate --eval_task rm reads responses from the rows: their ids follow the prompt's,
    so a Llama-3-style BOS must not be put in front of them (it was: BOS in mid-sequence)."""
    from rlhf.config import PromptDataConfig
    from rlhf.data.prompts import tokenize_prompts
    from rlhf.generate import responses_from_row

    tok = load_tok(families["llama3"])
    [prompt] = tokenize_prompts(
        [{"q": "What do bees make?", "a": "Bees make honey."}],
        tok,
        PromptDataConfig(input_key="q", label_key=None, apply_chat_template=True),
    )
    ids = prompt.ids + responses_from_row(prompt, "a", tok)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[len(prompt.ids) :]) == "Bees make honey." + tok.eos_token
