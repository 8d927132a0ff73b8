"""`attune eval safety`: the clinical-safety report, measured from outside against a live Attune service.

Every prompt goes to POST /v1/chat/completions in a session of its own, once with the gate on (the patient key)
and once with it off (the operator's `attune_options: {"gate": false}`). From the reply, its `attune` extension
and GET /v1/sessions/{id} it measures crisis-protocol recall on self-harm prompts, harmful replies judged apart from
the gate (the audit rules and the independent judge, `evals.safety_judge`) and false escalation on counsel-chat
questions and our own hard negatives; `evals.safety_report` holds the figures, `evals.safety_markdown` writes
reports/safety.{json,md}. Logs carry ids and counts, never prompt or reply text.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from serving.safety import FALLBACK_REPLY, HARM_AUDIT_RULES, CrisisRules
from evals.safety_judge import IndependentJudge
from evals.safety_markdown import render_markdown, write_report
from evals.safety_report import (Outcome, audit_reply, failures, fixes, goals, headline, judge_outcomes, per_set,
                                   resources_shown)
from evals.safety_sets import DEFAULT_EVAL_DIR, EvalPrompt, load_hard_negatives, load_sets

RETRIES_ON_429 = 20
GATE_OFF_MEANS = (
    "Gate off is the operator-only request option attune_options.gate = false (a patient key sending it gets 403). "
    "For that request the service skips the output gate (the reply is neither scored nor regenerated nor replaced "
    "by the fallback; it is stored with gate 'off'). It never skips crisis detection: a risk message still gets the "
    "crisis protocol (the vetted crisis reply, the session flagged, an audit event), so crisis recall is the same "
    "with the gate off and the comparison shows what the output gate adds. Routing by preference is unchanged. Harm "
    "is judged the same way with the gate on and off: by the audit rules and the independent judge, here, from the "
    "prompt and the reply alone.")


# ---------------------------------------------------------------- the client
@dataclass
class SafetyEvalPlan:
    """What one run does; the service is reached only over HTTP."""

    url: str
    """Base URL of the service (without /v1)."""
    operator_key: str
    """Operator key: gate-off requests and GET /v1/admin/status need it."""
    api_key: str | None = None
    """Patient-app key for gate-on requests, as a patient's app would send them (None: the operator key)."""
    max_tokens: int = 96
    """max_tokens of every request (temperature 0)."""
    concurrency: int = 4
    """Requests in flight at once."""
    gate_off: bool = True
    """Also send every prompt with the gate off, for the comparison."""
    request_timeout_s: float = 900.0
    """One request's limit (the machine may be slow; regenerations count)."""
    reward_dir: str | None = None
    """The gate's reward model, as the service uses it (None: the shipped adapters/store/reward): its crisis head
    diagnoses failed prompts, and the judge must be independent of it. It judges no reply."""
    judge_dir: str | None = None
    """The independent judge of harm (None: the shipped adapters/store/judge)."""

    def __post_init__(self):
        problems = [f"{k} must be >= 1 (got {getattr(self, k)})" for k in ("max_tokens", "concurrency")
                    if getattr(self, k) < 1]
        if not self.operator_key:
            problems.append("an operator key is needed: --operator-key, $ATTUNE_OPERATOR_KEY or "
                            "<data_dir>/operator_key")
        if problems:
            raise ValueError("; ".join(problems))
        self.url = self.url.rstrip("/")


class SafetyClient:
    """The calls the evaluation makes; 429 answers are waited out (Retry-After) and counted."""

    def __init__(self, plan: SafetyEvalPlan, http: httpx.AsyncClient):
        self.plan, self.http = plan, http

    def _key(self, gate: bool) -> str:
        return (self.plan.api_key or self.plan.operator_key) if gate else self.plan.operator_key

    async def _send(self, method: str, path: str, key: str, body: dict | None = None) -> tuple[httpx.Response, int]:
        for throttled in range(RETRIES_ON_429 + 1):
            r = await self.http.request(method, f"{self.plan.url}{path}", json=body, headers={"Authorization":
                                        f"Bearer {key}"}, timeout=self.plan.request_timeout_s)
            if r.status_code != 429 or throttled == RETRIES_ON_429:
                return r, throttled
            try:
                wait = max(float(r.headers.get("retry-after", "1")), 0.0)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def status(self) -> dict:
        r, _ = await self._send("GET", "/v1/admin/status", self.plan.operator_key)
        if r.status_code != 200:
            raise RuntimeError(f"GET /v1/admin/status: HTTP {r.status_code}: {r.text[:300]}; give an operator key")
        return r.json()

    async def ask(self, p: EvalPrompt, gate: bool) -> Outcome:
        out = Outcome(p.set, p.id, p.kind, p.group, gate)
        body = {"model": "attune", "messages": [{"role": "user", "content": p.text}],
                "max_tokens": self.plan.max_tokens, "temperature": 0}
        if not gate:
            body["attune_options"] = {"gate": False}
        key = self._key(gate)
        try:
            r, out.throttled = await self._send("POST", "/v1/chat/completions", key, body)
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {_error_message(r)}"
                return out
            data = r.json()
            info = data.get("attune") or {}
            out.reply = data["choices"][0]["message"]["content"] or ""
            out.crisis, out.decision, out.adapter = bool(info.get("crisis")), info.get("gate"), info.get("adapter")
            out.finish_reason = data["choices"][0].get("finish_reason")
            out.gate_safety = (info.get("scores") or {}).get("safety")
            s, more = await self._send("GET", f"/v1/sessions/{info['session_id']}", key)
            out.throttled += more
            if s.status_code != 200:
                out.error = f"GET session: HTTP {s.status_code}: {_error_message(s)}"
                return out
            out.flagged = bool(s.json().get("flagged"))
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            out.error = f"{type(e).__name__}: {str(e)[:200]}"
            return out
        out.ok, out.resources, out.harm_rules = True, resources_shown(out.reply), audit_reply(out.reply)
        out.fallback = FALLBACK_REPLY in out.reply
        return out


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


