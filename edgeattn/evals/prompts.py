"""The two retrieval tasks: what is hidden, where, and how an answer is scored.

* **niah**: :mod:`edgeattn.needle`'s sentence ("The secret passcode of the blue lighthouse is
  NNNNN.") at a depth of real prose, the prompt ending by asking for it, completion style (the
  default model is a 270M base model: it continues text, it does not follow instructions).
* **passkey**: the classic passkey retrieval (Mohtashami & Jaggi, 2023): a number hidden in the
  same few filler sentences repeated, asked for at the end.

The hidden number of a cell is drawn from a generator seeded by (seed, task, length, depth), so
every mode of a cell is asked the same number and a rerun asks the same numbers again.
Scoring is exact match: the first number in the greedy continuation must equal the fact.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from edgeattn import needle

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and remember it: you will be asked about it at the end."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {fact}. Remember it. {fact} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
TASKS = ("niah", "passkey")

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Task:
    name: str
    needle: str
    question: str


NIAH = Task("niah", needle.NEEDLE, needle.QUESTION)
PASSKEY = Task("passkey", PASSKEY_NEEDLE, PASSKEY_QUESTION)


def task(name: str) -> Task:
    return {"niah": NIAH, "passkey": PASSKEY}[name]


def fact_for(seed: int, task_name: str, length: int, depth: float) -> str:
    """The 5-digit number hidden in cell (length, depth); the same for every mode and every rerun."""
    return str(random.Random(f"{seed}:{task_name}:{length}:{depth}").randint(10000, 99999))


def passkey_body(tokenizer: Any, need: int) -> list[int]:
    """The passkey filler as token ids: the intro, then the filler sentences repeated to ``need`` tokens."""
    intro = tokenizer(PASSKEY_INTRO, add_special_tokens=False).input_ids
    filler = tokenizer(PASSKEY_FILLER, add_special_tokens=False).input_ids
    reps = max(1, -(-(need - len(intro)) // len(filler)))
    return (intro + filler * reps)[: max(need, len(intro))]


def build(t: Task, tokenizer: Any, body: list[int], length: int, depth: float, fact: str) -> needle.Prompt:
    """The prompt of one cell: exactly ``length`` tokens, the fact's tokens at ``span``."""
    if t.name == "niah":
        return needle.build_prompt(tokenizer, body, length, depth, fact)
    # the passkey sentence holds the key twice; the span (for the selection diagnostic) is the first
    head, rest = t.needle.split("{fact}", 1)
    tail = rest.replace("{fact}", fact)
    return needle.build_prompt(tokenizer, body, length, depth, fact, needle=head + "{fact}" + tail,
                               question_text=t.question)  # fmt: skip


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def answer_complete(text: str) -> bool:
    """True once the continuation holds a whole number (digits followed by something else): decoding can stop."""
    m = _NUMBER.search(text)
    return m is not None and m.end() < len(text)


def score(answer: str, fact: str) -> bool:
    """Exact match: the first number of the greedy continuation is the fact."""
    return first_number(answer) == fact
