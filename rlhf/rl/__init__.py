"""The parts of rlhf.ppo's step: forward passes, role placement and engines, the experience
phase (generate, score, advantages), the policy and value updates, and the step's report."""
