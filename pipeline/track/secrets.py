"""Keep API keys and tokens out of everything a run writes (configs, metrics, W&B files, logs).

Three independent nets, because any one alone misses cases:
1. by name: a mapping key or ``--flag``/``key=value`` whose name looks secret (``api_key``,
   ``token``, ``password``, ...) has its value replaced;
2. by value: the values of secret-named environment variables (``WANDB_API_KEY``,
   ``HF_TOKEN``, ...) are replaced wherever they occur inside any string;
3. by shape: well-known token formats (``hf_...``, ``ghp_...``, ``sk-...``, AWS key ids) and
   passwords inside URLs (``https://user:pw@host``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "<redacted>"

# Names (of env vars, config keys, CLI flags) whose values are secrets, matched on the words
# of the name (split at "_", "-", ".", camelCase) so that "tokenizer" or "author" are not.
# Not "pwd": the shell's $PWD and $OLDPWD hold directories, and with it every path under the
# working directory was redacted, losing the run's provenance (issue 15 item 7).
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "apikey",
                 "authorization", "auth"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
# Shapes of well-known credentials, independent of where they appear.
_TOKEN_SHAPES = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),  # GitHub
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"\b(?:local|wandb)-[0-9a-f]{40,}\b"),  # W&B server keys
]
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^@\s/]+)(?P<post>@)")
# "track.api_key=X", "HF_TOKEN: X" inside free text (argv, event fields).
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P<sep>=|:[ \t]*)(?P<value>[^\s,;'\"]+)")
_MIN_SECRET_CHARS = 6  # shorter env values ("1", "true") would redact half the world


def is_secret_name(name: str) -> bool:
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so overlaps redact fully)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


class Scrubber:
    """Redacts secrets from strings and nested config structures.

    The environment is read once at construction (the tracker builds one per run).
    """

    def __init__(self, environ: Mapping[str, str] | None = None, extra_secrets: list[str] | None = None):
        values = secret_env_values(environ) + [s for s in (extra_secrets or []) if len(s) >= _MIN_SECRET_CHARS]
        self._values = sorted(set(values), key=len, reverse=True)

    def add_secret(self, value: str) -> None:
        if len(value) >= _MIN_SECRET_CHARS and value not in self._values:
            self._values = sorted([*self._values, value], key=len, reverse=True)

    def text(self, s: str) -> str:
        """Redact every known secret value, token shape, URL password and secret assignment."""
        for v in self._values:
            if v in s:
                s = s.replace(v, REDACTED)
        for shape in _TOKEN_SHAPES:
            s = shape.sub(REDACTED, s)
        s = _URL_PASSWORD.sub(lambda m: m["pre"] + REDACTED + m["post"], s)
        s = _ASSIGNMENT.sub(
            lambda m: m["name"] + m["sep"] + REDACTED if is_secret_name(m["name"]) else m[0], s
        )
        return s

    def value(self, x: Any, key: str | None = None) -> Any:
        """Scrub a nested structure of dicts/lists/scalars; values under secret-named keys go."""
        if key is not None and isinstance(x, str) and x and is_secret_name(key):
            return REDACTED  # numbers and sections under such names are not secrets
        if isinstance(x, dict):
            return {k: self.value(v, key=str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x)
        if isinstance(x, str):
            return self.text(x)
        return x

    def argv(self, argv: list[str]) -> list[str]:
        """Scrub a command line: ``--token X`` drops X; every argument is scrubbed as text."""
        out: list[str] = []
        redact_next = False
        for arg in argv:
            if redact_next:
                out.append(REDACTED)
                redact_next = False
                continue
            if arg.startswith("-") and "=" not in arg and is_secret_name(arg):
                redact_next = True
            out.append(self.text(arg))
        return out
