"""Code search over the Python standard library: docstring summary -> qualified name + signature.

A real retrieval task on real text that every machine has, no download: the source files of the
installed standard library. Each example pairs

    query  = the summary of a public function's or method's docstring (its first paragraph), e.g.
             "Return a list of all non-overlapping matches in the string."
    answer = its qualified name and signature, e.g. "re.findall(pattern, string, flags=0)"

The dataset is built deterministically with ``ast`` from the source files of a fixed list of
stdlib modules and packages (nothing is imported or executed). Private names (any ``_`` prefixed
part), nested functions, ``@overload`` stubs and trivial docstrings (fewer than 4 words, or a bare
signature) are skipped; queries or answers that occur more than once are dropped everywhere, so
no query text is shared between splits. Training uses some top-level modules, evaluation
held-out ones: each held-out query ranks all held-out answers (recall@1, recall@5, MRR).

Run ``python examples/codesearch.py`` for the dataset statistics and a few examples.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

# Fixed lists (sorted). Packages contribute every public submodule except tests.
TRAIN_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "code", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "imaplib", "importlib", "inspect",
    "ipaddress", "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "selectors", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "uuid", "warnings", "weakref", "zipfile",
)
HELDOUT_MODULES = (
    "concurrent", "http", "json", "logging", "multiprocessing", "tarfile", "unittest", "urllib",
    "wsgiref", "xml", "xmlrpc",
)
MIN_WORDS = 4
_SIGNATURE_LIKE = re.compile(r"^[\w.]+\s*\(.*\)\s*(->.*)?$")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example: a docstring summary and the function it documents.

    >>> Pair("Return x.", "m.f(x)", "m").answer
    'm.f(x)'
    """

    query: str
    answer: str
    module: str  # the top-level module or package it comes from (the split unit)


def _source_files(top: str) -> list[tuple[str, Path]]:
    """(dotted module name, source path) for a stdlib module or every file of a package, sorted."""
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:
        return [(top, origin)]
    out = []
    root = origin.parent
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in rel) or any(p in ("test", "tests") for p in rel):
            continue
        name = ".".join((top,) + tuple(p for p in rel if p != "__init__"))
        out.append((name, f))
    return out


def _summary(doc: str | None) -> str | None:
    """The docstring's first paragraph on one line, or None if it is trivial."""
    if not doc:
        return None
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    if len(text.split()) < MIN_WORDS or _SIGNATURE_LIKE.match(text):
        return None
    return text


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``(args)`` as written, without a leading self/cls (also for module-level descriptors' functions)."""
    args = fn.args
    if not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        pos = args.posonlyargs or args.args
        if pos and pos[0].arg in ("self", "cls", "mcls", "metacls"):
            args = ast.arguments(**{**{f: getattr(args, f) for f in args._fields}})
            if args.posonlyargs:
                args.posonlyargs = args.posonlyargs[1:]
            else:
                args.args = args.args[1:]
    return "(" + ast.unparse(args) + ")"


def _public(name: str) -> bool:
    return not name.startswith("_")


def _is_overload(fn: ast.AST) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "overload")
               or (isinstance(d, ast.Attribute) and d.attr in ("overload", "setter", "deleter"))
               for d in getattr(fn, "decorator_list", []))


def _functions(module: str, tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(answer, summary) for public module-level functions and public methods of public classes."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and _public(node.name) and not _is_overload(node):
            s = _summary(ast.get_docstring(node))
            if s:
                yield f"{module}.{node.name}{_signature(node)}", s
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            for sub in node.body:
                if isinstance(sub, funcs) and _public(sub.name) and not _is_overload(sub):
                    s = _summary(ast.get_docstring(sub))
                    if s:
                        yield f"{module}.{node.name}.{sub.name}{_signature(sub)}", s


def build_dataset(modules: Sequence[str] = TRAIN_MODULES + HELDOUT_MODULES) -> list[Pair]:
    """Builds the deduplicated (query, answer) pairs from the installed stdlib sources.

    Deterministic for a given Python installation: files are walked in sorted order and parsed
    with ``ast`` (nothing is imported). Queries or answers occurring more than once (case-insensitive)
    are dropped entirely, so a query text never appears in two splits.

    >>> pairs = build_dataset(["json"])
    >>> any(p.answer.startswith("json.dumps(") for p in pairs)
    True
    """
    raw: list[Pair] = []
    seen_answers: set[str] = set()
    for top in sorted(set(modules)):
        for name, path in _source_files(top):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            except (SyntaxError, UnicodeDecodeError):  # pragma: no cover - stdlib parses
                continue
            for answer, query in _functions(name, tree):
                if answer.split("(")[0] in seen_answers:
                    continue  # a redefinition (e.g. under `if sys.platform`)
                seen_answers.add(answer.split("(")[0])
                raw.append(Pair(query, answer, top))
    q_count = Counter(p.query.lower() for p in raw)
    a_count = Counter(p.answer.lower() for p in raw)
    return [p for p in raw if q_count[p.query.lower()] == 1 and a_count[p.answer.lower()] == 1]


def split(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by top-level module: :data:`TRAIN_MODULES` vs :data:`HELDOUT_MODULES`."""
    train = [p for p in pairs if p.module in TRAIN_MODULES]
    test = [p for p in pairs if p.module in HELDOUT_MODULES]
    return train, test


def subsample(pairs: Sequence[Pair], n: int | None, seed: int = 0) -> list[Pair]:
    """A fixed random subset of ``n`` pairs (all of them if ``n`` is None or larger), order kept."""
    if n is None or n >= len(pairs):
        return list(pairs)
    idx = np.sort(np.random.default_rng(seed).choice(len(pairs), n, replace=False))
    return [pairs[i] for i in idx]


def retrieval_metrics(query_emb: np.ndarray, answer_emb: np.ndarray) -> dict[str, float]:
    """Query i's correct answer is answer i; ranks all answers by cosine (inputs are unit vectors).

    Returns recall@1, recall@5 and MRR (mean reciprocal rank), in [0, 1].

    >>> e = np.eye(3, dtype=np.float32)
    >>> retrieval_metrics(e, e)
    {'recall@1': 1.0, 'recall@5': 1.0, 'mrr': 1.0}
    """
    if query_emb.shape != answer_emb.shape:
        raise ValueError(f"retrieval_metrics: query_emb {query_emb.shape} and answer_emb {answer_emb.shape} differ")
    scores = query_emb.astype(np.float64) @ answer_emb.astype(np.float64).T
    correct = np.diag(scores)[:, None]
    rank = (scores > correct).sum(axis=1) + 1  # ties count in the model's favour
    return {"recall@1": float(np.mean(rank == 1)), "recall@5": float(np.mean(rank <= 5)),
            "mrr": float(np.mean(1.0 / rank))}


def evaluate(embed: Callable[[Sequence[str]], np.ndarray], pairs: Sequence[Pair]) -> dict[str, float]:
    """Embeds queries and answers with ``embed(texts) -> (n, d) unit vectors`` and scores retrieval."""
    return retrieval_metrics(embed([p.query for p in pairs]), embed([p.answer for p in pairs]))


if __name__ == "__main__":
    data = build_dataset()
    train, test = split(data)
    print(f"{len(data)} pairs: {len(train)} train ({len(TRAIN_MODULES)} modules), "
          f"{len(test)} held-out ({len(HELDOUT_MODULES)} modules)")
    print("held-out per module:", dict(Counter(p.module for p in test)))
    for p in subsample(test, 5):
        print(f"  {p.query!r}\n    -> {p.answer}")
