#!/usr/bin/env bash
# Rerun every benchmark and refresh perf/results/ (Markdown tables + PNG charts); ~2 h on 2 CPU cores.
# Run it on a quiet machine: the figures are medians of alternating rounds, but other load still
# widens them.   bash perf/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash perf/setup.sh
python perf/side_by_side.py --bench sft dpo grpo
python perf/side_by_side.py --bench grpo --hidden 128 --layers 4 --steps 10 --tag tiny
python perf/vllm_colocated.py
python perf/mfu.py
python perf/rollout_speed.py
OMP_NUM_THREADS=1 python perf/memory.py
python perf/token_budget.py
python -m rlhf.plan --model 70B --gpu A100-80G --num_gpus_per_node 8 --num_nodes 2 --trainer ppo --zero_stage 3 --adam_offload --gradient_checkpointing --vllm_num_engines 4 --vllm_tensor_parallel_size 4 --micro_train_batch_size 1 --micro_rollout_batch_size 2 | tee perf/results/plan_70b_16xA100.txt
