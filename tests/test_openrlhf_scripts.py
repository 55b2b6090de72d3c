"""OpenRLHF's example scripts ported by changing the launcher line (issue 12, items 4 and 10).

SCRIPTS transcribes the commands of OpenRLHF's `examples/scripts/train_*.sh` and
`interactive_chat_llama.sh` at tags v0.2.6 and v0.5.0 (our transcription of their flags; the
`deepspeed [--module] X` / `ray job submit ... -- python3 X` launcher dropped). The flags their
comments offer as options are listed as well. INVENTORY says, for every flag they use, what
the matching rlhf command does with it:

  same         our flag of that name, same meaning
  alias        an OpenRLHF spelling rewritten to ours (rlhf.config.OPENRLHF_ALIASES)
  implemented  added so that the flag keeps its OpenRLHF meaning here
  always_on    accepted; the behaviour it asks for is always on here (OPENRLHF_ALWAYS_ON)
  rejected     one line: the flag is not supported, and what to do instead

Scripts of programs rlhf does not have (train_kd.py, train_prm.py, serve_rm.py) are not ported.
The end-to-end runs (marked slow) run the same commands on CPU with the embedded tiny model and
data substituted and one step each.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys

import pytest
from helpers import REPO, read_jsonl, run_trainer, trainer_env

from rlhf.chat import ChatConfig
from rlhf.config import (
    OPENRLHF_ALIASES,
    OPENRLHF_ALWAYS_ON,
    OPENRLHF_REJECTED,
    DPOConfig,
    GenerateConfig,
    KTOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    flag_names,
    parse_config,
)
from rlhf.errors import UserError

CONFIGS = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "ppo": PPOConfig,
    "generate": GenerateConfig,
    "chat": ChatConfig,
}

# (script, step, rlhf command, the script's flags)
SCRIPTS = [
    (
        "v0.2.6/train_sft_llama.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset Open-Orca/OpenOrca --dataset_probs 1.0 --train_batch_size 128 "
        "--micro_train_batch_size 2 --max_samples 500000 --pretrain meta-llama/Llama-2-7b-hf "
        "--save_path ./ckpt/7b_llama --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--zero_stage 2 --max_epochs 1 --bf16 --flash_attn --learning_rate 5e-6 "
        "--gradient_checkpointing",
    ),
    (
        "v0.2.6/train_sft_mixtral_lora.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset Open-Orca/OpenOrca --dataset_probs 1.0 "
        "--train_batch_size 128 --micro_train_batch_size 4 --max_samples 500000 --pretrain "
        "mistralai/Mixtral-8x7B-v0.1 --save_path ./ckpt/mixtral_sft --save_steps -1 "
        "--logging_steps 1 --eval_steps -1 --zero_stage 3 --max_epochs 1 --bf16 "
        "--gradient_checkpointing --learning_rate 5e-6 --lora_rank 64 --lora_alpha 32 "
        "--aux_loss_coef 0.001",
    ),
    (
        "v0.2.6/train_continue_pretrain_llama.sh",
        "sft",
        "sft",
        "--max_len 4096 --dataset my_pretrain_dataset --dataset_probs 1.0 "
        "--train_batch_size 128 --micro_train_batch_size 1 --pretrain "
        "meta-llama/Llama-2-7b-hf --save_path ./ckpt/7b_llama --save_steps -1 "
        "--logging_steps 1 --eval_steps -1 --zero_stage 2 --max_epochs 1 --bf16 "
        "--flash_attn --learning_rate 3e-5 --gradient_checkpointing --pretrain_mode",
    ),
    (
        "v0.2.6/train_rm_llama.sh",
        "rm",
        "rm",
        "--save_path ./ckpt/7b_llama --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 128 --micro_train_batch_size 1 --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --bf16 --max_epochs 1 --max_len 2048 --zero_stage "
        "3 --learning_rate 9e-6 --dataset "
        "Anthropic/hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward,lmsys/chatbot_arena_conversations,openai/webgpt_comparisons --dataset_probs 0.72,0.08,0.12,0.08 --flash_attn --gradient_checkpointing",
    ),
    (
        "v0.2.6/train_dpo_llama.sh",
        "dpo",
        "dpo",
        "--save_path ./ckpt/7b_llama --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 128 --micro_train_batch_size 1 --pretrain "
        "OpenLLMAI/Llama-2-13b-sft-model-ocra-500k --bf16 --max_epochs 1 --max_len 2048 "
        "--zero_stage 3 --beta 0.1 --learning_rate 5e-7 --dataset "
        "Anthropic/hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward,lmsys/chatbot_arena_conversations,openai/webgpt_comparisons --dataset_probs 0.72,0.08,0.12,0.08 --flash_attn --gradient_checkpointing --ref_offload",
    ),
    ("v0.2.6/train_dpo_llama.sh (commented options)", "dpo", "dpo", "--wandb {wandb_token} --ipo"),
    ("v0.2.6/train_dpo_llama.sh (commented: cDPO)", "dpo", "dpo", "--label_smoothing 0.1"),
    (
        "v0.2.6/train_dpo_llama_34b.sh",
        "dpo",
        "dpo",
        "--save_path ./ckpt/13b_llama --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 128 --micro_train_batch_size 1 --pretrain "
        "codellama/CodeLlama-34b-Instruct-hf --bf16 --max_epochs 1 --max_len 2048 "
        "--zero_stage 3 --beta 0.1 --learning_rate 5e-7 --dataset "
        "Anthropic/hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward,lmsys/chatbot_arena_conversations,openai/webgpt_comparisons --dataset_probs 0.72,0.08,0.12,0.08 --flash_attn --gradient_checkpointing --adam_offload",
    ),
    (
        "v0.2.6/train_kto_llama.sh",
        "kto",
        "kto",
        "--save_path ./ckpt/llama_KTO_not_vanilla --save_steps 5000 --logging_steps 1 "
        "--eval_steps -1 --train_batch_size 128 --micro_train_batch_size 4 --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --bf16 --max_epochs 1 --max_len 2048 "
        "--zero_stage 3 --beta 0.1 --learning_rate 5e-7 --dataset "
        "Anthropic/hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward,openai/webgpt_comparisons "
        "--dataset_probs 0.72,0.14,0.14 --flash_attn --gradient_checkpointing --vanilla_loss",
    ),
    (
        "v0.2.6/train_kto_llama.sh (commented options)",
        "kto",
        "kto",
        "--dataset Dylan2048/ultrafeedback-unpaired-preferences --dataset_probs 1.0 --unpaired_preference",
    ),
    (
        "v0.2.6/train_ppo_llama.sh",
        "ppo",
        "ppo",
        "--pretrain OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --reward_pretrain "
        "OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt --save_path ./ckpt/7b_llama "
        "--save_steps -1 --logging_steps 1 --eval_steps -1 --micro_train_batch_size 2 "
        "--train_batch_size 128 --micro_rollout_batch_size 4 --rollout_batch_size 1024 "
        "--max_epochs 1 --prompt_max_len 1024 --generate_max_len 1024 --zero_stage 2 --bf16 "
        "--actor_learning_rate 5e-7 --critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data "
        "Open-Orca/OpenOrca,Dahoas/full-hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward "
        "--prompt_data_probs 0.4,0.5,0.1 --max_samples 80000 --normalize_reward "
        "--actor_init_on_gpu --adam_offload --flash_attn --gradient_checkpointing",
    ),
    (
        "v0.2.6/train_ppo_llama_ray.sh",
        "ppo",
        "ppo",
        "--ref_num_nodes 1 --ref_num_gpus_per_node 1 --reward_num_nodes 1 "
        "--reward_num_gpus_per_node 1 --critic_num_nodes 1 --critic_num_gpus_per_node 2 "
        "--actor_num_nodes 1 --actor_num_gpus_per_node 4 --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --reward_pretrain "
        "OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt --save_path "
        "/openrlhf/examples/test_scripts/ckpt/7b_llama --micro_train_batch_size 8 "
        "--train_batch_size 128 --micro_rollout_batch_size 16 --rollout_batch_size 1024 "
        "--max_epochs 1 --prompt_max_len 1024 --generate_max_len 1024 --zero_stage 2 --bf16 "
        "--actor_learning_rate 5e-7 --critic_learning_rate 9e-6 --init_kl_coef 0.01 "
        "--prompt_data "
        "Open-Orca/OpenOrca,Dahoas/full-hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward "
        "--prompt_data_probs 0.4,0.5,0.1 --max_samples 80000 --normalize_reward "
        "--actor_init_on_gpu --adam_offload --flash_attn --gradient_checkpointing --use_wandb "
        "{wandb_token}",
    ),
    (
        "v0.2.6/train_ppo_llama_ray_70b.sh",
        "ppo",
        "ppo",
        "--ref_num_nodes 1 --ref_num_gpus_per_node 2 --reward_num_nodes 1 "
        "--reward_num_gpus_per_node 2 --critic_num_nodes 1 --critic_num_gpus_per_node 4 "
        "--actor_num_nodes 1 --actor_num_gpus_per_node 4 --vllm_num_engines 2 "
        "--vllm_tensor_parallel_size 2 --pretrain meta-llama/Llama-2-70b-chat-hf "
        "--reward_pretrain meta-llama/Llama-2-70b-chat-hf --save_path /mnt/ckpt/llama_70b "
        "--micro_train_batch_size 1 --train_batch_size 128 --micro_rollout_batch_size 2 "
        "--rollout_batch_size 1024 --max_epochs 1 --prompt_max_len 1024 "
        "--generate_max_len 1024 --zero_stage 3 --bf16 --actor_learning_rate 5e-7 "
        "--critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data "
        "Open-Orca/OpenOrca,Dahoas/full-hh-rlhf,tasksource/oasst1_pairwise_rlhf_reward "
        "--prompt_data_probs 0.4,0.5,0.1 --max_samples 80000 --normalize_reward "
        "--actor_init_on_gpu --adam_offload --flash_attn --gradient_checkpointing",
    ),
    (
        "v0.2.6/train_rejection_sampling_llama.sh",
        "generate",
        "generate",
        "--eval_task generate_vllm --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --max_new_tokens 1024 "
        "--dataset Open-Orca/OpenOrca,Dahoas/full-hh-rlhf "
        "--dataset_probs 0.5,0.5 --temperature 0.9 --tp_size 8 "
        "--best_of_n 16 --iter 0 --rollout_batch_size 2048 --output_path "
        "./ckpt/7b_llama_rs/generate.jsonl",
    ),
    (
        "v0.2.6/train_rejection_sampling_llama.sh",
        "rm",
        "generate",
        "--eval_task rm --pretrain "
        "OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt --bf16 "
        "--max_len 2048 --dataset ./ckpt/7b_llama_rs/generate.jsonl "
        "--dataset_probs 1.0 --zero_stage 0 --post_processor rs "
        "--micro_batch_size 4 --output_path ./ckpt/7b_llama_rs/rm.jsonl",
    ),
    (
        "v0.2.6/train_rejection_sampling_llama.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset ./ckpt/7b_llama_rs/rm.jsonl --dataset_probs 1.0 "
        "--train_batch_size 128 --micro_train_batch_size 2 --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --save_path ./ckpt/7b_llama_rs "
        "--lr_scheduler constant --zero_stage 2 --max_epochs 1 --bf16 "
        "--learning_rate 2e-6 --gradient_checkpointing",
    ),
    (
        "v0.2.6/train_conditional_llama.sh",
        "rm",
        "generate",
        "--eval_task rm --pretrain "
        "OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt --bf16 --max_len "
        "2048 --dataset Open-Orca/OpenOrca,Dahoas/full-hh-rlhf --dataset_probs "
        "0.5,0.5 --max_samples 128000 --zero_stage 0 --post_processor ca "
        "--normalize_reward --micro_batch_size 4 --output_path "
        "./ckpt/7b_llama_ca/rm.jsonl",
    ),
    (
        "v0.2.6/train_conditional_llama.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset ./ckpt/7b_llama_ca/rm.jsonl --dataset_probs 1.0 "
        "--train_batch_size 128 --micro_train_batch_size 2 --pretrain "
        "OpenLLMAI/Llama-2-7b-sft-model-ocra-500k --save_path ./ckpt/7b_llama_ca "
        "--zero_stage 2 --max_epochs 1 --bf16 --learning_rate 5e-6 "
        "--gradient_checkpointing",
    ),
    ("v0.2.6/interactive_chat_llama.sh", "chat", "chat", "--pretrain ./ckpt/7b_llama --bf16"),
    (
        "v0.5.0/train_sft_llama.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset Open-Orca/OpenOrca --input_key question --output_key response "
        "--train_batch_size 256 --micro_train_batch_size 2 --max_samples 500000 --pretrain "
        "meta-llama/Meta-Llama-3-8B --save_path ./checkpoint/llama3-8b-sft --save_steps -1 "
        "--logging_steps 1 --eval_steps -1 --zero_stage 2 --max_epochs 1 --bf16 --flash_attn "
        "--learning_rate 5e-6 --load_checkpoint --gradient_checkpointing",
    ),
    ("v0.5.0/train_sft_llama.sh (commented options)", "sft", "sft", "--use_wandb {wandb_token} --packing_samples"),
    (
        "v0.5.0/train_sft_mixtral_lora.sh",
        "sft",
        "sft",
        "--max_len 2048 --dataset Open-Orca/OpenOrca --input_key question --output_key "
        "response --train_batch_size 128 --micro_train_batch_size 4 --max_samples 500000 "
        "--pretrain mistralai/Mixtral-8x7B-v0.1 --save_path ./checkpoint/mixtral-sft-lora "
        "--save_steps -1 --logging_steps 1 --eval_steps -1 --zero_stage 3 --max_epochs 1 "
        "--bf16 --gradient_checkpointing --flash_attn --learning_rate 5e-6 --lora_rank 64 "
        "--lora_alpha 64 --aux_loss_coef 0.001",
    ),
    (
        "v0.5.0/train_continue_pretrain_llama.sh",
        "sft",
        "sft",
        "--max_len 4096 --input_key text --dataset DKYoon/SlimPajama-6B "
        "--pretrain_mode --train_batch_size 128 --micro_train_batch_size 4 "
        "--max_samples 1000000 --pretrain meta-llama/Meta-Llama-3.1-8B-Instruct "
        "--save_path ./checkpoint/llama3.1-8b-cft --save_steps 5000 --logging_steps "
        "100 --eval_steps 500 --zero_stage 3 --max_epochs 1 --bf16 --flash_attn "
        "--learning_rate 3e-4 --gradient_checkpointing --packing_samples",
    ),
    (
        "v0.5.0/train_rm_llama.sh",
        "rm",
        "rm",
        "--save_path ./checkpoint/llama3-8b-rm --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 256 --micro_train_batch_size 1 --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_epochs 1 --max_len 8192 --zero_stage 3 "
        "--learning_rate 9e-6 --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku "
        "--apply_chat_template --chosen_key chosen --rejected_key rejected --flash_attn "
        "--load_checkpoint --gradient_checkpointing",
    ),
    ("v0.5.0/train_rm_llama.sh (commented options)", "rm", "rm", "--use_wandb {wandb_token} --packing_samples"),
    (
        "v0.5.0/train_dpo_llama.sh",
        "dpo",
        "dpo",
        "--save_path ./checkpoint/llama3-8b-dpo --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 256 --micro_train_batch_size 1 --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_epochs 1 --max_len 8192 --zero_stage 3 "
        "--learning_rate 5e-7 --beta 0.1 --dataset "
        "OpenRLHF/preference_dataset_mixture2_and_safe_pku --apply_chat_template --chosen_key "
        "chosen --rejected_key rejected --flash_attn --load_checkpoint --gradient_checkpointing",
    ),
    (
        "v0.5.0/train_dpo_llama.sh (commented options)",
        "dpo",
        "dpo",
        "--use_wandb {wandb_token} --ipo --ref_offload --packing_samples --nll_loss_coef 0.1",
    ),
    ("v0.5.0/train_dpo_llama.sh (commented: cDPO)", "dpo", "dpo", "--label_smoothing 0.1"),
    (
        "v0.5.0/train_dpo_llama_34b.sh",
        "dpo",
        "dpo",
        "--save_path ./checkpoint/llama2-34b-dpo --save_steps -1 --logging_steps 1 "
        "--eval_steps -1 --train_batch_size 128 --micro_train_batch_size 1 --pretrain "
        "codellama/CodeLlama-34b-Instruct-hf --bf16 --max_epochs 1 --max_len 2048 "
        "--zero_stage 3 --beta 0.1 --learning_rate 5e-7 --dataset "
        "OpenRLHF/preference_dataset_mixture2_and_safe_pku --apply_chat_template --chosen_key "
        "chosen --rejected_key rejected --flash_attn --gradient_checkpointing --adam_offload",
    ),
    (
        "v0.5.0/train_dpo_ring_llama.sh",
        "dpo",
        "dpo",
        "--save_path ./checkpoint/llama3-8b-ring-dpo --save_steps -1 --logging_steps 1 "
        "--eval_steps -1 --train_batch_size 256 --micro_train_batch_size 1 --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_epochs 1 --max_len 8192 --zero_stage 3 "
        "--learning_rate 5e-7 --beta 0.1 --dataset "
        "OpenRLHF/preference_dataset_mixture2_and_safe_pku --apply_chat_template "
        "--chosen_key chosen --rejected_key rejected --ring_attn_size 2 --ring_head_stride 2 "
        "--packing_samples --flash_attn --load_checkpoint --gradient_checkpointing",
    ),
    (
        "v0.5.0/train_kto_llama.sh",
        "kto",
        "kto",
        "--save_path ./checkpoint/llama3-8b-kto --save_steps -1 --logging_steps 1 --eval_steps -1 "
        "--train_batch_size 64 --micro_train_batch_size 1 --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_epochs 1 --max_len 8192 --zero_stage 3 "
        "--learning_rate 5e-7 --dataset Dylan2048/ultrafeedback-unpaired-preferences --input_key "
        "instruction --output_key response --label_key score --flash_attn --beta 0.1 "
        "--max_samples 1024 --gradient_checkpointing",
    ),
    (
        "v0.5.0/train_ppo_llama.sh",
        "ppo",
        "ppo",
        "--pretrain OpenRLHF/Llama-3-8b-sft-mixture --reward_pretrain "
        "OpenRLHF/Llama-3-8b-rm-mixture --save_path ./checkpoint/llama-3-8b-rlhf --save_steps -1 "
        "--logging_steps 1 --eval_steps -1 --micro_train_batch_size 2 --train_batch_size 128 "
        "--micro_rollout_batch_size 4 --rollout_batch_size 1024 --max_epochs 1 --prompt_max_len "
        "1024 --generate_max_len 1024 --zero_stage 2 --bf16 --actor_learning_rate 5e-7 "
        "--critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data "
        "OpenRLHF/prompt-collection-v0.1 --input_key context_messages --apply_chat_template "
        "--max_samples 100000 --normalize_reward --adam_offload --flash_attn --load_checkpoint "
        "--gradient_checkpointing",
    ),
    (
        "v0.5.0/train_ppo_llama.sh (commented options)",
        "ppo",
        "ppo",
        "--reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture --packing_samples "
        "--use_wandb {wandb_token} --remote_rm_url "
        "http://localhost:5000/get_reward",
    ),
    (
        "v0.5.0/train_ppo_llama_ray.sh",
        "ppo",
        "ppo",
        "--ref_num_nodes 1 --ref_num_gpus_per_node 2 --reward_num_nodes 1 "
        "--reward_num_gpus_per_node 2 --critic_num_nodes 1 --critic_num_gpus_per_node 2 "
        "--actor_num_nodes 1 --actor_num_gpus_per_node 2 --vllm_num_engines 2 "
        "--vllm_tensor_parallel_size 2 --colocate_critic_reward --colocate_actor_ref "
        "--pretrain OpenRLHF/Llama-3-8b-sft-mixture --reward_pretrain "
        "OpenRLHF/Llama-3-8b-rm-mixture --save_path "
        "/openrlhf/examples/checkpoint/llama3-8b-rlhf --micro_train_batch_size 8 "
        "--train_batch_size 128 --micro_rollout_batch_size 32 --rollout_batch_size 1024 "
        "--max_samples 100000 --max_epochs 1 --prompt_max_len 1024 --generate_max_len 1024 "
        "--zero_stage 3 --bf16 --actor_learning_rate 5e-7 --critic_learning_rate 9e-6 "
        "--init_kl_coef 0.01 --prompt_data OpenRLHF/prompt-collection-v0.1 --input_key "
        "context_messages --apply_chat_template --normalize_reward --packing_samples "
        "--adam_offload --flash_attn --gradient_checkpointing --load_checkpoint --use_wandb "
        "{wandb_token}",
    ),
    (
        "v0.5.0/train_ppo_llama_ray.sh (commented options)",
        "ppo",
        "ppo",
        "--reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture --ref_reward_offload --remote_rm_url http://localhost:5000/get_reward",
    ),
    (
        "v0.5.0/train_ppo_llama_with_remote_rm.sh",
        "ppo",
        "ppo",
        "--ref_num_nodes 1 --ref_num_gpus_per_node 2 --reward_num_nodes 1 "
        "--reward_num_gpus_per_node 2 --critic_num_nodes 1 "
        "--critic_num_gpus_per_node 2 --actor_num_nodes 1 "
        "--actor_num_gpus_per_node 2 --vllm_num_engines 2 "
        "--vllm_tensor_parallel_size 2 --colocate_actor_ref --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --remote_rm_url "
        "http://localhost:5000/get_reward --save_path "
        "/openrlhf/examples/checkpoint/llama3-8b-rlhf --micro_train_batch_size 8 "
        "--train_batch_size 128 --micro_rollout_batch_size 16 --rollout_batch_size "
        "1024 --max_samples 100000 --max_epochs 1 --prompt_max_len 1024 "
        "--generate_max_len 1024 --zero_stage 3 --bf16 --actor_learning_rate 5e-7 "
        "--critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data "
        "OpenRLHF/prompt-collection-v0.1 --input_key context_messages "
        "--apply_chat_template --normalize_reward --adam_offload --flash_attn "
        "--gradient_checkpointing --use_wandb {wandb_token}",
    ),
    (
        "v0.5.0/train_rejection_sampling_llama.sh",
        "generate",
        "generate",
        "--eval_task generate_vllm --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_new_tokens 2048 "
        "--prompt_max_len 2048 --dataset OpenRLHF/prompt-collection-v0.1 "
        "--input_key context_messages --apply_chat_template "
        "--temperature 0.9 --zero_stage 0 --best_of_n 4 "
        "--enable_prefix_caching --tp_size 4 --max_num_seqs 64 --iter 0 "
        "--rollout_batch_size 10240 --output_path "
        "./checkpoint/llama-3-8b-rejection/generate.jsonl",
    ),
    (
        "v0.5.0/train_rejection_sampling_llama.sh",
        "rm",
        "generate",
        "--eval_task rm --pretrain OpenRLHF/Llama-3-8b-rm-mixture --bf16 "
        "--max_len 4096 --dataset "
        "./checkpoint/llama-3-8b-rejection/generate.jsonl --dataset_probs 1.0 "
        "--zero_stage 0 --post_processor rs --micro_batch_size 4 --output_path "
        "./checkpoint/llama-3-8b-rejection/rm.jsonl",
    ),
    (
        "v0.5.0/train_rejection_sampling_llama.sh",
        "sft",
        "sft",
        "--max_len 4096 --dataset ./checkpoint/llama-3-8b-rejection/rm.jsonl "
        "--dataset_probs 1.0 --train_batch_size 128 --micro_train_batch_size 2 "
        "--pretrain OpenRLHF/Llama-3-8b-sft-mixture --save_path "
        "./checkpoint/llama-3-8b-rejection --input_template '' --zero_stage 2 "
        "--max_epochs 1 --bf16 --learning_rate 2e-6 --gradient_checkpointing",
    ),
    (
        "v0.5.0/train_iterative_dpo_llama.sh",
        "generate",
        "generate",
        "--eval_task generate_vllm --pretrain OpenRLHF/Llama-3-8b-sft-mixture "
        "--max_new_tokens 2048 --prompt_max_len 2048 --dataset "
        "OpenRLHF/prompt-collection-v0.1 --input_key context_messages "
        "--apply_chat_template --temperature 1.0 --tp_size 4 --best_of_n 8 "
        "--enable_prefix_caching --max_num_seqs 64 --iter 0 "
        "--rollout_batch_size 10240 --output_path "
        "./checkpoint/llama-3-8b-iter-dpo/generate.jsonl",
    ),
    (
        "v0.5.0/train_iterative_dpo_llama.sh",
        "rm",
        "generate",
        "--eval_task rm --pretrain OpenRLHF/Llama-3-8b-rm-mixture --bf16 --max_len "
        "4096 --dataset ./checkpoint/llama-3-8b-iter-dpo/generate.jsonl "
        "--dataset_probs 1.0 --zero_stage 0 --post_processor iter_dpo "
        "--micro_batch_size 4 --output_path "
        "./checkpoint/llama-3-8b-iter-dpo/rm.jsonl",
    ),
    (
        "v0.5.0/train_iterative_dpo_llama.sh",
        "dpo",
        "dpo",
        "--max_len 4096 --dataset ./checkpoint/llama-3-8b-iter-dpo/rm.jsonl "
        "--dataset_probs 1.0 --prompt_key prompt --train_batch_size 128 "
        "--micro_train_batch_size 2 --pretrain OpenRLHF/Llama-3-8b-sft-mixture "
        "--ref_pretrain OpenRLHF/Llama-3-8b-sft-mixture --save_path "
        "./checkpoint/llama-3-8b-iter-dpo/checkpoint --zero_stage 3 --max_epochs 1 "
        "--bf16 --learning_rate 5e-7 --gradient_checkpointing",
    ),
    (
        "v0.5.0/train_conditional_llama.sh",
        "rm",
        "generate",
        "--eval_task rm --pretrain OpenRLHF/Llama-3-8b-rm-mixture --bf16 --max_len "
        "4096 --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku --input_key "
        "chosen --apply_chat_template --max_samples 128000 --zero_stage 0 "
        "--post_processor csft --normalize_reward --micro_batch_size 4 --output_path "
        "./checkpoint/llama-2-8b-csft/rm.jsonl",
    ),
    (
        "v0.5.0/train_conditional_llama.sh",
        "sft",
        "sft",
        "--max_len 4096 --dataset ./checkpoint/llama-2-8b-csft/rm.jsonl --dataset_probs "
        "1.0 --train_batch_size 128 --micro_train_batch_size 2 --pretrain "
        "OpenRLHF/Llama-3-8b-sft-mixture --save_path ./checkpoint/llama-3-8b-csft "
        "--zero_stage 2 --max_epochs 1 --bf16 --learning_rate 5e-6 "
        "--gradient_checkpointing",
    ),
]

_TRAIN_SAME = (
    "save_path save_steps logging_steps eval_steps train_batch_size micro_train_batch_size pretrain bf16 max_epochs max_len zero_stage "
    "learning_rate dataset dataset_probs flash_attn gradient_checkpointing adam_offload load_checkpoint max_samples use_wandb "
    "apply_chat_template input_key output_key"
)
INVENTORY: dict[str, dict[str, str]] = {
    "sft": {
        **dict.fromkeys((_TRAIN_SAME + " pretrain_mode lora_rank lora_alpha aux_loss_coef packing_samples input_template").split(), "same"),
        "wandb": "alias",
        "lr_scheduler": "implemented",
        "multiturn": "implemented",
    },
    "rm": {**dict.fromkeys((_TRAIN_SAME + " chosen_key rejected_key").split(), "same"), "wandb": "alias", "packing_samples": "rejected"},
    "dpo": {
        **dict.fromkeys(
            (_TRAIN_SAME + " beta chosen_key rejected_key prompt_key ref_pretrain label_smoothing nll_loss_coef packing_samples").split(),
            "same",
        ),
        "wandb": "alias",
        "ipo": "alias",
        "ref_offload": "implemented",
        "ring_attn_size": "rejected",
        "ring_head_stride": "rejected",
    },
    "kto": {
        **dict.fromkeys((_TRAIN_SAME + " beta label_key").split(), "same"),
        "wandb": "alias",
        "ref_offload": "implemented",
        "unpaired_preference": "always_on",
        "vanilla_loss": "rejected",
    },
    "ppo": {
        **dict.fromkeys(
            (
                "pretrain reward_pretrain save_path save_steps logging_steps micro_train_batch_size train_batch_size micro_rollout_batch_size "
                "rollout_batch_size prompt_max_len generate_max_len "
                "zero_stage bf16 actor_learning_rate critic_learning_rate init_kl_coef prompt_data prompt_data_probs max_samples "
                "normalize_reward adam_offload flash_attn gradient_checkpointing "
                "use_wandb load_checkpoint input_key apply_chat_template remote_rm_url ref_reward_offload vllm_num_engines "
                "vllm_tensor_parallel_size colocate_critic_reward colocate_actor_ref "
                "actor_num_nodes actor_num_gpus_per_node critic_num_nodes critic_num_gpus_per_node reward_num_nodes reward_num_gpus_per_node "
                "ref_num_nodes ref_num_gpus_per_node packing_samples"
            ).split(),
            "same",
        ),
        "wandb": "alias",
        "max_epochs": "implemented",
        "eval_steps": "implemented",
        "actor_init_on_gpu": "always_on",
    },
    "generate": {
        **dict.fromkeys(
            "eval_task bf16 dataset dataset_probs max_samples normalize_reward micro_batch_size output_path temperature "
            "best_of_n rollout_batch_size input_key apply_chat_template prompt_max_len".split(),
            "same",
        ),
        "pretrain": "implemented",  # also the reward model of --eval_task rm, as in OpenRLHF
        "max_new_tokens": "alias",
        "tp_size": "alias",
        "greedy_sampling": "alias",
        "iter": "implemented",
        "post_processor": "implemented",
        "max_len": "implemented",
        "zero_stage": "implemented",
        "max_num_seqs": "implemented",
        "enable_prefix_caching": "always_on",
    },
    "chat": {
        "bf16": "same",
        "pretrain": "implemented",
        "max_len": "implemented",
        "greedy_sampling": "alias",
        "apply_chat_template": "always_on",
    },
}


def split_flags(command: str) -> list[tuple[str, list[str]]]:
    """'--a 1 --b --c x y' -> [('--a', ['1']), ('--b', []), ('--c', ['x', 'y'])]."""
    out: list[tuple[str, list[str]]] = []
    for token in shlex.split(command):
        if token.startswith("--"):
            out.append((token, []))
        else:
            out[-1][1].append(token)
    return out


def join_flags(flags: list[tuple[str, list[str]]]) -> list[str]:
    return [t for flag, values in flags for t in (flag, *values)]


@pytest.fixture(autouse=True)
def _keep_wandb_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "test-key")  # `--use_wandb TOKEN` sets it only when absent


def test_every_script_flag_is_in_the_inventory():
    for script, step, command, flags in SCRIPTS:
        missing = [f for f, _ in split_flags(flags) if f[2:] not in INVENTORY[command]]
        assert not missing, f"{script} ({step}): {missing} not in INVENTORY[{command!r}]"


def test_inventory_agrees_with_the_parsers():
    """Each status is what the parser really does: `same` / `implemented` flags are our own
    options, `alias` / `always_on` / `rejected` ones are in the OpenRLHF tables of that command."""
    for command, flags in INVENTORY.items():
        cls = CONFIGS[command]
        ours = (
            set(flag_names(cls))
            - set(OPENRLHF_ALIASES["*"])
            - set(OPENRLHF_ALIASES.get(cls.__name__, {}))
            - set(OPENRLHF_ALWAYS_ON.get(cls.__name__, {}))
        )
        for flag, status in flags.items():
            table = {
                "alias": {**OPENRLHF_ALIASES["*"], **OPENRLHF_ALIASES.get(cls.__name__, {})},
                "always_on": OPENRLHF_ALWAYS_ON.get(cls.__name__, {}),
                "rejected": OPENRLHF_REJECTED.get(cls.__name__, {}),
            }
            if status in ("same", "implemented"):
                assert f"--{flag}" in ours, (command, flag)
            elif status == "rejected" and command == "rm":
                assert f"--{flag}" in ours  # rejected by RMConfig.validate, see test_script_parses
            else:
                assert f"--{flag}" in table[status], (command, flag, status)


SCRIPT_IDS = [f"{script} [{step}]" for script, step, _, _ in SCRIPTS]

# Scripts whose combination of flags is refused (the flag alone is fine): script -> (flag, words of
# the error). None today: v0.5.0's train_ppo_llama_with_remote_rm.sh passes --normalize_reward with
# only a reward server, which OpenRLHF's trainer ignores; here it parses with a warning
# (test_input_errors.test_normalize_reward_without_a_reward_model_warns).
REFUSED_COMBINATIONS: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("script, step, command, flags", SCRIPTS, ids=SCRIPT_IDS)
def test_script_parses(script, step, command, flags):
    """The script's own command parses; each rejected flag stops it with one line naming the
    flag and what to do; without the rejected flags the rest parses."""
    cls = CONFIGS[command]
    parsed = split_flags(flags)
    rejected = [(f, v) for f, v in parsed if INVENTORY[command][f[2:]] == "rejected"]
    for flag, values in rejected:
        with pytest.raises(UserError) as err:
            parse_config(cls, [flag, *values] + join_flags([p for p in parsed if p[0] != flag and p not in rejected]))
        message = str(err.value)
        assert message.startswith(f"{flag} is not supported") and "\n" not in message, message
    if script in REFUSED_COMBINATIONS:
        flag, words = REFUSED_COMBINATIONS[script]
        with pytest.raises(UserError, match=words):
            parse_config(cls, join_flags([p for p in parsed if p not in rejected]))
        rejected += [p for p in parsed if p[0] == flag]
    rest = join_flags([p for p in parsed if p not in rejected])
    config = parse_config(cls, rest)
    assert dataclasses.is_dataclass(config)


@pytest.mark.parametrize(
    "command, openrlhf, ours",
    [
        ("dpo", ["--ipo"], ["--loss_type", "ipo"]),
        ("sft", ["--wandb"], ["--use_wandb"]),
        ("sft", ["--use_wandb", "{wandb_token}"], ["--use_wandb"]),
        ("generate", ["--max_new_tokens", "7", "--tp_size", "2"], ["--generate_max_len", "7", "--vllm_tensor_parallel_size", "2"]),
        ("generate", ["--greedy_sampling"], ["--temperature", "0"]),
        ("generate", ["--enable_prefix_caching"], []),
        ("chat", ["--pretrain", "m", "--greedy_sampling", "--apply_chat_template"], ["m", "--temperature", "0"]),
        ("kto", ["--unpaired_preference"], []),
        ("ppo", ["--reward_func", "rlhf.rewards:exact_match", "--actor_init_on_gpu"], ["--reward_func", "rlhf.rewards:exact_match"]),
        (
            "ppo",
            ["--reward_func", "rlhf.rewards:exact_match", "--max_epochs", "2", "--eval_steps", "3"],
            ["--reward_func", "rlhf.rewards:exact_match", "--ppo_epochs", "2", "--eval_every", "3"],
        ),
    ],
)
def test_openrlhf_spelling_equals_ours(command, openrlhf, ours):
    a, b = parse_config(CONFIGS[command], openrlhf), parse_config(CONFIGS[command], ours)
    if command == "chat":
        b.pretrain = "m"  # the only difference: where the model name came from
    if command == "ppo":
        b.train.max_epochs, b.train.eval_steps = a.train.max_epochs, a.train.eval_steps  # the OpenRLHF names themselves
    assert a == b


def test_ppo_max_epochs_is_passes_over_each_rollout_batch():
    """Item 4: it was accepted and ignored; now it sets the PPO epochs, and a clash is an error."""
    base = ["--reward_func", "rlhf.rewards:exact_match"]
    assert parse_config(PPOConfig, base + ["--max_epochs", "3"]).algo.ppo_epochs == 3
    assert parse_config(PPOConfig, base + ["--ppo_epochs", "2"]).train.max_epochs == 2
    with pytest.raises(UserError, match="--max_epochs 2 and --ppo_epochs 3 disagree"):
        parse_config(PPOConfig, base + ["--max_epochs", "2", "--ppo_epochs", "3"])


def test_use_wandb_token_becomes_the_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    assert parse_config(SFTConfig, ["--use_wandb", "abc123"]).log.use_wandb
    assert os.environ["WANDB_API_KEY"] == "abc123"


def test_generate_rm_task_scores_with_pretrain_and_reads_output():
    cfg = parse_config(GenerateConfig, ["--eval_task", "rm", "--pretrain", "./my-rm"])
    assert cfg.task.reward_pretrain == "./my-rm" and cfg.task.output_key == "output"
    with pytest.raises(UserError, match="--zero_stage 3: batch inference holds a full copy"):
        parse_config(GenerateConfig, ["--zero_stage", "3"])
    with pytest.raises(UserError, match="--post_processor rs works on scored rows"):
        parse_config(GenerateConfig, ["--post_processor", "rs"])


def test_sft_multiturn_trains_on_every_assistant_turn():
    cfg = parse_config(SFTConfig, ["--multiturn", "--apply_chat_template", "--input_key", "messages"])
    assert cfg.data.output_key is None  # the same as --output_key None: loss on every assistant turn
    with pytest.raises(UserError, match="--multiturn needs --apply_chat_template"):
        parse_config(SFTConfig, ["--multiturn"])


# ----------------------------------------------------------------------------------------------
# --post_processor on scored rows (pure functions; expected rows worked out by hand)

ROWS = [
    {"prompt": "1+1=", "output": "2", "reward": 1.0},
    {"prompt": "1+1=", "output": "3", "reward": -1.0},
    {"prompt": "1+1=", "output": "22", "reward": 1.0},  # ties the best: the first one stays
    {"prompt": "2+2=", "output": "4", "reward": 0.0},
]


def test_post_processors():
    from rlhf.generate import POST_PROCESSORS

    task = GenerateConfig().task
    assert POST_PROCESSORS["rs"](ROWS, task) == [
        {"input": "1+1=", "output": "2", "reward": 1.0},
        {"input": "2+2=", "output": "4", "reward": 0.0},
    ]
    assert POST_PROCESSORS["iter_dpo"](ROWS, task) == [
        {"prompt": "1+1=", "chosen": "2", "chosen_reward": 1.0, "rejected": "3", "rejected_reward": -1.0},
        {"prompt": "2+2=", "chosen": "4", "chosen_reward": 0.0, "rejected": "4", "rejected_reward": 0.0},
    ]
    plain = POST_PROCESSORS["csft"](ROWS, task)
    assert [r["input"] for r in plain] == [
        "1+1= <rm_score>: 1.00 ",
        "1+1= <rm_score>: -1.00 ",
        "1+1= <rm_score>: 1.00 ",
        "2+2= <rm_score>: 0.00 ",
    ]
    # --normalize_reward: rewards 1, -1, 1, 0 have mean 0.25 and sample std sqrt(2.75/3) = 0.9574
    task.normalize_reward = True
    normed = POST_PROCESSORS["ca"](ROWS, task)
    assert [r["input"].split(": ")[1].strip() for r in normed] == ["0.78", "-1.31", "0.78", "-0.26"]


def test_rm_task_max_len_cuts_the_response_and_keeps_eos():
    from types import SimpleNamespace

    from rlhf.generate import responses_from_row

    class Tok:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    prompt = SimpleNamespace(ids=[1, 2, 3], row={"output": "abcdef"})
    assert responses_from_row(prompt, "output", Tok()) == [97, 98, 99, 100, 101, 102, 0]
    assert responses_from_row(prompt, "output", Tok(), max_len=6) == [97, 98, 0]  # 3 prompt + 3 response tokens


# ----------------------------------------------------------------------------------------------
# The scripts run: the same commands with the embedded tiny model and data, one step each.

TINY = "embedded:tiny-qwen2"
ARITH = "embedded:arith"


def tiny(flags: str, **replace: str) -> list[str]:
    """The script's flags with sizes and names swapped for tiny ones (`--flag value` pairs in
    ``replace``, value '' = drop the flag); flags GPU-only on CPU (--flash_attn) are dropped."""
    parsed = [(f, v) for f, v in split_flags(flags) if f != "--flash_attn"]
    out = []
    for flag, values in parsed:
        key = flag[2:]
        if key in replace:
            if replace[key] != "":
                out.append((flag, shlex.split(replace[key])))
        else:
            out.append((flag, values))
    extra = [(f"--{k}", shlex.split(v)) for k, v in replace.items() if v != "" and f"--{k}" not in [f for f, _ in parsed]]
    return join_flags(out + extra)


def script(name: str, step: str) -> str:
    return next(flags for s, st, _, flags in SCRIPTS if s == name and st == step)


def tiny_reward_model(folder):
    """The embedded tiny model as a reward model, with the score statistics rlhf.rm stores
    (reward_mean, reward_std in config.json) so that --normalize_reward has them."""
    import json
    import shutil

    from rlhf.models.loading import resolve_model_path

    shutil.copytree(resolve_model_path(TINY), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "reward_mean": 0.1, "reward_std": 0.5}))
    return folder


TRAIN_TINY = dict(
    pretrain=TINY,
    train_batch_size="4",
    micro_train_batch_size="2",
    max_len="64",
    max_samples="8",
    max_steps="1",
    eval_holdout_ratio="0",
    learning_rate="1e-4",
)


@pytest.mark.slow
def test_ported_sft_rm_dpo_kto_scripts_run(tmp_path):
    out = lambda name: ["--save_path", str(tmp_path / name), "--ckpt_path", str(tmp_path / f"{name}-ckpt")]
    sft = tiny(
        script("v0.5.0/train_sft_llama.sh", "sft"),
        **TRAIN_TINY,
        dataset=f"{ARITH}/sft_train.jsonl",
        input_key="input",
        output_key="output",
        load_checkpoint="",
    )
    run_trainer("rlhf.sft", sft + out("sft"), nproc=0)
    rm = tiny(script("v0.2.6/train_rm_llama.sh", "rm"), **TRAIN_TINY, dataset=f"{ARITH}/prefs_train.jsonl", dataset_probs="1.0")
    run_trainer("rlhf.rm", rm + out("rm"), nproc=0)
    dpo = tiny(script("v0.2.6/train_dpo_llama.sh", "dpo"), **TRAIN_TINY, dataset=f"{ARITH}/prefs_train.jsonl", dataset_probs="1.0")
    assert "--ref_offload" in dpo
    run_trainer("rlhf.dpo", dpo + out("dpo"), nproc=0)
    kto = tiny(
        script("v0.5.0/train_kto_llama.sh", "kto"),
        **TRAIN_TINY,
        dataset=f"{ARITH}/kto_train.jsonl",
        input_key="prompt",
        output_key="completion",
        label_key="label",
    )
    run_trainer("rlhf.kto", kto + out("kto"), nproc=0)
    for name in ("sft", "rm", "dpo", "kto"):
        assert (tmp_path / name / "config.json").is_file(), name
        assert [r["step"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r] == [1], name


@pytest.mark.slow
def test_ported_ppo_script_runs(tmp_path):
    """v0.2.6's train_ppo_llama.sh (critic, reward model with --normalize_reward,
    --actor_init_on_gpu), with --max_epochs 2 (two passes over the rollout batch: see
    test_ppo_max_epochs_is_passes_over_each_rollout_batch)."""
    reward_model = tiny_reward_model(tmp_path / "rm")
    flags = tiny(
        script("v0.2.6/train_ppo_llama.sh", "ppo"),
        pretrain=TINY,
        reward_pretrain=str(reward_model),
        prompt_data=f"{ARITH}/prompts_train.jsonl",
        prompt_data_probs="1.0",
        micro_train_batch_size="4",
        train_batch_size="4",
        micro_rollout_batch_size="4",
        rollout_batch_size="4",
        max_epochs="2",
        prompt_max_len="16",
        generate_max_len="4",
        max_samples="4",
        adam_offload="",
        max_steps="1",
        save_path=str(tmp_path / "model"),
        ckpt_path=str(tmp_path / "ckpt"),
    )
    assert "--actor_init_on_gpu" in flags and "--normalize_reward" in flags
    run_trainer("rlhf.ppo", flags, nproc=0)
    records = [r for r in read_jsonl(tmp_path / "model" / "metrics.jsonl") if "policy_loss" in r]
    assert len(records) == 1 and (tmp_path / "model" / "config.json").is_file()


@pytest.mark.slow
def test_ported_batch_inference_loops_run(tmp_path):
    """The rejection-sampling loop of v0.2.6 (generate_vllm -> rm with --post_processor rs ->
    SFT, round --iter 0 and 1) and the conditional-SFT pipeline (rm with --post_processor ca
    --normalize_reward -> SFT), with the tiny model as policy and as reward model."""
    generate = script("v0.2.6/train_rejection_sampling_llama.sh", "generate")
    score = script("v0.2.6/train_rejection_sampling_llama.sh", "rm")
    sft = script("v0.2.6/train_rejection_sampling_llama.sh", "sft")
    policy = TINY
    for it in (0, 1):
        gen_out, rm_out, model = tmp_path / f"gen{it}.jsonl", tmp_path / f"rm{it}.jsonl", tmp_path / f"rs{it}"
        run_trainer(
            "rlhf.generate",
            tiny(
                generate,
                pretrain=policy,
                max_new_tokens="4",
                prompt_max_len="16",
                dataset=f"{ARITH}/prompts_train.jsonl",
                dataset_probs="1.0",
                tp_size="1",
                best_of_n="2",
                iter=str(it),
                rollout_batch_size="4",
                output_path=str(gen_out),
            ),
            nproc=0,
        )
        rows = read_jsonl(gen_out)
        assert len(rows) == 8 and all("input" in r and "output" in r for r in rows)
        run_trainer("rlhf.generate", tiny(score, pretrain=TINY, max_len="32", dataset=str(gen_out), output_path=str(rm_out)), nproc=0)
        kept = read_jsonl(rm_out)
        assert len(kept) == 4 and all(set(r) == {"input", "output", "reward"} for r in kept)
        run_trainer(
            "rlhf.sft",
            tiny(sft, **TRAIN_TINY | {"pretrain": policy}, dataset=str(rm_out), save_path=str(model), ckpt_path=str(tmp_path / f"ck{it}")),
            nproc=0,
        )
        policy = str(model)
    first, second = ({r["input"] for r in read_jsonl(tmp_path / f"gen{k}.jsonl")} for k in (0, 1))
    assert not first & second  # --iter takes a new slice of prompts each round

    conditional = script("v0.2.6/train_conditional_llama.sh", "rm")
    csft_out = tmp_path / "csft.jsonl"
    run_trainer(
        "rlhf.generate",
        tiny(
            conditional,
            pretrain=str(tiny_reward_model(tmp_path / "rm")),
            max_len="32",
            dataset=f"{ARITH}/sft_train.jsonl",
            dataset_probs="1.0",
            max_samples="4",
            output_path=str(csft_out),
        ),
        nproc=0,
    )
    rows = read_jsonl(csft_out)
    assert len(rows) == 4 and all(" <rm_score>: " in r["input"] for r in rows)
    assert abs(sum(r["reward"] for r in rows)) < 1e-6  # z-scored over the rows (--normalize_reward)
    sft = script("v0.2.6/train_conditional_llama.sh", "sft")
    run_trainer(
        "rlhf.sft",
        tiny(sft, **TRAIN_TINY, dataset=str(csft_out), save_path=str(tmp_path / "csft"), ckpt_path=str(tmp_path / "csft-ck")),
        nproc=0,
    )
    assert (tmp_path / "csft" / "config.json").is_file()


@pytest.mark.slow
def test_ported_interactive_chat_script_runs():
    """interactive_chat_llama.sh: `--pretrain MODEL --bf16`, one turn, then exit."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf.chat",
            *tiny(script("v0.2.6/interactive_chat_llama.sh", "chat"), pretrain=TINY),
            "--max_new_tokens",
            "3",
        ],
        input="1+1=\n/exit\n",
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Assistant: " in proc.stdout


