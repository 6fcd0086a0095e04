"""Calls keylease's proxy on Gemini's OpenAI-compatible path with the real openai SDK.

    python3 openai_through_proxy.py BASE_URL TOKEN MODEL
"""

import sys

from openai import OpenAI


def main() -> None:
    base_url, token, model = sys.argv[1:4]
    client = OpenAI(api_key=token, base_url=base_url, max_retries=0)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}]
    )
    print("chat:", chat.choices[0].message.content)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Stream it"}], stream=True
    )
    print("streamed:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
    embeddings = client.embeddings.create(model=model, input=["one", "two"])
    print("embeddings:", len(embeddings.data))


if __name__ == "__main__":
    main()
