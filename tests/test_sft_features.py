"""SFT features end to end: LoRA, QLoRA, packing, pre-training, conditional SFT, MoE, wandb, S3, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import read_jsonl, run_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhf

TINY = Path(rlhf.__file__).parent / "assets" / "tiny-qwen2"

BASE = [
    "--pretrain",
    "embedded:tiny-qwen2",
    "--max_len",
    "48",
    "--micro_train_batch_size",
    "8",
    "--train_batch_size",
    "16",
    "--max_samples",
    "320",
    "--learning_rate",
    "3e-3",
    "--lr_warmup_ratio",
    "0",
    "--eval_holdout_ratio",
    "0",
]


def run_sft(tmp_path: Path, *args: str, nproc: int = 2, env=None) -> list[dict]:
    out = tmp_path / "model"
    run_trainer("rlhf.sft", [*BASE, "--save_path", str(out), "--ckpt_path", str(tmp_path / "ckpt"), *args], nproc=nproc, env=env)
    return read_jsonl(out / "metrics.jsonl")


def train_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def assert_loss_falls(records: list[dict], factor: float) -> None:
    loss = train_losses(records)
    first, last = sum(loss[:2]) / 2, sum(loss[-2:]) / 2
    assert last < factor * first, f"loss did not fall enough: first {first:.3f}, last {last:.3f} (need < {factor} x first)"


def test_lora_trains_and_exports_an_adapter(tmp_path):
    records = run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/sft_train.jsonl",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "16",
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "30",
    )
    # Adapters on a random-init base with frozen embeddings learn slowly: measured 0.82 x.
    assert_loss_falls(records, 0.86)
    adapter = tmp_path / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), adapter).eval()
    ids = AutoTokenizer.from_pretrained(adapter)("12+7=", return_tensors="pt").input_ids
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the model's outputs


def test_qlora_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    records = run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/sft_train.jsonl",
        "--load_in_4bit",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "16",
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "30",
        "--zero_stage",
        "2",
    )
    assert_loss_falls(records, 0.86)  # measured 0.82 x, as full-precision LoRA


def test_packing_trains_and_matches_token_count(tmp_path):
    records = run_sft(tmp_path, "--dataset", "embedded:arith/sft_train.jsonl", "--packing_samples", "--max_steps", "8")
    assert_loss_falls(records, 0.8)


def test_continued_pretraining(tmp_path):
    records = run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/pretrain.jsonl",
        "--pretrain_mode",
        "--input_key",
        "text",
        "--max_steps",
        "8",
        "--max_len",
        "64",
    )
    assert_loss_falls(records, 0.8)


def test_conditional_sft_with_chat_template(tmp_path):
    records = run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/conditional_train.jsonl",
        "--score_key",
        "score",
        "--apply_chat_template",
        "--max_steps",
        "8",
        "--max_len",
        "64",
    )
    assert_loss_falls(records, 0.8)


def test_multiturn_chat_sft(tmp_path):
    records = run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/chat_train.jsonl",
        "--input_key",
        "messages",
        "--output_key",
        "None",
        "--apply_chat_template",
        "--max_steps",
        "8",
        "--max_len",
        "96",
    )
    assert_loss_falls(records, 0.8)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = run_sft(tmp_path / "a", "--dataset", "embedded:arith/sft_train.jsonl", "--max_steps", "3", "--zero_stage", "0")
    ckpt = run_sft(
        tmp_path / "b", "--dataset", "embedded:arith/sft_train.jsonl", "--max_steps", "3", "--zero_stage", "0", "--gradient_checkpointing"
    )
    assert train_losses(ckpt) == pytest.approx(train_losses(plain), abs=1e-5)


def test_moe_router_loss(tmp_path):
    """A tiny Mixtral-style model: --aux_loss_coef adds the router loss and it is logged."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = MixtralConfig(
        vocab_size=len(tokenizer) + (-len(tokenizer)) % 8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny-mixtral"
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    records = run_sft(
        tmp_path,
        "--pretrain",
        str(folder),
        "--dataset",
        "embedded:arith/sft_train.jsonl",
        "--aux_loss_coef",
        "0.01",
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "10",
    )
    aux = [r["aux_loss"] for r in records if "aux_loss" in r]
    assert len(aux) == 10 and all(a > 0 for a in aux)
    assert_loss_falls(records, 0.8)


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    wandb_dir = tmp_path / "wandb-root"
    wandb_dir.mkdir()
    run_sft(
        tmp_path,
        "--dataset",
        "embedded:arith/sft_train.jsonl",
        "--max_steps",
        "3",
        "--use_wandb",
        "--wandb_project",
        "rlhf-test",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)},
    )
    runs = list(wandb_dir.rglob("offline-run-*"))
    assert runs, f"no offline run under {wandb_dir}"
    files = list(runs[0].glob("*.wandb"))
    assert files and b"loss" in files[0].read_bytes()


