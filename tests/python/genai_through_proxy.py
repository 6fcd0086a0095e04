"""Calls keylease's Gemini-compatible proxy with the real google-genai SDK, as a user would:
only the base URL and the API key (a keylease worker token) differ from calling Gemini.

    python3 genai_through_proxy.py PROXY_URL TOKEN MODEL WORKERS ROUNDS

Runs WORKERS threads at once, each ROUNDS times: generate, stream, count tokens, embed.
Prints one JSON line: {"ok": N, "failed": [...], "tokens_counted": N}; exits 1 if any failed.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from google import genai
from google.genai import types


def main() -> int:
    url, token, model, workers, rounds = sys.argv[1:6]
    client = genai.Client(api_key=token, http_options=types.HttpOptions(base_url=url))

    def one_round(worker: int, round_: int) -> list[str]:
        prompt = f"worker {worker} round {round_}"
        failures = []
        answer = client.models.generate_content(model=model, contents=prompt)
        if not (answer.text or "").startswith("echo: "):
            failures.append(f"generate: {answer.text!r}")
        streamed = "".join(
            chunk.text or ""
            for chunk in client.models.generate_content_stream(model=model, contents=prompt)
        )
        if not streamed.startswith("echo: "):
            failures.append(f"stream: {streamed!r}")
        counted = client.models.count_tokens(model=model, contents=prompt)
        if not counted.total_tokens:
            failures.append(f"count_tokens: {counted}")
        embedded = client.models.embed_content(model=model, contents=prompt)
        if len(embedded.embeddings or []) != 1:
            failures.append(f"embed: {embedded}")
        return failures

    ok, failed = 0, []

    def count(run) -> None:
        nonlocal ok
        try:
            failures = run()
        except Exception as error:  # every failure is reported, none hides another
            failures = [f"{type(error).__name__}: {error}"]
        if failures:
            failed.extend(failures)
        else:
            ok += 1

    # The SDK builds its pydantic schemas on first use, and two threads doing that at once can
    # fail inside pydantic: the first round runs alone.
    count(lambda: one_round(0, 0))
    with ThreadPoolExecutor(max_workers=int(workers)) as pool:
        jobs = [
            pool.submit(one_round, worker, round_)
            for worker in range(int(workers))
            for round_ in range(int(rounds))
            if (worker, round_) != (0, 0)
        ]
        for job in jobs:
            count(job.result)
    print(json.dumps({"ok": ok, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
