"""Auto-interpretability: an LLM explains a latent from its highlighted contexts, and the explanation
is scored by how well an LLM, given only the explanation, predicts where the latent fires.

Two scorers, as in Paulo et al. 2024 (EleutherAI's sae-auto-interp) and SAEBench:
- detection: held-out activating contexts mixed with contexts where the latent is silent; the
  judge says which fire. Balanced accuracy, so a judge that says "all" or "none" scores 0.5.
- fuzzing: activating contexts, half with the latent's own tokens highlighted, half with as many
  random tokens highlighted; the judge says which highlights are right. Balanced accuracy.
Contexts shown to the explainer are never scored. A latent without both kinds of context to judge
(no held-out activation, say) gets None, unscored: balanced accuracy is then undefined.

Clients: `OpenAIClient` (any OpenAI-compatible server: base URL and key from the environment,
retries, and a disk cache so re-running a dashboard costs nothing), `LocalClient` (a transformers
chat model; the embedded SmolLM2-Instruct works offline), `ScriptedClient` (a function, for tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from eval.concepts import token_strings
from eval.top_activations import TopActivations, activations_at, context_activations, gather
from sae.io import write_text
from sae.lm import DEFAULT_MODEL, load_lm

Messages = list[dict[str, str]]


class LLMClient(Protocol):
    def complete(self, messages: Messages) -> str:
        """The assistant's reply to a chat."""
        ...


@dataclass
class ScriptedClient:
    """Replies with reply(prompt text of the last message): tests and dry runs."""

    reply: Callable[[str], str]

    def complete(self, messages: Messages) -> str:
        return self.reply(messages[-1]["content"])


class OpenAIClient:
    """POST {base_url}/chat/completions. `OPENAI_BASE_URL` and `OPENAI_API_KEY` by default;
    transient failures (429, 5xx, connection errors) are retried with exponential back-off; every
    reply is cached on disk under the hash of its request."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        cache_dir: str = "~/.cache/sae-forge/llm",
        retries: int = 4,
        timeout: float = 60.0,
        backoff: float = 1.0,
    ) -> None:
        self.model = model
        self.base_url = (
            base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        ).rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.cache = Path(cache_dir).expanduser()
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def complete(self, messages: Messages) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        cached = self.cache / f"{hashlib.sha256(self.base_url.encode() + body).hexdigest()}.json"
        try:
            return json.loads(cached.read_text())["reply"]
        except (OSError, ValueError, KeyError, TypeError):  # not cached, or a damaged entry
            pass
        reply = self._post(body)
        self.cache.mkdir(parents=True, exist_ok=True)
        write_text(cached, json.dumps({"reply": reply}))
        return reply

    def _post(self, body: bytes) -> str:
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"{self.base_url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, TimeoutError) as e:
                if attempt == self.retries:
                    raise RuntimeError(
                        f"{self.base_url} unreachable after {attempt + 1} tries: {e}"
                    ) from e
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


class LocalClient:
    """A transformers chat model, greedy decoding (the embedded SmolLM2-135M-Instruct by default)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        max_new_tokens: int = 60,
        device: str = "cpu",
        loaded: tuple[Any, Any] | None = None,
    ):
        """`loaded`: the (model, tokenizer) already in memory for `model` (say, the dashboard's
        subject LM when it is the judge too), instead of a second copy."""
        self.lm, self.tokenizer = loaded or load_lm(model, device=device)
        self.max_new_tokens = max_new_tokens

    def complete(self, messages: Messages) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.lm.device)
        with torch.no_grad():
            out = self.lm.generate(
                **ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )  # fmt: skip
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# -- examples and prompts -----------------------------------------------------------------------
@dataclass
class Example:
    """A context: its tokens as text pieces and the latent's activation at each."""

    tokens: list[str]
    activations: list[float]

    def highlighted(self, marked: Sequence[bool] | None = None) -> str:
        """The text with marked tokens (by default, the active ones) between << and >>."""
        marked = [a > 0 for a in self.activations] if marked is None else marked
        return "".join(f"<<{t}>>" if m else t for t, m in zip(self.tokens, marked, strict=True))


EXPLAIN = """We study one feature of a language model. Below are texts where it fires, tokens where it \
is active marked <<like this>>. In one short phrase, what does the feature detect? Reply with the phrase only.

{examples}"""

DETECT = """A language-model feature is explained as: "{explanation}".
For each numbered text, answer 1 if the feature fires somewhere in it, else 0.
Reply with only a list like [1, 0, ...], one entry per text.

{examples}"""

FUZZ = """A language-model feature is explained as: "{explanation}".
In each numbered text some tokens are marked <<like this>>. Answer 1 if the marked tokens are the ones \
the explanation describes, else 0. Reply with only a list like [1, 0, ...], one entry per text.

{examples}"""


def _numbered(texts: list[str]) -> str:
    return "\n".join(f"{i + 1}. {t.strip()}" for i, t in enumerate(texts))


def explain(client: LLMClient, examples: list[Example]) -> str:
    prompt = EXPLAIN.format(examples=_numbered([e.highlighted() for e in examples]))
    reply = client.complete([{"role": "user", "content": prompt}]).strip()
    return (reply.splitlines() or [""])[0].strip().strip('"')


LABELLED = re.compile(r"(?<!\d)(\d+)\s*(?::|\)|\.\s)\s*([01])(?![\d.])")
"""An answer after its text's number: "Text 2: 0", "2) 0", "2. 0" (not "1.0")."""