def test_s3_dataset_in_and_export_out(tmp_path, s3_env):
    client = s3_env
    client.create_bucket(Bucket="rlhf-data")
    client.upload_file(str(TINY.parent / "arith" / "sft_train.jsonl"), "rlhf-data", "arith/train.jsonl")
    client.create_bucket(Bucket="rlhf-models")
    run_sft(tmp_path, "--dataset", "s3://rlhf-data/arith/train.jsonl", "--max_steps", "2", "--s3_save_path", "s3://rlhf-models/sft-tiny")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="rlhf-models", Prefix="sft-tiny/")["Contents"]}
    assert {"sft-tiny/config.json", "sft-tiny/model.safetensors", "sft-tiny/tokenizer.json"} <= keys
    # The uploaded model is the exported one: download and compare bytes.
    local = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert client.get_object(Bucket="rlhf-models", Key="sft-tiny/model.safetensors")["Body"].read() == local


@pytest.mark.slow
def test_sft_preset_learns_addition(sft_teacher_model):
    """The README's main job, first half: eval loss on held-out sums (scored against the TRUE
    answers, while the teacher's demonstrations are one too high 60% of the time) falls from ~2.05
    to ~0.50 nats/token; a model that had learned nothing would stay above 1."""
    evals = [r["eval_loss"] for r in read_jsonl(sft_teacher_model / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0] > 1.0
    assert evals[-1] < 0.7, f"eval loss curve {evals}"


def test_logged_lr_is_the_rate_the_step_used(tmp_path):
    """Linear warm-up over 2 of 4 steps starts at 0, so step 1 updates nothing: the log says lr 0
    there, then half the peak, then the peak (each step's own rate, not the next step's)."""
    records = run_sft(
        tmp_path,
        "--max_steps",
        "4",
        "--lr_warmup_ratio",
        "0.5",
        "--lr_scheduler",
        "constant_with_warmup",
        "--learning_rate",
        "1e-3",
        "--eval_steps",
        "-1",
    )
    steps = [r for r in records if "loss" in r]
    assert [r["lr"] for r in steps] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_bf16_trains(tmp_path):
    records = run_sft(tmp_path, "--dataset", "embedded:arith/sft_train.jsonl", "--bf16", "--zero_stage", "2", "--max_steps", "10")
    assert_loss_falls(records, 0.8)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_adam_offload_matches_torch_adamw(tmp_path):
    """--adam_offload (DeepSpeed CPU-Adam, JIT-built on first use) follows the same curve as torch AdamW."""
    common = ["--dataset", "embedded:arith/sft_train.jsonl", "--zero_stage", "2", "--max_steps", "4"]
    plain = run_sft(tmp_path / "plain", *common)
    offload = run_sft(tmp_path / "offload", *common, "--adam_offload")
    assert train_losses(offload) == pytest.approx(train_losses(plain), rel=1e-4)