async def ask_all(client: SafetyClient, prompts: Sequence[EvalPrompt], gate: bool, concurrency: int) -> list[Outcome]:
    """Every prompt once, `concurrency` at a time, in input order; progress (counts only) to stderr."""
    sem, done = asyncio.Semaphore(concurrency), [0]

    async def one(p: EvalPrompt) -> Outcome:
        async with sem:
            o = await client.ask(p, gate)
        done[0] += 1
        if done[0] % 10 == 0 or done[0] == len(prompts):
            print(f"gate {'on' if gate else 'off'}: {done[0]}/{len(prompts)}", file=sys.stderr, flush=True)
        return o

    return list(await asyncio.gather(*(one(p) for p in prompts)))


# ---------------------------------------------------------------- the run
class LocalDiagnostics:
    """The gate's reward model loaded here (a serving.scorer.Scorer, or anything with its crisis method): the crisis
    head's probability and the crisis rules for prompts that failed, to say what would fix them. It judges no reply.
    Without a model (`why` says why) the probabilities stay None."""

    def __init__(self, scorer=None, why: str = ""):
        self.scorer, self.why, self.rules = scorer, why, CrisisRules()

    @classmethod
    def load(cls, reward_dir: str | None) -> "LocalDiagnostics":
        from serving.scorer import Scorer

        try:
            return cls(Scorer.load(reward_dir))
        except (FileNotFoundError, OSError, ValueError, KeyError) as e:
            return cls(None, f"{type(e).__name__}: {str(e)[:200]}")

    def crisis(self, texts: list[str]) -> list[dict]:
        probs = self.scorer.crisis(texts) if self.scorer is not None and texts else [None] * len(texts)
        return [{"crisis_p_local": None if p is None else round(p, 4), "crisis_rules_local": self.rules.match(t)}
                for p, t in zip(probs, texts)]


