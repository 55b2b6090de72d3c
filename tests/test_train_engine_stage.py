"""A one-process fp32 job builds its ZeRO-1/2 training engines as stage 0 (nothing to partition),
and that engine makes the same AdamW updates as a real ZeRO-2 engine."""

import json
import subprocess
import sys

import pytest

from rlhf.engines.train_engine import effective_zero_stage
from tests.helpers import REPO, trainer_env


@pytest.mark.parametrize(
    "stage, world, bf16, offload, built",
    [
        (2, 1, False, False, 0),
        (1, 1, False, False, 0),
        (0, 1, False, False, 0),
        (3, 1, False, False, 3),  # generation and weight sync use ZeRO-3's gathering API
        (2, 2, False, False, 2),  # several processes: partitioning (and DeepSpeed's groups) matter
        (2, 1, True, False, 2),  # bf16 keeps its fp32 master weights in the ZeRO optimizer
        (2, 1, False, True, 2),  # offloading needs ZeRO
    ],
)
def test_effective_zero_stage(stage, world, bf16, offload, built):
    assert effective_zero_stage(stage, world_size=world, bf16=bf16, adam_offload=offload) == built


SCRIPT = """
import json, os, sys, torch
from transformers import AutoModelForCausalLM
from rlhf.config import TrainConfig
from rlhf.distributed.env import init_distributed
from rlhf.engines.train_engine import TrainEngine
init_distributed()
ids = torch.randint(3, 60, (4, 24), generator=torch.Generator().manual_seed(0))
result = {}
for name, override in (("ours", None), ("zero2", '{"zero_optimization": {"stage": 2}}')):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained("rlhf/assets/tiny-qwen2", dtype=torch.float32)
    cfg = TrainConfig(zero_stage=2, micro_train_batch_size=2, train_batch_size=4, learning_rate=1e-3, ds_config=override)
    engine = TrainEngine(model, cfg, bf16=False, total_steps=3, dp_size=1)
    engine.train()
    norms = []
    for _ in range(3):
        for half in (ids[:2], ids[2:]):
            logits = engine(input_ids=half, use_cache=False).logits
            engine.backward(logits.float().logsumexp(-1).mean() * engine.grad_scale)
            engine.step()
        norms.append(engine.grad_norm)
    result[name] = {"stage": engine.zero_stage, "norms": norms, "weights": [p.detach().double().sum().item() for p in engine.module.parameters()]}
json.dump(result, open(sys.argv[1], "w"))
"""


def test_one_process_engine_is_stage_0_with_zero2s_updates(tmp_path):
    out = tmp_path / "result.json"
    env = trainer_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"})
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["ours"]["stage"] == 0 and result["zero2"]["stage"] == 2
    assert result["ours"]["norms"] == pytest.approx(result["zero2"]["norms"], rel=1e-5)
    assert result["ours"]["weights"] == pytest.approx(result["zero2"]["weights"], rel=1e-5, abs=1e-6)
    assert result["ours"]["norms"][0] > 0
