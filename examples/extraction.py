"""An offline, deterministic instruction task: extract a person's name, age and city from a sentence as JSON.

Every example is generated in code from small word lists and sentence templates (no download):

    system:    Extract the person's name, age and city from the user's text as JSON with keys "name", "age", "city".
    user:      Harbor pilot Nadia Okafor (41) swapped Lisbon for a quieter life in Tromsø.
    assistant: {"name": "Nadia Okafor", "age": 41, "city": "Tromsø"}

Distractors make it more than copying: a job, a second place the person left (``from``), a count
of something. The held-out split uses first names, last names and cities that never occur in
training, so the model must extract rather than memorise. Metrics (:func:`score`): exact match of
the parsed JSON object, field-level F1 over ``(key, value)`` pairs, and the share of outputs that
parse as a JSON object. Parsing is lenient (code fences and text around the first ``{...}`` are
ignored) so a zero-shot model is not punished for chatter alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

INSTRUCTION = 'Extract the person\'s name, age and city from the user\'s text as JSON with keys "name", "age", "city".'
KEYS = ("name", "age", "city")

FIRST = ("Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lucia",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamara", "Umar", "Vera", "Wen", "Ximena",
         "Yusuf", "Zofia", "Amara", "Bjorn", "Carmen", "Darius", "Esther", "Felix", "Gloria", "Hassan", "Ingrid",
         "Jamal", "Keiko", "Leon", "Maya", "Nikolai", "Olga", "Pablo", "Rania", "Stefan", "Tessa", "Viktor",
         "Wanda", "Yara", "Zane", "Aiko", "Boris", "Celia", "Emil", "Fatima", "Gustav", "Helga", "Idris", "Julia")
LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Castillo", "Novak", "Haddad", "Brennan", "Kowalski", "Ferreira",
        "Nakamura", "Osei", "Petrov", "Quinn", "Rossi", "Schmidt", "Torres", "Ueda", "Varga", "Walsh", "Yilmaz",
        "Zhang", "Abbott", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova",
        "Jensen", "Keller", "Lopez", "Meyer", "Nilsen", "Olsen", "Park", "Reyes", "Silva")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Krakow", "Beirut", "Dublin", "Porto", "Tromsø", "Seville",
          "Ghent", "Tartu", "Cusco", "Hanoi", "Quebec", "Accra", "Bergen", "Graz", "Izmir", "Leeds", "Malmo",
          "Nantes", "Pune", "Riga", "Split", "Turin", "Utrecht", "Valencia", "Wroclaw", "Zagreb", "Aarhus",
          "Bologna", "Cork", "Dakar", "Essen", "Fukuoka", "Geneva", "Halifax", "Jaipur", "Kyoto", "Lyon",
          "Medellin", "Nagoya", "Odessa", "Perth", "Recife", "Salta")
JOBS = ("nurse", "carpenter", "harbor pilot", "data analyst", "baker", "violinist", "bus driver", "chemist",
        "gardener", "lawyer", "welder", "librarian", "pharmacist", "translator", "architect", "beekeeper")
THINGS = ("cats", "bikes", "sisters", "kids", "guitars", "dogs")
TEMPLATES = (
    "{name}, {age}, is a {job} based in {city}.",
    "Meet {name} from {city}: {age} years old and working as a {job}.",
    "{city} resident {name} ({age}) works as a {job} and owns {n} {thing}.",
    "At {age}, {name} left {other} for {city} to become a {job}.",
    "Name: {name} | Age: {age} | Location: {city} | Job: {job}",
    "{job_cap} {name} ({age}) swapped {other} for a quieter life in {city}.",
    "Our new {job}, {name}, just turned {age} and moved from {other} to {city}.",
    "{name} has {n} {thing}, is {age} years old and lives in {city}.",
    "Born in {other}, {name} now lives in {city}; the {job} is {age}.",
    "Profile - {name}, age {age}, {job}, currently in {city} (formerly {other}).",
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: the user message (the text; the instruction is the system message), the answer, its fields."""

    text: str
    fields: tuple[tuple[str, Any], ...]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation up to the assistant's turn: the instruction as system message, the text as user's."""
        return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": self.text}]

    @property
    def answer(self) -> str:
        """The reference assistant reply: compact JSON in key order ``name, age, city``."""
        return json.dumps(dict(self.fields), ensure_ascii=False)


def _held_out(words: Sequence[str], every: int) -> tuple[list[str], list[str]]:
    """Every ``every``-th word (in list order) is held out."""
    return ([w for i, w in enumerate(words) if i % every != every - 1],
            [w for i, w in enumerate(words) if i % every == every - 1])


def make_examples(n: int, split: str, seed: int = 0) -> list[Example]:
    """``n`` examples of ``split`` ('train' or 'test'), deterministic in ``(split, seed)``.

    The splits share templates and jobs but not first names, last names or cities.

    >>> ex = make_examples(2, "test")
    >>> ex == make_examples(2, "test"), ex[0].answer.startswith('{"name": ')
    (True, True)
    """
    if split not in ("train", "test"):
        raise ValueError(f"make_examples: split must be 'train' or 'test', got {split!r}")
    pick = 0 if split == "train" else 1
    first, last, cities = (_held_out(w, 4)[pick] for w in (FIRST, LAST, CITIES))
    rng = np.random.default_rng([seed, pick, 14])
    out, seen = [], set()
    while len(out) < n:
        name = f"{first[rng.integers(len(first))]} {last[rng.integers(len(last))]}"
        city, other = (cities[i] for i in rng.choice(len(cities), 2, replace=False))
        age = int(rng.integers(19, 80))
        job = JOBS[rng.integers(len(JOBS))]
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        text = template.format(name=name, age=age, city=city, other=other, job=job, job_cap=job.capitalize(),
                               n=int(rng.integers(2, 9)), thing=THINGS[rng.integers(len(THINGS))])
        if text in seen:
            continue
        seen.add(text)
        out.append(Example(text, (("name", name), ("age", age), ("city", city))))
    return out


_FENCE = re.compile(r"```(?:json)?")


def parse(reply: str) -> dict[str, Any] | None:
    """The first JSON object in a reply (code fences and surrounding text ignored), or None.

    >>> parse('Sure! ```json\\n{"name": "Ada", "age": 3}\\n```')
    {'name': 'Ada', 'age': 3}
    >>> parse("no json here") is None
    True
    """
    text = _FENCE.sub("", reply)
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def _norm(value: Any) -> Any:
    """Field values compare as stripped strings (``36`` and ``"36"`` are the same age)."""
    return str(value).strip()


def score(replies: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Exact match (parsed object == reference), field F1 (micro, over (key, value) pairs), valid-JSON rate.

    A field counts when the key is one of :data:`KEYS` and its value equals the reference's
    (numbers and their strings alike); extra keys count as false positives.

    >>> ex = make_examples(1, "test")[0]
    >>> score([ex.answer], [ex])
    {'exact_match': 1.0, 'field_f1': 1.0, 'valid_json': 1.0, 'n': 1}
    >>> score(["{}"], [ex])["field_f1"]
    0.0
    """
    if len(replies) != len(examples):
        raise ValueError(f"score: {len(replies)} replies for {len(examples)} examples; they must pair up")
    if not examples:
        return {"exact_match": 0.0, "field_f1": 0.0, "valid_json": 0.0, "n": 0}
    exact = valid = tp = n_pred = n_gold = 0
    for reply, ex in zip(replies, examples):
        gold = {k: _norm(v) for k, v in ex.fields}
        obj = parse(reply)
        n_gold += len(gold)
        if obj is None:
            continue
        valid += 1
        pred = {str(k): _norm(v) for k, v in obj.items()}
        n_pred += len(pred)
        tp += sum(1 for k, v in pred.items() if gold.get(k) == v)
        exact += pred == gold
    f1 = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
    n = len(examples)
    return {"exact_match": exact / n, "field_f1": f1, "valid_json": valid / n, "n": n}
