"""Online RL: prompts, the shared group rollout, rewards and their scoring, the frozen reference, actor-critic."""
