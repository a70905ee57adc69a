"""A second generation backend, written against the interface alone and registered by name, is what the product
generates with: online sampling, agent trajectories, `chat`, `eval-tools` and serve's worker all go through it.

The toy decodes greedily by one full forward per token (no KV cache, no `generate`), so on the memorised tool
model it must play exactly the trajectory the hf backend plays."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import cli_output_in_process
from minimind_scale.agent.records import read_agent_tasks
from minimind_scale.agent.tools import load_tools
from minimind_scale.agent.trajectory import run_trajectories
from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import TURN_END
from minimind_scale.generation import registry
from minimind_scale.generation.interface import Completions, GenerationBackend, SamplingParams
from minimind_scale.generation.padding import left_pad
from minimind_scale.generation.registry import register_backend
from minimind_scale.inference import chat
from minimind_scale.inference.loading import load_chat_model
from minimind_scale.inference.serve_worker import Done, Generation, GenerationWorker, Text
from minimind_scale.rl.sampling import position_ids_from_mask, sample

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = "forward-greedy"


class ForwardGreedy(GenerationBackend):
    """Greedy decoding by full forwards over the left-padded batch; counts the completions it makes."""

    made = 0

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id

    @classmethod
    def from_model(cls, model, *, pad_id):
        return cls(model, pad_id)

    @classmethod
    def from_pretrained(cls, model_dir, **options):
        model, tokenizer = load_chat_model(model_dir, **options)
        return cls(model, tokenizer.pad_token_id), tokenizer

    def update_weights(self, model):
        self.model = model

    @property
    def context_length(self):
        return self.model.config.max_position_embeddings

    @torch.no_grad()
    def generate(self, prompts, params, *, seeds=None, stream=None, should_stop=None):
        rows = [list(p) for p in prompts for _ in range(params.num_samples)]
        new: list[list[int]] = [[] for _ in rows]
        for _ in range(params.max_new_tokens):
            ids, mask = left_pad([r + n for r, n in zip(rows, new)], self.pad_id)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            for n, token in zip(new, logits[:, -1].argmax(-1).tolist()):
                if not (n and n[-1] in params.end_ids):
                    n.append(token)
            if stream is not None:
                stream.put(new[0][-1:])
            if all(n[-1] in params.end_ids for n in new) or (should_stop is not None and should_stop()):
                break
        if stream is not None:
            stream.end()
        width = max(len(n) for n in new)
        generated = torch.tensor([n + [self.pad_id] * (width - len(n)) for n in new])
        type(self).made += len(rows)
        return Completions.cut_at_end(generated, params.end_ids, self.pad_id)


@pytest.fixture
def toy(monkeypatch):
    """ForwardGreedy registered as "forward-greedy" for one test."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    register_backend(TOY, ForwardGreedy)
    ForwardGreedy.made = 0
    return ForwardGreedy


@pytest.fixture(scope="module")
def agent(tool_memorised_model):
    model_dir, tasks_file, tools_file = tool_memorised_model
    model, tokenizer = load_chat_model(str(model_dir), dtype="fp32", device="cpu")
    with load_tools(tools_file) as toolbox:
        yield model, tokenizer, read_agent_tasks(tasks_file)[0], toolbox, tool_memorised_model


def test_online_sampling_generates_with_the_named_backend(agent, toy):
    model, tokenizer, task, _, _ = agent
    end_id = tokenizer.convert_tokens_to_ids(TURN_END)
    ids, mask = left_pad([[1, 5, 9], [1, 7]], tokenizer.pad_token_id)
    samples = sample(model, ids, mask, num_samples=2, max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=50,
                     end_id=end_id, pad_id=tokenizer.pad_token_id, backend=TOY)
    assert toy.made == 4
    direct = toy(model, tokenizer.pad_token_id).generate([[1, 5, 9], [1, 7]], _params(4, end_id, num_samples=2))
    assert torch.equal(samples.completion_ids, direct.token_ids) and torch.equal(samples.completion_mask, direct.mask)
    assert torch.equal(samples.sequences[:, :3], ids.repeat_interleave(2, dim=0))


