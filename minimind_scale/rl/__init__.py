"""Online RL: prompts, sampling, rewards and their scoring, the stages' shared state, rollout path and options,
the GRPO family's rollout and loss, and the actor-critic module."""
