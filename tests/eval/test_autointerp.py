"""Auto-interp: scorers against scripted judges whose answers are known, the OpenAI-compatible
client against a local stand-in server (retries, cache), and prompts' shape."""

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from eval.autointerp import (
    Example,
    LocalClient,
    OpenAIClient,
    ScriptedClient,
    balanced_accuracy,
    detection,
    explain,
    fuzzing,
    interpret,
    parse_answers,
)
from sae.hooks import record

WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "a",
    "land",
    "far",
    "away",
    "rode",
    "to",
    "the",
    "sea",
    "with",
    "the",
    "crown",
]


def examples(n: int, fires: bool, seed: int) -> list[Example]:
    """Contexts of 8 words; the latent fires on ' the' (and a context without it stays silent)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice([w for w in WORDS if w != "the"]) for _ in range(8)]
        if fires:
            words[rng.randrange(8)] = "the"
        tokens = [" " + w for w in words]
        out.append(Example(tokens, [1.0 if t == " the" else 0.0 for t in tokens]))
    return out


def judge(prompt: str) -> str:
    """A perfect reader: the explanation names a word in quotes; a text fires when it holds the
    word, and its highlights are right when exactly that word's tokens are marked."""
    word = re.search(r"the word '(\w+)'", prompt)
    texts = re.findall(r"^\d+\. (.*)$", prompt, re.M)
    if "marked <<like this>>. Answer" in prompt:
        answers = [
            bool(word)
            and set(re.findall(r"<<\s*(\w+)>>", t)) == {word.group(1)}
            and len(re.findall(rf"\b{word.group(1)}\b", re.sub(r"<<|>>", "", t)))
            == len(re.findall(r"<<", t))
            for t in texts
        ]
    else:
        answers = [bool(word) and re.search(rf"\b{word.group(1)}\b", t) is not None for t in texts]
    return json.dumps([int(a) for a in answers])


def test_a_perfect_explanation_scores_one_and_a_wrong_one_one_half():
    client = ScriptedClient(judge)
    active, silent = examples(20, True, 0), examples(20, False, 1)
    assert detection(client, "the word 'the'", active, silent) == 1.0
    assert fuzzing(client, "the word 'the'", active) == 1.0
    assert detection(client, "the word 'zebra'", active, silent) == 0.5
    assert fuzzing(client, "the word 'zebra'", active) == 0.5


def test_a_random_judge_scores_about_one_half():
    rng = random.Random(0)
    client = ScriptedClient(lambda p: json.dumps([rng.randint(0, 1) for _ in range(10)]))
    scores = [
        detection(client, "anything", examples(50, True, s), examples(50, False, s + 1), seed=s)
        for s in range(10)
    ]
    assert abs(sum(scores) / len(scores) - 0.5) < 0.05


def test_explainer_sees_highlighted_contexts():
    seen = []
    client = ScriptedClient(lambda p: seen.append(p) or '"the word the"\nmore text')
    assert explain(client, examples(3, True, 0)) == "the word the"
    assert seen[0].count("<< the>>") == 3 and "1. " in seen[0] and "3. " in seen[0]


def test_answers_and_balanced_accuracy():
    assert parse_answers("Sure: [1, 0, 1]", 4) == [True, False, True, False]
    assert parse_answers("no list", 2) == [False, False]
    assert balanced_accuracy([True, True, True, True], [True, True, False, False]) == 0.5
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == 0.75


def test_labelled_answers_are_read_after_their_labels():
    assert parse_answers("Text 1: 1, Text 2: 0", 2) == [True, False]
    assert parse_answers("2. 1\n1. 0\n3) 1", 4) == [False, True, True, False]


def test_a_latent_with_nothing_to_judge_is_unscored():
    """No held-out activating context (a dead latent, or one firing only in the windows the
    explainer saw): None, not a ZeroDivisionError, nor 1.0 for a judge that always answers 0."""
    calls = []
    never = ScriptedClient(lambda p: calls.append(p) or "[0, 0, 0, 0, 0]")
    assert detection(never, "x", [], examples(5, False, 0)) is None
    assert fuzzing(never, "x", []) is None
    assert detection(never, "x", examples(5, True, 1), []) is None
    assert not calls and balanced_accuracy([False, False], [False, False]) is None
    assert fuzzing(never, "x", examples(2, True, 0)) == 0.5  # one right highlight, one wrong


class StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that fails the first `fail` requests with 503."""

    fail = 0
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers["Authorization"], body))
        if type(self).fail > 0:
            type(self).fail -= 1
            self.send_response(503)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": f"echo {body['messages'][-1]['content']}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    StandIn.fail, StandIn.requests = 2, []
    httpd = HTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


def test_openai_client_retries_then_caches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    client = OpenAIClient("judge-1", cache_dir=str(tmp_path), backoff=0.01)
    messages = [{"role": "user", "content": "hello"}]
    assert client.complete(messages) == "echo hello"
    assert len(StandIn.requests) == 3  # two 503s, then the answer
    path, auth, body = StandIn.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["messages"] == messages
    assert client.complete(messages) == "echo hello" and len(StandIn.requests) == 3  # cached
    assert OpenAIClient("judge-1", cache_dir=str(tmp_path)).complete(messages) == "echo hello"


def test_openai_client_gives_up_naming_the_server(server, tmp_path):
    StandIn.fail = 10
    client = OpenAIClient("m", base_url=server, cache_dir=str(tmp_path), retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match="HTTP 503"):
        client.complete([{"role": "user", "content": "x"}])
    assert len(StandIn.requests) == 3
    dead = OpenAIClient(
        "m", base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path), retries=1, backoff=0.01
    )
    with pytest.raises(RuntimeError, match="unreachable after 2 tries"):
        dead.complete([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def windows(smollm2):
    from eval.report import EvalConfig, dataset_windows, take_tokens

    return take_tokens(
        dataset_windows(smollm2[1], EvalConfig(context_size=64)), 16 * 63, 64, "test"
    )


def busiest_latents(model, d, windows, n: int = 1) -> list[int]:
    """The latents firing on the most tokens of the first windows (plenty to show and score)."""
    with torch.no_grad(), record(model, [d.cfg.hook_name]) as acts:
        model(windows[:4])
    fires = d.encode(acts[d.cfg.hook_name][:, 1:]).gt(0).flatten(0, 1).sum(0)
    return fires.topk(n).indices.tolist()


def test_scored_contexts_are_never_the_ones_shown(smollm2, trained_sae, windows):
    prompts = []
    client = ScriptedClient(lambda p: prompts.append(p) or "[1, 1, 0, 0, 1, 0, 1, 0, 1, 0]")
    (latent,) = busiest_latents(smollm2[0], trained_sae, windows)
    result = interpret(*smollm2, trained_sae, windows, [latent], client, show=5, score=5)[latent]
    explainer, judged = prompts[0], "\n".join(prompts[1:])
    shown = {
        t.replace("<<", "").replace(">>", "") for t in re.findall(r"^\d+\. (.*)$", explainer, re.M)
    }
    scored = set(re.findall(r"^\d+\. (.*)$", judged, re.M))
    assert shown and scored and not {s for s in scored if s in shown}
    assert explainer.count("<<") >= 5 and 0 <= result["detection"] <= 1
    assert result["scored_contexts"] >= 5


def test_the_whole_loop_runs_with_the_local_smollm2(smollm2, trained_sae, windows):
    client = LocalClient(max_new_tokens=30)
    latents = busiest_latents(smollm2[0], trained_sae, windows, 3)
    results = interpret(*smollm2, trained_sae, windows, latents, client, show=4, score=4)
    for result in results.values():
        assert isinstance(result["explanation"], str) and result["explanation"]
    # the busiest latents too are scored on silent contexts: every position of random windows is
    # searched for one (4 random positions per score, as before, found none for one of these and
    # 3 of 4 for the others; 16 windows, most of them shown to the explainer, leave few to search)
    scores = [r[k] for r in results.values() for k in ("detection", "fuzzing")]
    assert all(s is not None and 0 <= s <= 1 for s in scores)
    assert sorted(r["scored_contexts"] for r in results.values()) == [7, 8, 8]


def test_a_latent_silent_on_every_window_is_neither_explained_nor_scored(
    smollm2, trained_sae, windows
):
    """Nothing to show the explainer: no LLM call, None for the explanation and both scores."""
    model, hook = smollm2[0], trained_sae.cfg.hook_name
    with torch.no_grad(), record(model, [hook]) as acts:
        model(windows)
    fires = trained_sae.encode(acts[hook][:, 1:]).gt(0).flatten(0, 1).sum(0)
    silent = int(fires.eq(0).nonzero()[0])
    prompts = []
    client = ScriptedClient(lambda p: prompts.append(p) or "[1, 0, 1, 0, 1, 0, 1, 0, 1, 0]")
    result = interpret(*smollm2, trained_sae, windows, [silent], client, show=4, score=4)[silent]
    assert result == {"explanation": None, "detection": None, "fuzzing": None, "scored_contexts": 0}
    assert prompts == []
