"""MiniMind's six mock agent tools, as a tools file for `eval-tools` and the agent stage.

    python -m minimind_scale eval-tools --model out/agent/final --data_path tasks.jsonl --tools examples/agent_tools.py

The format of a tools file: a plain Python file whose public top-level functions are the tools. When the
model writes `<tool_call>{"name": "get_exchange_rate", "arguments": {"from_currency": "USD", ...}}</tool_call>`,
the function `get_exchange_rate` is called with those arguments as keywords, in a separate worker
process. What it returns is what the model reads back: a string as it is, anything else as JSON
(a dict, a list, a number). Rules:
  - names starting with `_` are helpers, not tools; functions imported from other modules are not tools;
  - a call with a wrong argument, an exception, a result that is not JSON, or a call running past the
    timeout (1 s by default) reaches the model as `{"error": "..."}`: the run goes on;
  - the schemas the model sees (names, descriptions, parameters) come from the data, the `tools` of each
    sample's system turn, not from this file; a sample may call only the tools its schemas declare.

The data tables are MiniMind's (trainer/train_agent.py), so a model trained there sees the same answers.
"""
from __future__ import annotations

import ast
import math
import operator

# ------------------------------------------------------------------------------------------ mock data

WEATHER = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
           "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
           "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
           "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}
DEFAULT_WEATHER = ("22°C", "晴")
CLOCK = {"Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
         "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
         "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00"}
RATES = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
         ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}
TRANSLATIONS = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
                ("今天天气真好", "english"): "The weather is nice today",
                ("I love programming", "chinese"): "我喜欢编程",
                ("机器学习很有趣", "english"): "Machine learning is interesting",
                ("Happy birthday", "chinese"): "生日快乐"}
# MiniMind's factors: each conversion is one multiplication (its temperature "conversion" included).
UNIT_FACTORS = {"km_miles": 0.621371, "miles_km": 1.60934, "kg_pounds": 2.20462, "pounds_kg": 0.453592,
                "meters_feet": 3.28084, "feet_meters": 0.3048, "celsius_fahrenheit": 1.8, "fahrenheit_celsius": 0.5556}


# ------------------------------------------------------------------------------------------ arithmetic

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {name: getattr(math, name) for name in dir(math) if callable(getattr(math, name))} | {
    "abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
# Typed-in symbols MiniMind rewrites before evaluating: caret power, ×, ÷, the minus sign, full-width brackets.
_SYMBOLS = {"^": "**", "×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"}
_MAX_EXPONENT = 10_000  # 2 ** 10_000 is fine; 9 ** 9 ** 9 would take the worker's whole timeout


def _name(node) -> str | None:
    """`sqrt` or `math.sqrt` -> "sqrt"; anything else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        return node.attr
    return None


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call) and _name(node.func) in _FUNCTIONS and not node.keywords:
        return _FUNCTIONS[_name(node.func)](*(_evaluate(a) for a in node.args))
    if isinstance(node, (ast.Name, ast.Attribute)) and _name(node) in _CONSTANTS:
        return _CONSTANTS[_name(node)]
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")


def calculate_math(expression: str) -> dict:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** (or ^), brackets, math functions and
    constants (`sqrt(2)`, `math.log(8, 2)`, `pi`). Nothing else is evaluated: no names, no attributes."""
    text = str(expression)
    for symbol, python in _SYMBOLS.items():
        text = text.replace(symbol, python)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e
    return {"result": str(_evaluate(tree))}


# ------------------------------------------------------------------------------------------ the others

def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert `value` between km/miles, kg/pounds, meters/feet, celsius/fahrenheit (an unknown pair: ×1)."""
    factor = UNIT_FACTORS.get(f"{str(from_unit).lower()}_{str(to_unit).lower()}", 1)
    return {"result": round(float(value) * factor, 4)}


def get_current_weather(location: str) -> dict:
    """The (mock) weather of a city."""
    temperature, condition = WEATHER.get(location, DEFAULT_WEATHER)
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


def get_current_time(timezone: str = "Asia/Shanghai") -> dict:
    """The (mock, fixed) local time of a tz-database time zone."""
    return {"datetime": CLOCK.get(timezone, CLOCK["Asia/Shanghai"]), "timezone": timezone}


def get_exchange_rate(from_currency: str, to_currency: str) -> dict:
    """The (mock) exchange rate between two currency codes (an unknown pair: 1.0)."""
    return {"from": from_currency, "to": to_currency, "rate": RATES.get((from_currency, to_currency), 1.0)}


def translate_text(text: str, target_language: str) -> dict:
    """A (mock) translation: known phrases are translated, anything else comes back unchanged."""
    return {"translated_text": TRANSLATIONS.get((text, target_language), text)}