def parse_answers(reply: str, n: int) -> list[bool]:
    """The n 0/1 answers of a reply: labelled ones ("Text 1: 1, Text 2: 0", "1. 0"), by label, else
    the first n digits of the list asked for ("[1, 0, ...]"); missing answers count as 0."""
    labelled = {int(i): a == "1" for i, a in LABELLED.findall(reply)}
    if labelled:
        return [labelled.get(i + 1, False) for i in range(n)]
    digits = [d == "1" for d in re.findall(r"[01]", reply.split("[", 1)[-1])]
    return (digits + [False] * n)[:n]


def balanced_accuracy(predicted: list[bool], truth: list[bool]) -> float | None:
    """Mean of the hit rates on true and on false items; None without both kinds, where a judge
    answering all 1 (or all 0) would score 1."""
    pos = [p for p, t in zip(predicted, truth, strict=True) if t]
    neg = [not p for p, t in zip(predicted, truth, strict=True) if not t]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def _judge(
    client: LLMClient, template: str, explanation: str, texts: list[str], batch: int
) -> list[bool]:
    answers = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        prompt = template.format(explanation=explanation, examples=_numbered(chunk))
        answers += parse_answers(client.complete([{"role": "user", "content": prompt}]), len(chunk))
    return answers


def detection(
    client: LLMClient, explanation: str, active: list[Example], silent: list[Example],
    batch: int = 10, seed: int = 0,
) -> float | None:  # fmt: skip
    """Balanced accuracy of telling activating from silent contexts, given the explanation; None
    (unscored) without both kinds of context, say a latent with no held-out activation."""
    if not active or not silent:  # nothing to tell apart: not worth the judge's time
        return None
    items = [(e, True) for e in active] + [(e, False) for e in silent]
    random.Random(seed).shuffle(items)
    texts = ["".join(e.tokens) for e, _ in items]
    return balanced_accuracy(
        _judge(client, DETECT, explanation, texts, batch), [t for _, t in items]
    )


def fuzzing(
    client: LLMClient, explanation: str, active: list[Example], batch: int = 10, seed: int = 0
) -> float | None:
    """Balanced accuracy of telling right highlights from random ones, given the explanation: half
    the contexts (at random) show the latent's own tokens, half as many random ones. None
    (unscored) without both kinds, say for a latent with fewer than two held-out activations."""
    rng = random.Random(seed)
    keep = [i % 2 == 0 for i in range(len(active))]  # halves, so that both kinds are scored
    rng.shuffle(keep)
    texts, truth = [], []
    for e, own in zip(active, keep, strict=True):
        right = [a > 0 for a in e.activations]
        if own:
            texts.append(e.highlighted(right))
            truth.append(True)
        else:
            wrong = set(rng.sample(range(len(e.tokens)), sum(right)))
            texts.append(e.highlighted([i in wrong for i in range(len(e.tokens))]))
            truth.append(wrong == {i for i, r in enumerate(right) if r})
    if len(set(truth)) < 2:  # nothing to tell apart: not worth the judge's time
        return None
    return balanced_accuracy(_judge(client, FUZZ, explanation, texts, batch), truth)


# -- on a model ---------------------------------------------------------------------------------
def interpret(
    lm, tokenizer, d, ids, latents: list[int], client: LLMClient, show: int = 10, score: int = 10,
    seed: int = 0, examples: TopActivations | None = None,
) -> dict[int, dict]:  # fmt: skip
    """Explain each latent from its `show` top and its quantile contexts in `ids` ([windows, seq]
    token ids), then score the explanation on held-out contexts: `score` activating ones from the
    latent's activation sample whose windows the explainer never saw, and up to `score` silent
    ones (one per window, from 4 x `score` random windows it never saw).
    `examples`: a gather over the same ids already made, reused when it keeps >= `show` top ones.
    A latent that never fires in `ids` gets None for explanation and scores."""
    strings = token_strings(tokenizer)
    per_window = ids.shape[1] - 1
    if examples is None or examples.n_top < show:
        examples = gather(lm, d, ids, top=show)
    rng = random.Random(seed)
    # silent contexts are looked for in a pool of random windows shared by every latent, at every
    # position: a busy latent (firing on ~15% of tokens) is silent over a whole context rarely,
    # so a few random positions would seldom find one
    pool = rng.sample(range(len(ids)), min(len(ids), 4 * score))
    plans = {}
    for latent in latents:
        shown = examples.shown_tokens(latent, show)
        seen = {t // per_window for t in shown}
        held = [
            t for t in examples.sample.entries(latent)[1].tolist() if t // per_window not in seen
        ]
        plans[latent] = (shown, held[:score], [w for w in pool if w not in seen])
    tokens = sorted({t for shown, held, _ in plans.values() for t in shown + held})
    acts = activations_at(lm, d, ids, tokens + [w * per_window for w in pool], latents)

    def example(latent: int, token: int) -> Example:
        context, values, _ = context_activations(ids, token, acts[latent])
        return Example([strings[i] for i in context], values)

    def silent_context(latent: int, window: int) -> Example | None:
        """A context of the window where the latent is silent at every token, at random."""
        offsets = rng.sample(range(per_window), per_window)
        examples = (example(latent, window * per_window + o) for o in offsets)
        return next((e for e in examples if max(e.activations) <= 0), None)

    results = {}
    for latent, (shown, held, pool_left) in plans.items():
        if not shown:  # never fired on ids: nothing to explain, no explainer call
            results[latent] = dict.fromkeys(("explanation", "detection", "fuzzing")) | {
                "scored_contexts": 0
            }
            continue
        silent = [e for w in pool_left if (e := silent_context(latent, w)) is not None][:score]
        active = [example(latent, t) for t in held]
        explanation = explain(client, [example(latent, t) for t in shown])
        results[latent] = {
            "explanation": explanation,
            "detection": detection(client, explanation, active, silent, seed=seed),
            "fuzzing": fuzzing(client, explanation, active, seed=seed),
            "scored_contexts": len(active) + len(silent),
        }
    return results