def test_rejection_sampling_refuses_the_batch_inference_loop_flags():
    from rlhf.config import RejectionSamplingConfig

    for flags in (["--iter", "1"], ["--post_processor", "rs"]):
        with pytest.raises(UserError, match="rlhf.rejection_sampling runs its rounds itself"):
            parse_config(RejectionSamplingConfig, ["--reward_func", "rlhf.rewards:exact_match", *flags])


@pytest.mark.slow
def test_ported_v050_rejection_sampling_round_runs(tmp_path):
    """v0.5.0's loop, one round: chat-templated prompt-collection rows (context_messages) through
    vLLM with --enable_prefix_caching --max_num_seqs, scored by --pretrain, then SFT with
    --input_template '' on the kept rows, whose input is the prompt as the model saw it."""
    from realdata import prompt_collection_rows, write_jsonl

    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_collection_rows(8))
    gen_out, rm_out = tmp_path / "generate.jsonl", tmp_path / "rm.jsonl"
    generate = script("v0.5.0/train_rejection_sampling_llama.sh", "generate")
    run_trainer(
        "rlhf.generate",
        tiny(
            generate,
            pretrain=TINY,
            max_new_tokens="4",
            prompt_max_len="64",
            dataset=str(prompts),
            tp_size="1",
            max_num_seqs="4",
            rollout_batch_size="4",
            output_path=str(gen_out),
        ),
        nproc=0,
    )
    rows = read_jsonl(gen_out)
    tokenizer = load_tokenizer(ModelConfig(pretrain=TINY))
    rendered = tokenizer.apply_chat_template(rows[0]["context_messages"], tokenize=False, add_generation_prompt=True)
    assert len(rows) == 16 and rows[0]["input"] == rows[0]["prompt"] == rendered
    score = script("v0.5.0/train_rejection_sampling_llama.sh", "rm")
    run_trainer("rlhf.generate", tiny(score, pretrain=TINY, max_len="96", dataset=str(gen_out), output_path=str(rm_out)), nproc=0)
    kept = read_jsonl(rm_out)
    assert sorted(r["input"] for r in kept) == sorted({r["input"] for r in rows})  # one per prompt
    sft = script("v0.5.0/train_rejection_sampling_llama.sh", "sft")
    run_trainer(
        "rlhf.sft",
        tiny(
            sft, **TRAIN_TINY | {"max_len": "96"}, dataset=str(rm_out), save_path=str(tmp_path / "model"), ckpt_path=str(tmp_path / "ckpt")
        ),
        nproc=0,
    )
    assert (tmp_path / "model" / "config.json").is_file()