async def run(plan: SafetyEvalPlan, prompts: Sequence[EvalPrompt], http: httpx.AsyncClient | None = None,
              diagnostics: LocalDiagnostics | None = None, judge: IndependentJudge | None = None,
              set_notes: Sequence[str] = ()) -> dict:
    """The whole evaluation: the report as a dict (see `render_markdown` for its reading). The judge is loaded
    first, so that a judge that cannot be used stops the run before any request; `set_notes` say what was loaded."""
    judge = judge or IndependentJudge.load(plan.judge_dir, plan.reward_dir)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    own = http is None
    http = http or httpx.AsyncClient(limits=httpx.Limits(max_connections=plan.concurrency * 2))
    try:
        client = SafetyClient(plan, http)
        status = await client.status()
        gate = status.get("gate", {})
        threshold = float(gate["safety_threshold"])
        outcomes = await ask_all(client, prompts, True, plan.concurrency)
        if plan.gate_off:
            outcomes += await ask_all(client, prompts, False, plan.concurrency)
    finally:
        if own:
            await http.aclose()
    diagnostics = diagnostics or LocalDiagnostics.load(plan.reward_dir)
    by_key = {(p.set, p.id): p for p in prompts}
    print(f"judging {sum(o.ok for o in outcomes)} replies", file=sys.stderr, flush=True)
    judge_note = judge_outcomes(outcomes, by_key, judge)
    counts = Counter((p.set, p.kind) for p in prompts)
    report = {
        "object": "attune.safety_report", "started": started, "seconds": round(time.perf_counter() - t0, 1),
        "service": {"url": plan.url, "safety_threshold": threshold, "threshold_source": gate.get("threshold_source"),
                    "crisis_threshold": gate.get("crisis_threshold"),
                    "max_regenerations": gate.get("max_regenerations"),
                    "adapters": len(status.get("adapters", []))},
        "settings": {"max_tokens": plan.max_tokens, "temperature": 0, "concurrency": plan.concurrency,
                     "stream": False, "session": "a new session per prompt", "gate_on_key":
                     "patient-app" if plan.api_key else "operator", "crisis_diagnostics": diagnostics.why or "loaded"},
        "judge": judge.describe(), "judge_note": judge_note, "audit_rules": [r.name for r in HARM_AUDIT_RULES],
        "set_notes": [f"{s}: {n} prompts ({kind})" for (s, kind), n in counts.items()] + list(set_notes),
        "goals": {}, "gate_off_means": GATE_OFF_MEANS, "figures": {}, "sets": {}, "failures": {},
        "throttled": sum(o.throttled for o in outcomes),
    }
    for name, on in (("on", True), ("off", False)):
        part = [o for o in outcomes if o.gate is on]
        if part:
            report["figures"][name] = headline(part)
            report["sets"][name] = per_set(part)
    report["goals"] = goals(report["figures"]["on"])
    report["failures"] = failures(outcomes, by_key, diagnostics.crisis)
    report["fixes"] = fixes(report)
    report["outcomes"] = [{k: v for k, v in asdict(o).items() if k != "reply"} for o in outcomes]
    return report


# ---------------------------------------------------------------- a service of our own
@contextmanager
def local_service() -> Iterator[tuple[str, str | None, str]]:
    """Start the app (private Ray, built-in defaults, shipped store) with its data in a temporary folder and no
    per-key request limit; yield (url, patient key, operator key); always stop it."""
    from serving import app
    from serving.auth import ENV_KEY, ENV_OPERATOR_KEY, KEY_FILE, OPERATOR_KEY_FILE

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="ase-"))
    # Ray's files (and its "current cluster" address) go here, so that no other process's address-less ray.init or
    # serve.shutdown on a shared machine finds this instance; a short path keeps Ray's socket paths legal.
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    args = {"settings": {"data_dir": str(tmp / "data"), "limits": {"requests_per_minute": 0}}}
    cfg = app.load_config(app.AppArgs(**args))
    if cfg.limits.requests_per_minute:
        print(f"note: requests_per_minute is {cfg.limits.requests_per_minute} (environment); 429s will be waited out",
              file=sys.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        url = app.start_local(args, port=port)
        app.wait_ready(url)

        def key(env: str, name: str) -> str | None:
            path = cfg.data_dir / name
            return os.environ.get(env) or (path.read_text().strip() if path.is_file() else None)

        yield url, key(ENV_KEY, KEY_FILE), key(ENV_OPERATOR_KEY, OPERATOR_KEY_FILE) or ""
    finally:
        import ray

        if ray.is_initialized():
            app.stop_local()
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_safety(out_dir: Path, *, url: str | None = None, api_key: str | None = None,
                    operator_key: str | None = None, eval_dir: Path = DEFAULT_EVAL_DIR,
                    counsel_chat: str | None = None, hard_negatives: str | None = None, limit: int | None = None,
                    **plan: object) -> dict:
    """Load the sets and the judge, run against `url` (or a service started here), write safety.{json,md} to
    `out_dir`. `hard_negatives` is a folder, file or glob of our own 'none' messages (default alignment/corpus/crisis);
    when there are none the set is skipped and the report says so."""
    own, note = load_hard_negatives(hard_negatives, limit)
    prompts = load_sets(eval_dir, counsel_chat, limit) + own
    counts = Counter(p.set for p in prompts)
    print(f"{len(prompts)} prompts: {dict(counts)}; {note}", file=sys.stderr)
    judge = IndependentJudge.load(plan.get("judge_dir"), plan.get("reward_dir"))
    if url:
        from evals.bench import keys_from_env

        patient, operator = keys_from_env(api_key, operator_key)
        report = asyncio.run(run(SafetyEvalPlan(url, operator, patient, **plan), prompts, judge=judge,
                                 set_notes=[note]))
    else:
        with local_service() as (local_url, patient, operator):
            report = asyncio.run(run(SafetyEvalPlan(local_url, operator_key or operator, api_key or patient, **plan),
                                     prompts, judge=judge, set_notes=[note]))
        report["service"]["url"] = "a local service (built-in defaults, shipped store)"
    js, md = write_report(report, out_dir)
    print(render_markdown(report).split("## Judges of harm")[0])
    print(f"wrote {js} and {md}")
    return report
