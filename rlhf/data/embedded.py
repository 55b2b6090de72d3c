"""Build the embedded task datasets: two-number addition in every format the trainers read.

The task is "a+b=" -> str(a + b) with a and b in [0, 50): small enough that the embedded tiny
model learns it in minutes on a CPU, and every answer is checkable, so RL can use an exact
reward and evaluation an exact accuracy. The 2500 pairs are split once into train pairs and 300
held-out eval pairs; every file is built from one side of that split only, so no eval question
is ever trained on, in any format.

The result ships in ``rlhf/assets/arith`` (read with ``embedded:arith/NAME.jsonl``). The build is
deterministic, so rebuilding gives byte-identical files:

    python -m rlhf.data.embedded --out rlhf/assets/arith
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable

SEED = 1234
OPERAND_LIMIT = 50  # operands are 0 .. OPERAND_LIMIT - 1
NUM_EVAL = 300
EQUATIONS_PER_TEXT = 8  # pretrain.jsonl rows
TWO_TURN_EVERY = 3  # every third chat_train row has two turns
MAX_COND_ERROR = 3  # conditional_train.jsonl outputs are off by at most this much
MAX_WRONG_OFFSET = 5  # rejected / undesirable answers are off by 1 .. this much
TEACHER_SLIP_RATE = 0.6  # sft_teacher_train.jsonl: share of answers the imperfect teacher gives one too high

Pair = tuple[int, int]
Row = dict[str, Any]

README = f"""\
# arith

The embedded task datasets of `rlhf`: two-number addition. Each question is the prompt `a+b=`
with integers `a` and `b` in [0, {OPERAND_LIMIT}); the answer is `str(a + b)` (no spaces, no newline).
Because answers are exact, RL trainers can use a verifiable reward and evaluation an exact-match
accuracy. Files are JSON Lines (one object per line).

## Split

All {OPERAND_LIMIT * OPERAND_LIMIT} ordered pairs are shuffled with `random.Random({SEED})`; the first {NUM_EVAL} are the
held-out eval pairs, the rest the train pairs. Every `*_train.jsonl` and `pretrain.jsonl` uses
train pairs only and every `*_eval.jsonl` eval pairs only, so no eval question appears in any
training file. Wrong answers are never negative.

## Files

| file | fields | content |
|---|---|---|
| `sft_train.jsonl`, `sft_eval.jsonl` | `input`, `output` | `{{"input": "12+7=", "output": "19"}}` |
| `sft_teacher_train.jsonl` | `input`, `output` | an imperfect teacher's demonstrations: {int(TEACHER_SLIP_RATE * 100)}% of the answers are one too high (`"12+7="` -> `"20"`), the rest right. The README's main job fine-tunes on it, then RL with an exact-match reward corrects what imitation copied |
| `chat_train.jsonl`, `chat_eval.jsonl` | `messages` | user/assistant turns; every third train row has two question/answer turns (multi-turn masking) |
| `pretrain.jsonl` | `text` | {EQUATIONS_PER_TEXT} equations per row, each `a+b=c` and a newline |
| `conditional_train.jsonl` | `input`, `output`, `score` | conditional SFT: half the outputs are correct, the rest off by 1-{MAX_COND_ERROR}; `score = max(0, 9 - 3 * abs(error))` (9, 6, 3 or 0) |
| `prefs_train.jsonl`, `prefs_eval.jsonl` | `prompt`, `chosen`, `rejected` | chosen is correct, rejected is off by 1-{MAX_WRONG_OFFSET} |
| `kto_train.jsonl`, `kto_eval.jsonl` | `prompt`, `completion`, `label` | half `true` (correct completion), half `false` (off by 1-{MAX_WRONG_OFFSET}) |
| `prompts_train.jsonl`, `prompts_eval.jsonl` | `input`, `label` | RL prompts with the correct answer as `label` |

## Rebuilding

    python -m rlhf.data.embedded --out rlhf/assets/arith

