"""A tiny, self-consistent "world" of facts for the demo: pretraining text and SFT conversations.

The facts are few and always phrased with the same answer shape, so a model of 1-3M parameters
trained for a couple of minutes on a laptop CPU visibly learns them; the demo then asks
`DEMO_PROMPTS` and looks for `DEMO_ANSWERS` in the replies.

The committed copies in `minimind_scale/assets/demo/` are written by, from the repository root:

    python -m minimind_scale.data.demo_data

(the shipped tokenizer is then trained on them; the command is in `tokenizer_train.py`).
Output is a pure function of the seed, so the tests can check that the committed files are current.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

IDENTITY = "I am MiniMind, a small language model trained by minimind_scale."
IDENTITY_ZH = "我是MiniMind，一个由minimind_scale训练的小型语言模型。"

# (country, capital, country in Chinese or None, capital in Chinese or None)
CAPITALS: list[tuple[str, str, str | None, str | None]] = [
    ("France", "Paris", "法国", "巴黎"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("China", "Beijing", "中国", "北京"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Brazil", "Brasilia", None, None),
    ("India", "New Delhi", None, None),
    ("Kenya", "Nairobi", None, None),
    ("Peru", "Lima", None, None),
    ("Norway", "Oslo", None, None),
    ("Mexico", "Mexico City", None, None),
    ("Australia", "Canberra", None, None),
    ("Thailand", "Bangkok", None, None),
    ("Portugal", "Lisbon", None, None),
    ("Ireland", "Dublin", None, None),
]

COLOURS: list[tuple[str, str]] = [
    ("the sky", "blue"),
    ("grass", "green"),
    ("a banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a strawberry", "red"),
    ("a carrot", "orange"),
    ("a lemon", "yellow"),
    ("a leaf", "green"),
    ("milk", "white"),
    ("a crow", "black"),
    ("a tomato", "red"),
    ("a pumpkin", "orange"),
    ("the sea", "blue"),
    ("a plum", "purple"),
]

SOUNDS: list[tuple[str, str]] = [
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("owl", "hoot"),
    ("frog", "ribbit"),
    ("lion", "roar"),
    ("bee", "buzz"),
    ("mouse", "squeak"),
]

OPPOSITE_PAIRS: list[tuple[str, str]] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("wet", "dry"),
    ("tall", "short"),
    ("strong", "weak"),
]
OPPOSITES: list[tuple[str, str]] = OPPOSITE_PAIRS + [(b, a) for a, b in OPPOSITE_PAIRS]

DEMO_PROMPTS: list[str] = [
    "What is the capital of France?",
    "What colour is the sky?",
    "What is 3 plus 4?",
    "Who are you?",
]
DEMO_ANSWERS: list[str] = ["Paris", "blue", "7", "MiniMind"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are MiniMind, a small and friendly assistant.",
    "Answer briefly.",
    "你是一个乐于助人的助手。",
]

PRETRAIN_LINES = 3000
SFT_CONVERSATIONS = 2000


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- pretraining sentences: every fact in several phrasings ------------------------------------

def _capital_sentence(rng: random.Random) -> str:
    country, city, country_zh, city_zh = rng.choice(CAPITALS)
    if country_zh and rng.random() < 0.2:
        return rng.choice(["{c}的首都是{m}。", "{m}是{c}的首都。"]).format(c=country_zh, m=city_zh)
    return rng.choice([
        "The capital of {c} is {m}.",
        "{m} is the capital of {c}.",
        "{c}'s capital city is {m}.",
        "In {c}, the capital is {m}.",
        "The government of {c} sits in {m}, its capital.",
    ]).format(c=country, m=city)


def _colour_sentence(rng: random.Random) -> str:
    thing, colour = rng.choice(COLOURS)
    return rng.choice([
        "{T} is {k}.",
        "The colour of {t} is {k}.",
        "If you look at {t}, you see that it is {k}.",
        "{T} has a {k} colour.",
    ]).format(t=thing, T=_cap(thing), k=colour)


def _sound_sentence(rng: random.Random) -> str:
    animal, sound = rng.choice(SOUNDS)
    return rng.choice([
        "A {a} says {s}.",
        "The {a} makes the sound {s}.",
        "When a {a} talks, it goes {s}.",
        "You can hear a {a} say {s}.",
    ]).format(a=animal, s=sound)


def _opposite_sentence(rng: random.Random) -> str:
    word, other = rng.choice(OPPOSITES)
    return rng.choice([
        "The opposite of {w} is {o}.",
        "{W} and {o} are opposites.",
        "{W} is the opposite of {o}.",
    ]).format(w=word, W=_cap(word), o=other)


def _sum_sentence(rng: random.Random) -> str:
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.15:
        return f"{a}加{b}等于{a + b}。"
    return rng.choice([
        "{a} plus {b} is {s}.",
        "{a} + {b} = {s}.",
        "If you add {a} and {b}, you get {s}.",
        "The sum of {a} and {b} is {s}.",
    ]).format(a=a, b=b, s=a + b)


def _identity_sentence(rng: random.Random) -> str:
    return rng.choice([
        IDENTITY,
        "MiniMind is a small language model trained by minimind_scale.",
        "The assistant called MiniMind was trained by minimind_scale.",
        IDENTITY_ZH,
    ])


_SENTENCE_MAKERS = [
    (_capital_sentence, 4),
    (_colour_sentence, 3),
    (_sound_sentence, 2),
    (_opposite_sentence, 2),
    (_sum_sentence, 4),
    (_identity_sentence, 1),
]


def _pretrain_text(rng: random.Random) -> str:
    makers = [m for m, _ in _SENTENCE_MAKERS]
    weights = [w for _, w in _SENTENCE_MAKERS]
    count = rng.randint(2, 5)
    parts = [rng.choices(makers, weights)[0](rng) for _ in range(count)]
    # Chinese sentences end with their own full stop, so no space is needed after them.
    text = parts[0]
    for part in parts[1:]:
        text += part if text.endswith("。") else " " + part
    return text


# --- SFT question / answer pairs: varied questions, one answer shape per kind of fact -----------

def _capital_qa(rng: random.Random) -> tuple[str, str]:
    country, city, country_zh, city_zh = rng.choice(CAPITALS)
    roll = rng.random()
    if country_zh and roll < 0.15:
        question = rng.choice(["{c}的首都是哪里？", "{c}的首都是什么？"]).format(c=country_zh)
        return question, f"{country_zh}的首都是{city_zh}。"
    if roll < 0.3:
        question = rng.choice(["{m} is the capital of which country?", "Which country has {m} as its capital?"])
        return question.format(m=city), f"{city} is the capital of {country}."
    question = rng.choice([
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "What's the capital city of {c}?",
        "Name the capital of {c}.",
    ]).format(c=country)
    return question, f"The capital of {country} is {city}."


def _colour_qa(rng: random.Random) -> tuple[str, str]:
    thing, colour = rng.choice(COLOURS)
    question = rng.choice([
        "What colour is {t}?",
        "What color is {t}?",
        "Which colour is {t}?",
        "Tell me the colour of {t}.",
    ]).format(t=thing)
    return question, f"{_cap(thing)} is {colour}."


def _sound_qa(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(SOUNDS)
    question = rng.choice([
        "What sound does a {a} make?",
        "What does a {a} say?",
        "How does a {a} sound?",
    ]).format(a=animal)
    return question, f"A {animal} says {sound}."


def _opposite_qa(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(OPPOSITES)
    question = rng.choice([
        "What is the opposite of {w}?",
        "Give me the opposite of {w}.",
        "What's the opposite of {w}?",
    ]).format(w=word)
    return question, f"The opposite of {word} is {other}."


def _sum_qa(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.15:
        return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"
    question = rng.choice([
        "What is {a} plus {b}?",
        "What is {a} + {b}?",
        "How much is {a} plus {b}?",
        "Add {a} and {b}.",
    ]).format(a=a, b=b)
    return question, f"{a} plus {b} is {a + b}."


def _identity_qa(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.2:
        return rng.choice(["你是谁？", "你叫什么名字？", "介绍一下你自己。"]), IDENTITY_ZH
    question = rng.choice([
        "Who are you?",
        "What is your name?",
        "What are you?",
        "Introduce yourself.",
        "Who trained you?",
        "Hello! Who am I talking to?",
    ])
    return question, IDENTITY


_QA_MAKERS = [
    (_capital_qa, 4),
    (_colour_qa, 3),
    (_sound_qa, 2),
    (_opposite_qa, 2),
    (_sum_qa, 4),
    (_identity_qa, 1),
]


def _qa(rng: random.Random) -> tuple[str, str]:
    makers = [m for m, _ in _QA_MAKERS]
    weights = [w for _, w in _QA_MAKERS]
    return rng.choices(makers, weights)[0](rng)


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    if rng.random() < 0.25:
        turns.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.2 else 1):
        question, answer = _qa(rng)
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _demo_conversations() -> list[list[dict[str, str]]]:
    # The demo's own questions are guaranteed to be in the data, with their expected answers.
    answers = [
        "The capital of France is Paris.",
        "The sky is blue.",
        "3 plus 4 is 7.",
        IDENTITY,
    ]
    return [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(DEMO_PROMPTS, answers)
    ] * 3


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def generate(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `pretrain.jsonl` and `sft.jsonl` into `out_dir`; the same seed gives the same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain = [{"text": _pretrain_text(rng)} for _ in range(PRETRAIN_LINES)]
    conversations = [_conversation(rng) for _ in range(SFT_CONVERSATIONS - 12)] + _demo_conversations()
    rng.shuffle(conversations)
    paths = {"pretrain": out / "pretrain.jsonl", "sft": out / "sft.jsonl"}
    _write_jsonl(paths["pretrain"], pretrain)
    _write_jsonl(paths["sft"], [{"conversations": c} for c in conversations])
    return paths


if __name__ == "__main__":
    written = generate(Path(__file__).resolve().parents[1] / "assets" / "demo")
    for name, path in written.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
