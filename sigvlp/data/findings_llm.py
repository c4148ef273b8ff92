"""LLM backend for ``sigvlp findings``: an OpenAI-compatible chat-completions endpoint (a local
vLLM or Ollama server, or a hosted one) sorts each report's sentences by organ.

Per report: the findings are cut into sentences by sigvlp.data.findings.segment (so nothing
the model says can change the text), numbered, and sent with our organ list; the answer must be
JSON ``{"sentences": [{"i": <index>, "organs": [<organ>, ...]}, ...]}`` naming every index once
and only organs from sigvlp.data.organs.ORGANS ([] = general). An answer that is not such JSON,
names an unknown organ or drops or repeats a sentence is asked again once (the request then says
what was wrong); a second bad answer, or a request that still fails after ``max_retries`` HTTP
retries (429, 5xx, timeouts, refused connections; exponential backoff from ``backoff`` seconds,
a Retry-After header honoured up to ``max_backoff``), sends that report to the rule splitter and
is counted (LLMStats).

Before the first request, `probe` checks the endpoint once (one GET, no retries): a server that
cannot be reached (refused, unknown host, timeout) or refuses the credentials (HTTP 401/403)
raises EndpointUnreachable before any work; any other HTTP answer counts as reachable.

Valid answers are cached per VolumeName (JSONL, one line per report, appended as answers arrive)
with the model name and a hash of the findings text, so a rerun asks only for reports whose
answer is missing or stale; fallbacks are not cached. Requests run on ``concurrency`` threads,
at most ``rate`` requests per second overall (0: no limit). Standard library only (urllib).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from sigvlp.data.findings import entry_from_pieces, segment, split_report
from sigvlp.data.organs import ORGANS

SYSTEM_PROMPT = (
    "You sort the sentences of a chest CT report by the organ they describe. Organs: {organs}. A sentence "
    "belongs to every organ it describes, negated findings included ('No pleural effusion' -> lung). Regions "
    "without their own name take the organs around them: pleura, hilum -> lung; mediastinum -> heart, aorta, "
    "trachea, esophagus; upper abdomen -> liver, spleen, kidney, stomach, pancreas, gallbladder; adrenal -> "
    "kidney; thyroid -> trachea, esophagus; bone structures -> spine, ribs, sternum. Use [] for a sentence "
    "about none of them (technique, comparison, breast, soft tissue). Answer with JSON only: "
    '{{"sentences": [{{"i": <sentence number>, "organs": [<organs>]}}, ...]}} with every sentence number '
    "exactly once."
)


@dataclass(frozen=True)
class LLMConfig:
    url: str  # base URL (".../v1") or the full ".../chat/completions" URL
    model: str
    api_key: Optional[str] = None
    concurrency: int = 4  # requests in flight
    rate: float = 0.0  # requests per second over all threads; 0: no limit
    timeout: float = 120.0  # seconds per request
    max_retries: int = 4  # HTTP-level retries per request (429, 5xx, timeouts, connection errors)
    backoff: float = 1.0  # first retry wait in seconds, doubled each retry
    max_backoff: float = 30.0  # cap on one wait, Retry-After included

    def __post_init__(self):
        if not re.match(r"^https?://", self.url or ""):
            raise ValueError(f"llm url: expected an http:// or https:// URL, got {self.url!r}")
        if not self.model:
            raise ValueError("llm model: expected a model name")
        if int(self.concurrency) != self.concurrency or self.concurrency < 1:
            raise ValueError(f"llm concurrency: expected an integer >= 1, got {self.concurrency!r}")
        for name in ("rate", "backoff", "max_backoff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"llm {name}: expected a number >= 0, got {getattr(self, name)!r}")
        if not self.timeout > 0:
            raise ValueError(f"llm timeout: expected seconds > 0, got {self.timeout!r}")
        if int(self.max_retries) != self.max_retries or self.max_retries < 0:
            raise ValueError(f"llm max_retries: expected an integer >= 0, got {self.max_retries!r}")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


@dataclass
class LLMStats:
    cached: int = 0  # reports answered from the cache
    asked: int = 0  # reports sent to the endpoint
    answered: int = 0  # reports with a valid answer (cached for reruns)
    retried: int = 0  # reports asked a second time after a bad answer
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (VolumeName, why) sent to the rule splitter

    def summary(self) -> str:
        line = (f"llm: {self.answered} reports answered, {self.cached} from the cache, {self.retried} asked twice, "
                f"{len(self.fallback)} split by the rules instead")
        return "\n".join([line] + [f"  rule splitter for {n}: {why}" for n, why in self.fallback[:20]])


class _RateLimiter:
    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.lock = threading.Lock()
        self.next = 0.0

    def wait(self):
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class HTTPFailure(RuntimeError):
    """A request that failed after its retries."""


class EndpointUnreachable(HTTPFailure):
    """The endpoint cannot be reached or refuses the credentials (probe); one line naming it."""


def parse_answer(content: str, n: int) -> list[list[str]]:
    """Organs of each of the n sentences from a model's answer. ValueError says what is wrong
    (not JSON, an unknown organ, a sentence dropped or repeated)."""
    text = content.strip()
    fenced = re.search(r"\{.*\}", text, re.DOTALL)  # tolerate ```json fences or text around the object
    try:
        obj = json.loads(fenced.group(0) if fenced else text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the answer is not JSON ({e})") from None
    items = obj.get("sentences") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise ValueError('the answer has no "sentences" list')
    out: dict[int, list[str]] = {}
    for item in items:
        i, organs = (item.get("i"), item.get("organs")) if isinstance(item, dict) else (None, None)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n or i in out:
            raise ValueError(f"sentence number {i!r} is not one of 0..{n - 1} given once")
        if not isinstance(organs, list) or not all(isinstance(o, str) for o in organs):
            raise ValueError(f"sentence {i}: organs must be a list of names")
        unknown = [o for o in organs if o not in ORGANS]
        if unknown:
            raise ValueError(f"sentence {i}: unknown organ(s) {unknown}; use only {', '.join(ORGANS)}")
        out[i] = [o for o in ORGANS if o in organs]
    missing = [i for i in range(n) if i not in out]
    if missing:
        raise ValueError(f"sentence(s) {missing} are missing from the answer")
    return [out[i] for i in range(n)]


class LLMSplitter:
    """Sorts reports' sentences by organ with a chat-completions endpoint (see the module doc)."""

    def __init__(self, config: LLMConfig):
        self.config = config
        self.limiter = _RateLimiter(config.rate)

    def _post(self, messages: list[dict]) -> str:
        cfg = self.config
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                           "response_format": {"type": "json_object"}}).encode()
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        last = ""
        for attempt in range(cfg.max_retries + 1):
            wait = min(cfg.backoff * 2 ** attempt, cfg.max_backoff)
            self.limiter.wait()
            try:
                req = urllib.request.Request(cfg.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:
                    raise HTTPFailure(f"{cfg.endpoint}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and re.fullmatch(r"\d+(\.\d+)?", retry_after.strip()):
                    wait = min(float(retry_after), cfg.max_backoff)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise HTTPFailure(f"{cfg.endpoint}: not a chat-completions reply ({type(e).__name__}: {e})") from None
            if attempt < cfg.max_retries:
                time.sleep(wait)
        raise HTTPFailure(f"{cfg.endpoint}: {last} after {cfg.max_retries + 1} tries")

    def probe(self) -> None:
        """One GET of the endpoint with the request headers, no retries, at most 10 s: returns
        when the server answers anything but 401/403 (a chat endpoint may well answer GET with
        404/405); EndpointUnreachable (one line naming the endpoint) otherwise."""
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        try:
            req = urllib.request.Request(cfg.endpoint, headers=headers, method="GET")
            with urllib.request.urlopen(req, timeout=min(cfg.timeout, 10.0)):
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise EndpointUnreachable(f"{cfg.endpoint} refused the request: HTTP {e.code} {e.reason} "
                                          "(check the API key)") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EndpointUnreachable(f"cannot reach {cfg.endpoint} ({type(reason).__name__}: {reason})") from None

    def classify(self, sentences: list[str]) -> tuple[list[list[str]], int]:
        """(organs per sentence, number of requests). ValueError after two bad answers;
        HTTPFailure when the endpoint cannot be reached."""
        numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(sentences))
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(organs=", ".join(ORGANS))},
                    {"role": "user", "content": f"Sentences:\n{numbered}"}]
        content = self._post(messages)
        try:
            return parse_answer(content, len(sentences)), 1
        except ValueError as e:
            messages += [{"role": "assistant", "content": content},
                         {"role": "user", "content": f"That answer is invalid: {e}. Answer again with JSON only."}]
        return parse_answer(self._post(messages), len(sentences)), 2


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_cache(path: Path, model: str) -> dict[str, dict]:
    """VolumeName -> cached answer for this model; a truncated or foreign line is ignored."""
    cache: dict[str, dict] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("model") == model and isinstance(obj.get("VolumeName"), str):
            cache[obj["VolumeName"]] = obj
    return cache