The build is deterministic; `tests/test_embedded.py` checks that it reproduces these files byte
for byte.
"""


# ----------------------------------------------------------------------------------------------
# Questions and answers


def prompt_of(pair: Pair) -> str:
    a, b = pair
    return f"{a}+{b}="


def answer_of(pair: Pair) -> int:
    return pair[0] + pair[1]


def file_rng(name: str) -> random.Random:
    """A generator of its own for each file, seeded from SEED and the file name.

    Why not one shared generator: then each file would depend on how many draws the files built
    before it made, and changing one file would silently reshuffle all the others. String seeds
    are hashed with SHA-512 by ``random``, so they do not depend on PYTHONHASHSEED.
    """
    return random.Random(f"{SEED}/{name}")


def split_pairs() -> tuple[list[Pair], list[Pair]]:
    """(train pairs, eval pairs): all pairs shuffled once, the first NUM_EVAL held out."""
    pairs = [(a, b) for a in range(OPERAND_LIMIT) for b in range(OPERAND_LIMIT)]
    random.Random(SEED).shuffle(pairs)
    return pairs[NUM_EVAL:], pairs[:NUM_EVAL]


def shuffled(pairs: list[Pair], rng: random.Random) -> list[Pair]:
    out = list(pairs)
    rng.shuffle(out)
    return out


def offset_answer(correct: int, max_offset: int, rng: random.Random) -> int:
    """A wrong answer 1..max_offset away from ``correct``; flipped upwards rather than go negative."""
    offset = rng.randint(1, max_offset)
    if rng.random() < 0.5 and correct - offset >= 0:
        return correct - offset
    return correct + offset


# ----------------------------------------------------------------------------------------------
# One builder per format: pairs and a generator in, rows out


def sft_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    return [{"input": prompt_of(p), "output": str(answer_of(p))} for p in shuffled(pairs, rng)]


def teacher_sft_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    """Demonstrations from an imperfect teacher: TEACHER_SLIP_RATE of its answers are one too
    high (a+b+1), the rest right. SFT imitates the slip along with the skill, so greedy decoding
    mostly repeats it, while sampling still finds the right sum often: the headroom that RL with a
    verifier (exact match against the true sum) is there to take."""
    rows = []
    for pair in shuffled(pairs, rng):
        answer = answer_of(pair) + (1 if rng.random() < TEACHER_SLIP_RATE else 0)
        rows.append({"input": prompt_of(pair), "output": str(answer)})
    return rows


def chat_turn(pair: Pair) -> list[Row]:
    return [{"role": "user", "content": prompt_of(pair)}, {"role": "assistant", "content": str(answer_of(pair))}]


def chat_rows(pairs: list[Pair], rng: random.Random, two_turn_every: int = 0) -> list[Row]:
    """Single-turn chats; with ``two_turn_every=n`` every n-th row takes two pairs as two turns."""
    queue = shuffled(pairs, rng)
    rows: list[Row] = []
    i = 0
    while i < len(queue):
        two_turns = two_turn_every > 0 and len(rows) % two_turn_every == two_turn_every - 1 and i + 1 < len(queue)
        take = queue[i : i + (2 if two_turns else 1)]
        rows.append({"messages": [message for pair in take for message in chat_turn(pair)]})
        i += len(take)
    return rows


def pretrain_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    """Plain text for --pretrain_mode: EQUATIONS_PER_TEXT equations per row, one per line."""
    queue = shuffled(pairs, rng)
    chunks = [queue[i : i + EQUATIONS_PER_TEXT] for i in range(0, len(queue), EQUATIONS_PER_TEXT)]
    return [{"text": "".join(f"{prompt_of(p)}{answer_of(p)}\n" for p in chunk)} for chunk in chunks]


def conditional_score(error: int) -> float:
    """SteerLM-style quality score: 9 for a correct answer, 3 points off per unit of error."""
    return float(max(0, 9 - 3 * abs(error)))


def conditional_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    rows = []
    for pair in shuffled(pairs, rng):
        correct = answer_of(pair)
        output = correct if rng.random() < 0.5 else offset_answer(correct, MAX_COND_ERROR, rng)
        rows.append({"input": prompt_of(pair), "output": str(output), "score": conditional_score(output - correct)})
    return rows


def preference_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    rows = []
    for pair in shuffled(pairs, rng):
        correct = answer_of(pair)
        rejected = offset_answer(correct, MAX_WRONG_OFFSET, rng)
        rows.append({"prompt": prompt_of(pair), "chosen": str(correct), "rejected": str(rejected)})
    return rows


def kto_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    """Unpaired feedback: exactly half the rows (rounded up) desirable, in random order."""
    order = shuffled(pairs, rng)
    labels = [i < (len(order) + 1) // 2 for i in range(len(order))]
    rng.shuffle(labels)
    rows = []
    for pair, desirable in zip(order, labels):
        correct = answer_of(pair)
        completion = correct if desirable else offset_answer(correct, MAX_WRONG_OFFSET, rng)
        rows.append({"prompt": prompt_of(pair), "completion": str(completion), "label": desirable})
    return rows


def prompt_rows(pairs: list[Pair], rng: random.Random) -> list[Row]:
    return [{"input": prompt_of(p), "label": str(answer_of(p))} for p in shuffled(pairs, rng)]


# ----------------------------------------------------------------------------------------------
# Files

Builder = Callable[[list[Pair], random.Random], list[Row]]

# file name -> (which split, builder)
FILES: dict[str, tuple[str, Builder]] = {
    "sft_train.jsonl": ("train", sft_rows),
    "sft_eval.jsonl": ("eval", sft_rows),
    "sft_teacher_train.jsonl": ("train", teacher_sft_rows),
    "chat_train.jsonl": ("train", lambda pairs, rng: chat_rows(pairs, rng, two_turn_every=TWO_TURN_EVERY)),
    "chat_eval.jsonl": ("eval", chat_rows),
    "pretrain.jsonl": ("train", pretrain_rows),
    "conditional_train.jsonl": ("train", conditional_rows),
    "prefs_train.jsonl": ("train", preference_rows),
    "prefs_eval.jsonl": ("eval", preference_rows),
    "kto_train.jsonl": ("train", kto_rows),
    "kto_eval.jsonl": ("eval", kto_rows),
    "prompts_train.jsonl": ("train", prompt_rows),
    "prompts_eval.jsonl": ("eval", prompt_rows),
}


def build_rows() -> dict[str, list[Row]]:
    """Every file's rows, by file name."""
    train, held_out = split_pairs()
    splits = {"train": train, "eval": held_out}
    return {name: builder(splits[split], file_rng(name)) for name, (split, builder) in FILES.items()}


def write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    # Fixed key order (insertion), ASCII and "\n" endings: the bytes depend on the rows only.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def build_datasets(out_dir: str) -> None:
    """Write every dataset file and the README into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_rows().items():
        write_jsonl(out / name, rows)
        print(f"{name}: {len(rows)} rows")
    (out / "README.md").write_text(README, encoding="utf-8", newline="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="rlhf/assets/arith", help="output folder (created if missing)")
    build_datasets(parser.parse_args().out)


if __name__ == "__main__":
    main()
