"""The benchmarks' GRPO reward, loaded by both sides: the share of digits in the response.

Cheap to compute (so scoring time is the framework's, not the reward's) and it varies between
the samples of a group, so the advantages are not all zero.
"""


def digit_share(prompts, responses, labels=None):
    return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]