def _cached_organs(hit: Optional[dict], sentences: list[str], digest: str) -> Optional[list[list[str]]]:
    if not hit or hit.get("hash") != digest or not isinstance(hit.get("organs"), list):
        return None
    try:
        return parse_answer(json.dumps({"sentences": [{"i": i, "organs": o} for i, o in enumerate(hit["organs"])]}),
                            len(sentences))
    except ValueError:
        return None


def llm_entries(reports: dict[str, tuple[str, str]], config: LLMConfig, cache_path,
                progress: bool = False, probe: bool = True) -> tuple[dict[str, dict], LLMStats]:
    """Bank entry bodies for reports {VolumeName: (findings, impression)} via the endpoint, the
    cache at cache_path (created as needed) and the rule splitter as fallback for reports whose
    requests fail. probe: check the endpoint once (LLMSplitter.probe) before the first request,
    when any report is not in the cache; EndpointUnreachable then, before anything is written."""
    cache_path = Path(cache_path)
    cache = read_cache(cache_path, config.model)
    stats, out, todo = LLMStats(), {}, {}
    for name, (findings, impression) in reports.items():
        sentences = segment(findings)
        organs = _cached_organs(cache.get(name), sentences, text_hash(findings))
        if organs is not None or not sentences:
            out[name] = entry_from_pieces(zip(sentences, organs or []), impression)
            stats.cached += organs is not None
        else:
            todo[name] = sentences
    if not todo:
        return out, stats
    splitter = LLMSplitter(config)
    if probe:
        splitter.probe()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path, "a", encoding="utf-8") as log, ThreadPoolExecutor(config.concurrency) as pool:
        futures = {pool.submit(splitter.classify, sentences): name for name, sentences in todo.items()}
        done = as_completed(futures)
        if progress:
            done = tqdm(done, total=len(futures), desc="llm", unit="report")
        for future in done:
            name = futures[future]
            findings, impression = reports[name]
            stats.asked += 1
            try:
                organs, requests = future.result()
            except (ValueError, HTTPFailure) as e:
                stats.retried += isinstance(e, ValueError)
                stats.fallback.append((name, str(e)))
                out[name] = split_report(findings, impression)
                continue
            stats.retried += requests > 1
            stats.answered += 1
            log.write(json.dumps({"VolumeName": name, "model": config.model, "hash": text_hash(findings),
                                  "organs": organs}) + "\n")
            log.flush()
            out[name] = entry_from_pieces(zip(todo[name], organs), impression)
    return out, stats
