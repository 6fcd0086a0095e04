"""Load through keylease's Gemini-compatible proxy with the real google-genai SDK, for the
benchmark's "sdk" scenario: THREADS threads call generate_content back to back for SECONDS.

    python3 genai_load.py PROXY_URL TOKEN MODEL THREADS SECONDS

Prints one JSON line: {"ok": N, "failed": N, "first_failures": [...]}.
"""

import json
import sys
import threading
import time

from google import genai
from google.genai import types


def main() -> int:
    url, token, model, threads, seconds = sys.argv[1:6]
    client = genai.Client(api_key=token, http_options=types.HttpOptions(base_url=url))
    # The SDK builds its pydantic schemas on first use, and two threads doing that at once can
    # fail inside pydantic: one call first, alone (counted like the others).
    stop = time.monotonic() + float(seconds)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    first_failures: list[str] = []

    def call(n: int) -> None:
        try:
            answer = client.models.generate_content(model=model, contents=f"prompt {n}")
            good = (answer.text or "").startswith("echo: ")
            failure = None if good else f"unexpected answer: {answer.text!r}"
        except Exception as error:  # every failure is counted, none hides another
            failure = f"{type(error).__name__}: {error}"
        with lock:
            if failure is None:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                if len(first_failures) < 5:
                    first_failures.append(failure)

    def loop(worker: int) -> None:
        n = 0
        while time.monotonic() < stop:
            call(worker * 1_000_000 + n)
            n += 1

    call(0)
    workers = [threading.Thread(target=loop, args=(w,)) for w in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps({**counts, "first_failures": first_failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
