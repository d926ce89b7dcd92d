#!/usr/bin/env python3
"""Load generator for OpenAI-compatible chat servers (t2, llama.cpp's llama-server, ...).

Sends streaming chat completions at a fixed number of requests in flight, for each level of --concurrency in
turn, and reports per level: output tokens/s, time to first token, inter-token latency, requests/s, errors.
Standard library only, raw HTTP/1.1 over asyncio, so that every server is driven and timed identically.

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost): this tool is for benchmarking a server
on this machine, and its request count is bounded by --requests per level.

Examples:
  python3 scripts/loadgen.py --url http://127.0.0.1:8080 --concurrency 1,4,16 --max-tokens 64
  # four different mixes in flight at once against t2 (assigned round-robin to requests):
  python3 scripts/loadgen.py --url http://127.0.0.1:8080 --concurrency 4,16 \\
      --mixes 'math=0.7,code=0.3;math=1;code=1;math=0.5,code=0.5' --json bench-out/mixes.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

DEFAULT_PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


# ---------------------------------------------------------------------------------------------------------
# Target and request construction


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path_prefix: str  # whatever path the URL had before /v1

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Parses --url and refuses anything that is not this machine."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise SystemExit(f"error: only plain http:// targets are supported, got {url!r}")
    host = parts.hostname or ""
    if not is_loopback(host):
        raise SystemExit(f"error: refusing to send load to {host!r}: only loopback targets "
                         f"(127.0.0.0/8, ::1, localhost) are allowed")
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[: -len("/v1")]
    return Target(host, parts.port or 80, prefix)


def is_loopback(host: str) -> bool:
    # No DNS lookup: a name other than localhost could resolve anywhere.
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_mixes(spec: str | None) -> list[dict]:
    """--mixes: items separated by ';', each one of
         name=weight,name=weight  -> body field adaptation = {"mix": {...}}
         {...}                    -> body field adaptation = that JSON object
         anything else            -> a model name for that request (e.g. SmolLM2-135M-Instruct:math)
    Returns a list of body overrides, assigned round-robin to requests."""
    if not spec:
        return [{}]
    overrides = []
    for item in (s.strip() for s in spec.split(";")):
        if not item:
            continue
        if item.startswith("{"):
            overrides.append({"adaptation": json.loads(item)})
        elif "=" in item:
            mix = {}
            for part in item.split(","):
                name, _, weight = part.partition("=")
                mix[name.strip()] = float(weight)
            overrides.append({"adaptation": {"mix": mix}})
        else:
            overrides.append({"model": item})
    return overrides or [{}]


def describe_override(override: dict) -> str:
    if "adaptation" in override:
        return json.dumps(override["adaptation"], separators=(",", ":"))
    if "model" in override:
        return f"model={override['model']}"
    return "default"


def build_body(args, index: int, overrides: list[dict], max_tokens: int) -> dict:
    # A distinct prompt per request, so that a server's prompt cache cannot make later requests cheaper
    # (except for a shared --system message, when that is what is measured).
    messages = [{"role": "user", "content": f"(request {index}) {args.prompt}"}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.model:
        body["model"] = args.model
    if args.ignore_eos:
        body["ignore_eos"] = True
    body.update(overrides[index % len(overrides)])
    return body


# ---------------------------------------------------------------------------------------------------------
# HTTP/1.1 + server-sent events


class HttpError(Exception):
    pass


async def read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise HttpError("connection closed before a response")
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line {status_line!r}")
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yields the response body as it arrives, undoing chunked transfer encoding."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HttpError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise HttpError("connection closed before content-length bytes")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def sse_data(pieces):
    """Yields the data payload of each server-sent event."""
    buffer = b""
    data_lines: list[str] = []
    async for piece in pieces:
        buffer += piece
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line = buffer[:newline].rstrip(b"\r").decode("utf-8")
            buffer = buffer[newline + 1:]
            if line == "":
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
            elif line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" "))
            # other fields (event:, id:, comments) carry nothing we measure
    if data_lines:
        yield "\n".join(data_lines)


# ---------------------------------------------------------------------------------------------------------
# One request


@dataclass
class RequestResult:
    index: int
    adaptation: str
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    finish_reason: str | None = None
    itl_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def tokens(self) -> int:
        # usage counts tokens exactly; content chunks can merge or skip tokens (partial UTF-8, special tokens).
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.content_chunks


def content_of(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or choice.get("text") or ""
    return text


async def run_request(target: Target, api_key: str | None, body: dict, index: int, label: str,
                      timeout: float) -> RequestResult:
    result = RequestResult(index=index, adaptation=label)
    payload = json.dumps(body).encode()
    head = (f"POST {target.path_prefix}/v1/chat/completions HTTP/1.1\r\n"
            f"Host: {target.netloc}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    request = (head + "\r\n").encode() + payload

    async def exchange():
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            result.started_at = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, headers = await read_headers(reader)
            result.status = status
            if status != 200:
                body_bytes = b"".join([p async for p in body_pieces(reader, headers)])
                raise HttpError(f"HTTP {status}: {body_bytes[:200].decode('utf-8', 'replace')}")
            last_token_at = None
            done = False
            async for data in sse_data(body_pieces(reader, headers)):
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise HttpError(f"error event: {data[:200]}")
                if chunk.get("usage"):
                    result.usage_completion_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if content_of(chunk):
                    result.content_chunks += 1
                    if last_token_at is None:
                        result.ttft_s = now - result.started_at
                    else:
                        result.itl_s.append(now - last_token_at)
                    last_token_at = now
            if not done:
                raise HttpError("stream ended without [DONE]")
            result.finished_at = time.perf_counter()
            result.e2e_s = result.finished_at - result.started_at
            result.ok = True
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    try:
        await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        result.error = f"timeout after {timeout:.0f} s"
    except (OSError, HttpError, ValueError, asyncio.IncompleteReadError) as err:
        result.error = f"{type(err).__name__}: {err}"
    if not result.finished_at:
        result.finished_at = time.perf_counter()
    return result


# ---------------------------------------------------------------------------------------------------------
# Levels and statistics


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def run_level(args, target: Target, overrides: list[dict], concurrency: int, requests: int,
                    first_index: int) -> dict:
    next_index = iter(range(first_index, first_index + requests))
    results: list[RequestResult] = []

    async def worker():
        for index in next_index:  # shared iterator: each request is taken by exactly one worker
            override = overrides[index % len(overrides)]
            body = build_body(args, index, overrides, args.max_tokens)
            results.append(await run_request(target, args.api_key, body, index, describe_override(override),
                                              args.timeout))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return summarize(concurrency, results, wall)


def summarize(concurrency: int, results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    tokens = sum(r.tokens for r in ok)
    per_stream = [(r.tokens - 1) / (r.e2e_s - r.ttft_s) for r in ok
                  if r.ttft_s is not None and r.tokens > 1 and r.e2e_s > r.ttft_s]
    mismatched = [r.index for r in ok if r.usage_completion_tokens is not None
                  and r.usage_completion_tokens != r.content_chunks]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / wall if wall > 0 else None,
        "usage_reported": sum(1 for r in ok if r.usage_completion_tokens is not None),
        "usage_vs_chunks_mismatch": len(mismatched),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "itl_p50_s": percentile(itls, 0.5),
        "itl_p95_s": percentile(itls, 0.95),
        "itl_p99_s": percentile(itls, 0.99),
        "stream_tok_per_s_mean": statistics.fmean(per_stream) if per_stream else None,
        "e2e_p50_s": percentile([r.e2e_s for r in ok], 0.5),
        "finish_reasons": {reason: sum(1 for r in ok if r.finish_reason == reason)
                           for reason in sorted({str(r.finish_reason) for r in ok})},
        "per_request": [asdict(r) for r in sorted(results, key=lambda r: r.index)],
    }


def fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown_table(levels: list[dict]) -> str:
    lines = ["| concurrency | requests | errors | wall s | req/s | output tok/s | TTFT p50 ms | TTFT p95 ms "
             "| ITL p50 ms | ITL p95 ms | tok/s per stream |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {fmt(lv['wall_s'])} "
            f"| {fmt(lv['requests_per_s'], digits=2)} | {fmt(lv['output_tok_per_s'])} "
            f"| {fmt(lv['ttft_p50_s'], 1000, 0)} | {fmt(lv['ttft_p95_s'], 1000, 0)} "
            f"| {fmt(lv['itl_p50_s'], 1000, 1)} | {fmt(lv['itl_p95_s'], 1000, 1)} "
            f"| {fmt(lv['stream_tok_per_s_mean'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (loopback only)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels of requests in flight")
    parser.add_argument("--requests", type=int, help="requests per level (default max(2*concurrency, 8))")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="model field of every request (a --mixes model name overrides it); '' omits it")
    parser.add_argument("--mixes", help="';'-separated adaptations or model names, assigned round-robin: "
                                        "'math=0.7,code=0.3' (adaptation mix), '{...}' (adaptation JSON), "
                                        "or a model name such as 'SmolLM2-135M-Instruct:math'")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (prefixed per request)")
    parser.add_argument("--system", help="a system message shared by every request (prefix caching)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos: true (outputs may then end early)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the levels (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--json", dest="json_out", help="also write the results (with per-request data) here")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or any(c < 1 or c > 1024 for c in args.levels):
        parser.error("--concurrency levels must be between 1 and 1024")
    if args.requests is not None and not 1 <= args.requests <= 10_000:
        parser.error("--requests must be between 1 and 10000")
    if not 1 <= args.max_tokens <= 100_000:
        parser.error("--max-tokens must be between 1 and 100000")
    return args


async def main_async(args) -> int:
    target = parse_target(args.url)
    overrides = parse_mixes(args.mixes)
    print(f"target http://{target.netloc}{target.path_prefix}  model={args.model or '-'}  "
          f"max_tokens={args.max_tokens}  ignore_eos={args.ignore_eos}", file=sys.stderr)
    print("request kinds (round-robin): " + "; ".join(describe_override(o) for o in overrides), file=sys.stderr)

    for i in range(args.warmup):
        body = build_body(args, -1 - i, overrides, min(args.max_tokens, 16))
        warm = await run_request(target, args.api_key, body, -1 - i, "warmup", args.timeout)
        if not warm.ok:
            print(f"error: warmup request failed: {warm.error}", file=sys.stderr)
            return 1

    levels = []
    first_index = 0
    for concurrency in args.levels:
        requests = args.requests or max(2 * concurrency, 8)
        print(f"level concurrency={concurrency}: {requests} requests ...", file=sys.stderr)
        level = await run_level(args, target, overrides, concurrency, requests, first_index)
        first_index += requests
        levels.append(level)
        for sample in level["error_samples"]:
            print(f"  error: {sample}", file=sys.stderr)
        if level["usage_reported"] < level["requests"] - level["errors"]:
            print("  note: some streams had no usage chunk; their tokens were counted as content chunks",
                  file=sys.stderr)

    print(markdown_table(levels))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"target": f"http://{target.netloc}{target.path_prefix}",
                       "model": args.model, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                       "prompt": args.prompt, "kinds": [describe_override(o) for o in overrides],
                       "levels": levels}, out, indent=1)
    return 1 if any(level["errors"] for level in levels) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
