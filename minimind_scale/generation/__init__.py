"""Generation: the one seam every generated token of the product goes through.

Online rollouts (`rl.sampling.sample`, which grpo and ppo call), agent trajectories (`agent.trajectory`,
the agent stage and `eval-tools`), `chat` and `serve` all ask a `GenerationBackend` for completions:
token-id prompts and `SamplingParams` in (plus optional per-prompt seeds, a token stream and a stop flag),
`Completions` out (ids, masks, optionally per-token log-probs). A trainer hands the backend its current
weights with `update_weights(model)`.

- `interface.py`: `SamplingParams`, `Completions`, `TokenStream` and the abstract `GenerationBackend`;
- `padding.py`: left padding of token-id prompts, written once (prompt batches, trajectories, backends);
- `hf.py`: `HFBackend`, transformers' `generate` on the live module (the default, "hf");
- `registry.py`: backends by name (`register_backend`, `create_backend`, `load_backend`) and the
  `generation_backend` option type the commands share.

A faster backend (vLLM, SGLang) is one new module with a `GenerationBackend` subclass plus one
`register_backend("vllm", VLLMBackend)` call (in registry.py, or in a `--plugin` file); every stage and
command that takes `--generation_backend` can then use it.
"""