def test_an_agent_trajectory_played_by_another_backend_is_the_same_trajectory(agent, toy):
    model, tokenizer, task, toolbox, _ = agent
    kwargs = dict(max_turns=3, max_new_tokens=96, do_sample=False, end_id=tokenizer.convert_tokens_to_ids(TURN_END),
                  pad_id=tokenizer.pad_token_id)
    by_hf = run_trajectories(model, tokenizer, [task.messages], [task.tools], toolbox, **kwargs)
    by_toy = run_trajectories(model, tokenizer, [task.messages], [task.tools], toolbox, backend=TOY, **kwargs)
    assert toy.made == 2  # one completion per assistant turn
    assert by_toy.messages == by_hf.messages and by_toy.final_answer == ["37 * 43 = 1591."]
    assert torch.equal(by_toy.samples.sequences, by_hf.samples.sequences)
    assert torch.equal(by_toy.samples.completion_mask, by_hf.samples.completion_mask)


def test_chat_and_eval_tools_generate_with_the_backend_their_option_names(agent, toy, capsys):
    _, _, task, _, (model_dir, tasks_file, tools_file) = agent
    question = task.messages[-1]["content"]
    replies = {}
    for backend in ("hf", TOY):
        capsys.readouterr()
        chat.run(chat.ChatConfig(model=str(model_dir), prompt=question, temperature=0, max_new_tokens=24,
                                 generation_backend=backend, dtype="fp32"))
        replies[backend] = capsys.readouterr().out
    assert toy.made == 1 and replies[TOY] == replies["hf"] and replies[TOY].strip()

    code, out, err = cli_output_in_process(["eval-tools", "--model", str(model_dir), "--data_path", str(tasks_file),
                                            "--tools", str(tools_file), "--max_new_tokens", "96", "--dtype", "fp32",
                                            "--generation_backend", TOY], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"accuracy": 1.0, "tasks": 1, "tool_calls": 1,
                                                        "tool_failures": 0}
    assert toy.made == 3


def test_serve_s_worker_streams_and_stops_through_the_backend(agent, toy):
    model, tokenizer, task, _, _ = agent
    prompt = encode_prompt(task.messages, task.tools, tokenizer)
    texts = {}
    for name in ("hf", TOY):
        worker = GenerationWorker(registry.create_backend(name, model, pad_id=tokenizer.pad_token_id), tokenizer, 2)
        events = _events(worker, Generation(prompt, 40, 0.0, 1.0))
        worker.close()
        assert isinstance(events[-1], Done) and events[-1].completion_tokens > 1
        texts[name] = ("".join(e.text for e in events[:-1]), events[-1])
    assert texts[TOY] == texts["hf"] and toy.made == 1

    # A client that goes away after the first text: the backend's stop flag ends the generation there.
    worker = GenerationWorker(toy(model, tokenizer.pad_token_id), tokenizer, 2)
    cancelled = _events(worker, Generation(prompt, 40, 0.0, 1.0), cancel_after_first=True)
    worker.close()
    assert cancelled[-1].reason == "length" and cancelled[-1].completion_tokens < texts[TOY][1].completion_tokens
    assert texts[TOY][0].startswith("".join(e.text for e in cancelled[:-1]))


def _params(max_new_tokens: int, end_id: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, end_ids=(end_id,), temperature=0, **kwargs)


def _events(worker: GenerationWorker, generation: Generation, cancel_after_first: bool = False) -> list:
    """The events of one submitted generation, in order, the last one Done or Failed."""
    events, done, submitted, job = [], threading.Event(), threading.Event(), []

    def emit(event):
        events.append(event)
        if cancel_after_first and isinstance(event, Text):
            submitted.wait()
            job[0].cancel()
        if not isinstance(event, Text):
            done.set()

    job.append(worker.submit(generation, emit))
    submitted.set()
    assert done.wait(120), events
    return events
