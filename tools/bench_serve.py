"""Serving under concurrency: N streaming clients against `graphopt serve`, and a load run.

    python tools/bench_serve.py MODEL_DIR [--clients 1 8] [--rounds 3] [--requests 3] [--max-batch 8]
        [--context 1024] [--check-generate] [--load-seconds 300 --load-clients 12]
        [--png docs/bench_serve.png] [--json tools/results/bench_serve.json]

Starts ``graphopt serve MODEL_DIR`` on a free local port (or uses ``--url``), then:

* **Concurrency rounds**: for each count in ``--clients``, that many clients each stream
  ``--requests`` chat completions one after another, greedy, from a mix of short and long
  prompts and output lengths (each client starts at a different place in the mix). Each user
  message starts with its own tag (``[client.request]``), so that no two requests share more
  than the chat template's opening: the server's prefix reuse gets that for every request alike,
  never a whole repeated prompt. Rounds are
  interleaved (1, 8, 1, 8, ...) so that load from other processes hits every count alike; the
  table shows the median over rounds, and the speed-up is the median of each round's ratio to
  the fewest clients' round just before it. Aggregate tokens/s = completion tokens of all clients / the
  round's wall time (prefills included); aggregate decode tokens/s = the sum over clients of each
  client's decode speed (tokens after the first / time from first to last chunk, so the stalls
  that other clients' prefills cause are in it); decode-step tokens/s = the server engine's tokens
  from decode steps over its seconds in decode steps (from /metrics: batching's gain per step,
  without the prefills); tokens per server CPU second (completion tokens over the CPU time the
  server process used in the round, with ``--url`` not measured): the least load-sensitive of the
  rates on a shared machine; time to first token (TTFT) and inter-token latency (ITL:
  the gaps between streamed chunks) are per request, p50 / p99 over the round. With
  ``--check-generate`` every response's text is compared with what ``graphopt generate --chat``
  answers for the same prompt and length (its Generator, run in this process once per prompt).
* **Load run** (``--load-seconds``): ``--load-clients`` clients send requests back to back for
  that long: most stream to the end, some disconnect after a few chunks, some send a prompt longer
  than the context (the server must answer 400), some do not stream. A request is *lost* when it
  fails any other way and *hung* when it takes longer than ``--request-timeout``. After the run the
  server must hold no slot and no queue. The server's resident memory is sampled every 2 s.

Prints a table, writes ``--json`` and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGE = ("The river starts high in the mountains, where snow melts each spring and feeds a hundred small "
           "streams. They join in the valley, pass three villages and a mill that has stood there for two "
           "centuries, then slow down across the plain, where farmers draw water for their fields. Near the "
           "coast the river splits into many channels that shift with every flood, and birds gather there "
           "in their thousands each autumn before flying south.")
# (prompt, max_tokens): short and long prompts, short and long answers.
WORKLOAD = [
    ("What is the capital of France?", 48),
    (f"Summarize this text in two sentences: {PASSAGE}", 96),
    ("Write a short poem about the sea.", 128),
    ("List three fruits that are red.", 32),
    (f"Here is a text: {PASSAGE} What do birds do near the coast?", 64),
    ("Explain what gravity is to a ten year old.", 128),
    ("Give me a name for a black cat.", 24),
    ("What are the benefits of drinking water?", 96),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_server(model_dir: str, max_batch: int, max_queue: int, context: int, extra: list[str]):
    port = free_port()
    log = open(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "graphopt", "serve", model_dir, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--context", str(context),
                                "--model-name", "bench", *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up")
            time.sleep(0.5)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its children (MB), from /proc."""
    try:
        pids = [pid] + [int(child) for child in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return None
    total = 0
    for each in pids:
        with contextlib.suppress(OSError):
            for line in pathlib.Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds that ``pid`` has used so far (its threads included), from /proc."""
    if pid is None:
        return None
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


def stream_chat(client, prompt: str, max_tokens: int, stop_after: int | None = None) -> dict:
    """One streamed greedy chat completion: text, completion tokens, TTFT, chunk gaps."""
    started = time.perf_counter()
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, arrivals, tokens, finish = [], [], 0, None
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            arrivals.append(time.perf_counter())
            text.append(choice.delta.content)
            if stop_after is not None and len(arrivals) >= stop_after:
                stream.close()
                return {"disconnected": True, "chunks": len(arrivals)}
        finish = choice.finish_reason or finish
    ended = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "seconds": ended - started,
            "ttft": arrivals[0] - started if arrivals else float("nan"),
            "gaps": [later - earlier for earlier, later in zip(arrivals, arrivals[1:])],
            # Decoding proper: the tokens after the first, over the time from the first chunk to the last.
            "decode_tokens": max(tokens - 1, 0), "decode_s": arrivals[-1] - arrivals[0] if arrivals else 0.0}


def engine_counters(url: str) -> dict[str, float]:
    """The server's engine counters (prefill and decode-step seconds and tokens) from /metrics."""
    import httpx

    counters = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        wanted = line.startswith(("graphopt_prefill_", "graphopt_decode_step_", "graphopt_prefix_"))
        if wanted and "_created" not in line:
            name, value = line.split()
            counters[name] = float(value)
    return counters


def concurrency_round(url: str, clients: int, requests: int, pid: int | None = None) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    results: list[list[dict]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def run(index: int) -> None:
        barrier.wait()
        for number in range(requests):
            prompt, max_tokens = WORKLOAD[(index + number) % len(WORKLOAD)]
            prompt = f"[{index}.{number}] {prompt}"
            try:
                result = stream_chat(client, prompt, max_tokens)
            except Exception as error:  # counted as lost
                errors.append(f"{type(error).__name__}: {error}")
                continue
            result.update(prompt=prompt, max_tokens=max_tokens)
            results[index].append(result)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    engine_before = engine_counters(url)
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu_after = cpu_seconds(pid)
    engine_after = engine_counters(url)
    engine = {name: engine_after[name] - engine_before.get(name, 0.0) for name in engine_after}
    flat = [result for per_client in results for result in per_client]
    tokens = sum(result["tokens"] for result in flat)
    gaps = [gap for result in flat for gap in result["gaps"]]
    ttfts = [result["ttft"] for result in flat]
    # Each client's decode speed (its decode tokens over its decode time), summed over the clients.
    decode_rates = [sum(r["decode_tokens"] for r in per_client) / sum(r["decode_s"] for r in per_client)
                    for per_client in results if per_client and sum(r["decode_s"] for r in per_client) > 0]
    step_seconds = engine.get("graphopt_decode_step_seconds_total", 0.0)
    return {"clients": clients, "requests": len(flat), "decode_tokens_per_s": sum(decode_rates),
            "step_tokens_per_s": engine.get("graphopt_decode_step_tokens_total", 0.0) / step_seconds
            if step_seconds else float("nan"),
            "prefill_share": engine.get("graphopt_prefill_seconds_total", 0.0) / wall,
            "prompt_tokens_computed": engine.get("graphopt_prefill_tokens_total", 0.0),
            "prompt_tokens_reused": engine.get("graphopt_prefix_reused_tokens_total", 0.0),
            "lost": clients * requests - len(flat), "errors": errors[:5],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            # Completion tokens per CPU second of the server: what the other jobs' load moves least
            # (they take wall time from the server, much less its CPU time per token).
            "tokens_per_cpu_s": tokens / (cpu_after - cpu_before) if cpu_before is not None and cpu_after > cpu_before
            else float("nan"),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99), "ttfts": ttfts, "gaps": gaps,
            "texts": [(result["prompt"], result["max_tokens"], result["text"]) for result in flat]}


def summarize(by_clients: dict[int, list[dict]]) -> dict[int, dict]:
    """Per client count: median tokens/s over rounds, the median of the per-round ratios to the fewest
    clients' round run just before (interleaved, so both saw the same load), latencies pooled."""
    fewest = min(by_clients)
    summary = {}
    for count, results in by_clients.items():
        ratios = [result["tokens_per_s"] / base["tokens_per_s"] for result, base in zip(results, by_clients[fewest])]
        decode_ratios = [result["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                         for result, base in zip(results, by_clients[fewest])]
        step_ratios = [result["step_tokens_per_s"] / base["step_tokens_per_s"]
                       for result, base in zip(results, by_clients[fewest])]
        cpu_ratios = [result["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                      for result, base in zip(results, by_clients[fewest])]
        ttfts = [value for result in results for value in result["ttfts"]]
        gaps = [value for result in results for value in result["gaps"]]
        summary[count] = {"clients": count, "rounds": len(results), "requests": sum(r["requests"] for r in results),
                          "lost": sum(r["lost"] for r in results), "tokens": sum(r["tokens"] for r in results),
                          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                          "per_round": [round(r["tokens_per_s"], 1) for r in results],
                          "speedup": statistics.median(ratios), "speedups": [round(ratio, 2) for ratio in ratios],
                          "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in results),
                          "decode_speedup": statistics.median(decode_ratios),
                          "decode_speedups": [round(ratio, 2) for ratio in decode_ratios],
                          "step_tokens_per_s": statistics.median(r["step_tokens_per_s"] for r in results),
                          "step_speedup": statistics.median(step_ratios),
                          "step_speedups": [round(ratio, 2) for ratio in step_ratios],
                          "prefill_share": statistics.median(r["prefill_share"] for r in results),
                          "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in results),
                          "cpu_speedup": statistics.median(cpu_ratios),
                          "cpu_speedups": [round(ratio, 2) for ratio in cpu_ratios],
                          "prompt_tokens_computed": sum(r["prompt_tokens_computed"] for r in results),
                          "prompt_tokens_reused": sum(r["prompt_tokens_reused"] for r in results),
                          "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                          "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}
    return summary


def generate_reference(generator, prompt: str, max_tokens: int) -> str:
    """What `graphopt generate --chat --max-new-tokens N` answers (greedy) for ``prompt``: its Generator."""
    result = generator.generate(generator.encode_prompt(prompt, chat=True), max_new_tokens=max_tokens)
    return result.text


def load_run(url: str, pid: int | None, seconds: float, clients: int, context: int, request_timeout: float,
             seed: int = 0) -> dict:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=request_timeout)
    counts = {kind: 0 for kind in ("completed", "disconnected", "rejected_too_long", "non_streaming", "lost", "hung",
                                   "queue_full")}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    overlong = "word " * (context + 50)
    token_times: list[tuple[float, int]] = []
    samples: list[tuple[float, float]] = []
    sampling_done = threading.Event()
    started = time.monotonic()

    def sample_memory() -> None:
        while not sampling_done.wait(2.0):
            if pid is not None:
                value = rss_mb(pid)
                if value is not None:
                    samples.append((time.monotonic() - started, value))

    def count(kind: str, message: str | None = None) -> None:
        with lock:
            counts[kind] += 1
            if message and kind in ("lost", "hung") and len(errors) < 20:
                errors.append(message)

    def run(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline:
            prompt, max_tokens = WORKLOAD[rng.randrange(len(WORKLOAD))]
            draw = rng.random()
            began = time.monotonic()
            try:
                if draw < 0.15:
                    try:
                        client.chat.completions.create(model="bench", max_tokens=16, temperature=0,
                                                       messages=[{"role": "user", "content": overlong}])
                        count("lost", "an over-long prompt was accepted")
                    except openai.BadRequestError as error:
                        count("rejected_too_long" if error.code == "context_length_exceeded" else "lost", str(error))
                elif draw < 0.35:
                    result = stream_chat(client, prompt, max_tokens, stop_after=rng.randint(1, 8))
                    count("disconnected" if result.get("disconnected") else "completed")
                elif draw < 0.45:
                    response = client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0.7,
                                                              seed=rng.randrange(1 << 30),
                                                              messages=[{"role": "user", "content": prompt}])
                    with lock:
                        token_times.append((time.monotonic() - started, response.usage.completion_tokens))
                    count("non_streaming")
                else:
                    result = stream_chat(client, prompt, max_tokens)
                    with lock:
                        token_times.append((time.monotonic() - started, result["tokens"]))
                    count("completed" if result["finish"] in ("stop", "length") else "lost",
                          f"finish_reason {result['finish']}")
            except openai.APITimeoutError:
                count("hung", f"no answer after {time.monotonic() - began:.0f} s")
            except openai.APIStatusError as error:
                count("queue_full" if error.status_code == 503 else "lost", f"{error.status_code}: {error}")
            except Exception as error:
                count("lost", f"{type(error).__name__}: {error}")

    memory = threading.Thread(target=sample_memory, daemon=True)
    memory.start()
    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sampling_done.set()
    wall = time.monotonic() - started
    time.sleep(1.0)  # the last disconnects reach the engine within a step
    health = httpx.get(f"{url}/health", timeout=10).json()
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    cancelled = next((float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith('graphopt_requests_total{outcome="cancelled"}')), 0.0)
    memory_values = [value for _, value in samples]
    settled = [value for moment, value in samples if moment >= min(60.0, wall / 4)]
    return {"seconds": wall, "clients": clients, "counts": counts, "errors": errors,
            "requests": sum(counts.values()), "tokens": sum(tokens for _, tokens in token_times),
            "server_cancelled": cancelled, "left_batch_size": health["batch_size"],
            "left_queue_depth": health["queue_depth"], "memory_samples": samples, "token_times": token_times,
            "rss_mb_first": memory_values[0] if memory_values else None,
            "rss_mb_settled_first": settled[0] if settled else None,
            "rss_mb_last": memory_values[-1] if memory_values else None,
            "rss_mb_max": max(memory_values) if memory_values else None}


def plot(rounds: dict[int, dict], load: dict | None, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if load else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    counts = sorted(rounds)
    labels = [str(count) for count in counts]
    axes[0].bar(labels, [rounds[count]["tokens_per_s"] for count in counts], color="tab:blue")
    axes[0].set_xlabel("concurrent streaming clients")
    axes[0].set_ylabel("aggregate tokens/s")
    axes[0].set_title("throughput")
    width = 0.2
    positions = range(len(counts))
    for offset, (key, name) in enumerate((("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"),
                                          ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99"))):
        axes[1].bar([position + (offset - 1.5) * width for position in positions],
                    [rounds[count][key] * 1e3 for count in counts], width, label=name)
    axes[1].set_xticks(list(positions), labels)
    axes[1].set_xlabel("concurrent streaming clients")
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_title("latency")
    axes[1].legend(fontsize=8)
    if load:
        if load["memory_samples"]:
            moments, values = zip(*load["memory_samples"])
            axes[2].plot(moments, values, color="tab:red", linewidth=2, label="server RSS (MB)")
            axes[2].set_ylim(0, max(values) * 1.25)
            axes[2].annotate(f"{values[0]:.0f} MB -> {values[-1]:.0f} MB", (moments[-1], values[-1]),
                             xytext=(0.35, 0.9), textcoords="axes fraction", fontsize=9)
        axes[2].set_xlabel("seconds")
        axes[2].set_ylabel("resident memory, MB")
        counts = load["counts"]
        axes[2].set_title(f"load run: {load['clients']} clients, {load['requests']} requests, "
                          f"{counts['lost']} lost, {counts['hung']} hung", fontsize=10)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--url", default=None, help="A running server instead of starting one.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per round.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--server-option", action="append", default=[], help="More `graphopt serve` options.")
    parser.add_argument("--check-generate", action="store_true",
                        help="Compare every greedy answer with `graphopt generate --chat --json`.")
    parser.add_argument("--load-seconds", type=float, default=0)
    parser.add_argument("--load-clients", type=int, default=12)
    parser.add_argument("--request-timeout", type=float, default=180)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--replot", action="store_true", help="Only redraw --png from the --json record.")
    args = parser.parse_args()
    if args.replot:
        record = json.loads(args.json.read_text())
        machine = record["machine"]
        before, after = record["load_average_before"][0], record["load_average_after"][0]
        plot({int(count): value for count, value in record["summary"].items()}, record["load"], args.png,
             f"graphopt serve, {pathlib.Path(record['model_dir']).name}, max batch {record['max_batch']}"
             f" - {machine}, load avg {before:.1f}->{after:.1f}")
        return

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url.rstrip("/"), None
        else:
            url, process = stack.enter_context(start_server(args.model_dir, args.max_batch, args.max_queue,
                                                            args.context, args.server_option))
            pid = process.pid
        concurrency_round(url, 1, 1)  # warm-up: first-run allocations
        by_clients: dict[int, list[dict]] = {count: [] for count in args.clients}
        for round_number in range(args.rounds):
            for count in args.clients:
                result = concurrency_round(url, count, args.requests, pid)
                by_clients[count].append(result)
                print(f"round {round_number + 1}, {count} clients: {result['tokens_per_s']:.1f} tokens/s "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        medians = summarize(by_clients)
        mismatches, checked = [], 0
        if args.check_generate:
            from graphopt.runtime import Generator

            generator = Generator(args.model_dir)
            references = {}
            for results in by_clients.values():
                for result in results:
                    for prompt, max_tokens, text in result["texts"]:
                        key = (prompt, max_tokens)
                        if key not in references:
                            references[key] = generate_reference(generator, prompt, max_tokens)
                        checked += 1
                        if text != references[key]:
                            mismatches.append({"prompt": prompt[:40], "max_tokens": max_tokens, "served": text[:80],
                                               "generate": references[key][:80]})
        load = None
        if args.load_seconds:
            load = load_run(url, pid, args.load_seconds, args.load_clients, args.context, args.request_timeout)
    load_after = os.getloadavg()

    print(f"\nmachine: {machine}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for count, result in sorted(medians.items()):
        print(f"{count} clients: tokens/s per round {result['per_round']}, ratio per round {result['speedups']}, "
              f"decode ratio per round {result['decode_speedups']}, decode-step ratio per round "
              f"{result['step_speedups']}, engine time in prefills {result['prefill_share']:.0%}, prompt tokens "
              f"computed {result['prompt_tokens_computed']:.0f} / reused {result['prompt_tokens_reused']:.0f}; "
              f"tokens per server CPU second {result['tokens_per_cpu_s']:.1f}, ratio per round {result['cpu_speedups']}")
    print("| clients | requests | lost | completion tokens | aggregate tok/s | vs fewest | aggregate decode tok/s "
          "| vs fewest | decode-step tok/s | vs fewest | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, result in sorted(medians.items()):
        print(f"| {count} | {result['requests']} | {result['lost']} | {result['tokens']} | {result['tokens_per_s']:.1f} "
              f"| {result['speedup']:.2f}x | {result['decode_tokens_per_s']:.1f} | {result['decode_speedup']:.2f}x "
              f"| {result['step_tokens_per_s']:.1f} | {result['step_speedup']:.2f}x | {result['ttft_p50'] * 1e3:.0f} | {result['ttft_p99'] * 1e3:.0f} "
              f"| {result['itl_p50'] * 1e3:.0f} | {result['itl_p99'] * 1e3:.0f} |")
    if args.check_generate:
        print(f"greedy answers identical to `graphopt generate`: {checked - len(mismatches)}/{checked}")
        for mismatch in mismatches[:5]:
            print(f"  differs: {mismatch}")
    if load:
        print(f"load run: {load['seconds']:.0f} s, {load['clients']} clients, {load['requests']} requests: "
              + ", ".join(f"{kind} {value}" for kind, value in load["counts"].items()))
        print(f"  server cancelled {load['server_cancelled']:.0f} sequences; left holding {load['left_batch_size']} "
              f"slots and {load['left_queue_depth']} queued")
        if load["rss_mb_first"] is not None:
            print(f"  server RSS MB: first {load['rss_mb_first']:.0f}, after warm-up {load['rss_mb_settled_first']:.0f}, "
                  f"last {load['rss_mb_last']:.0f}, max {load['rss_mb_max']:.0f}")
        for error in load["errors"][:5]:
            print(f"  error: {error}")
    if args.json:
        record = {"machine": machine, "load_average_before": load_before, "load_average_after": load_after,
                  "model_dir": args.model_dir, "max_batch": args.max_batch, "context": args.context,
                  "rounds": {str(count): [{key: value for key, value in result.items()
                                           if key not in ("texts", "ttfts", "gaps")}
                                          for result in results] for count, results in by_clients.items()},
                  "summary": {str(count): {key: value for key, value in result.items() if key != "per_round"}
                              for count, result in medians.items()},
                  "greedy_checked": checked, "greedy_mismatches": mismatches,
                  "load": None if load is None else {key: value for key, value in load.items() if key != "token_times"}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    if args.png:
        plot(medians, load, args.png, f"graphopt serve, {pathlib.Path(args.model_dir).name}, max batch {args.max_batch}"
             f" - {machine}, load avg {load_before[0]:.1f}->{load_after[0]:.1f}")


if __name__ == "__main__":
    main()
