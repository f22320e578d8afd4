"""`graphopt serve`: a real server process on a free port, driven with the official `openai` client.

Greedy answers must equal what graphopt's single-sequence Generator produces for the same prompt
(chat template included), streamed or not, alone or beside other requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="graphopt[serve] is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
import httpx  # noqa: E402  (installed with openai)

from graphopt.fusion import fuse  # noqa: E402
from graphopt.runtime import Generator  # noqa: E402

MODEL = "tiny"
PROMPTS = ["Hello there", "What is the capital of France?", "one two three", "Tell me a story about a cat",
           "x", "The quick brown fox"]


@pytest.fixture(scope="module")
def served_dir(tiny_llama_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("serve") / "fused"
    fuse(tiny_llama_dir, output, "cpu", require=True)
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(model_dir, *options: str, timeout: float = 90.0):
    """``graphopt serve`` in a child process; yields (base URL, process); stops it with SIGTERM."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "graphopt", "serve", str(model_dir), "--port", str(port),
                                "--model-name", MODEL, *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def server(served_dir):
    with server_process(served_dir, "--max-batch", "4", "--max-queue", "16", "--context", "256") as (base, _):
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def generator(served_dir):
    return Generator(served_dir)


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_models_health_and_metrics(server, client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("graphopt_queue_depth", "graphopt_batch_size", "graphopt_tokens_per_second",
                 "graphopt_time_to_first_token_seconds_bucket", "graphopt_generated_tokens_total"):
        assert name in metrics


def test_chat_and_text_completions_equal_the_generator(client, generator):
    prompt = PROMPTS[1]
    expected = generator.generate_text(prompt, chat=True, max_new_tokens=24)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == expected.text
    assert chat.choices[0].finish_reason == ("stop" if expected.stopped_on_eos else "length")
    assert chat.usage.prompt_tokens == len(expected.prompt_ids)
    assert chat.usage.completion_tokens == len(expected.token_ids)
    plain = generator.generate_text(prompt, max_new_tokens=12)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == plain.text


def test_concurrent_streams_equal_their_output_alone(server, client, generator):
    expected = [generator.generate_text(prompt, chat=True, max_new_tokens=120).text for prompt in PROMPTS]
    steps_before = _metric(server, "graphopt_step_batch_size_count")
    single_before = _metric(server, 'graphopt_step_batch_size_bucket{le="1.0"}')
    texts = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def stream(index):
        barrier.wait()
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[index]}],
                                                max_tokens=120, temperature=0, stream=True)
        texts[index] = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert texts == expected
    steps = _metric(server, "graphopt_step_batch_size_count") - steps_before
    single = _metric(server, 'graphopt_step_batch_size_bucket{le="1.0"}') - single_before
    assert steps > 0 and single < steps, "no step decoded more than one sequence"


def test_stream_with_usage_and_stop_string(client, generator):
    prompt = PROMPTS[2]
    free = generator.generate_text(prompt, max_new_tokens=30).text
    stop = free[10:13]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == free[:free.index(stop)]
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens < 30


def test_errors_have_the_openai_shape(server, client):
    bad_json = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "max_tokens": 3})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=7)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as no_room:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert no_room.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="another", prompt="hi", max_tokens=2)
    unknown = httpx.get(f"{server}/v1/engines")
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = _metric(server, 'graphopt_requests_total{outcome="cancelled"}')
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while _metric(server, 'graphopt_requests_total{outcome="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.1)
    assert httpx.get(f"{server}/health").json()["batch_size"] == 0


def test_a_full_queue_answers_503_with_retry_after(served_dir):
    with server_process(served_dir, "--max-batch", "1", "--max-queue", "0", "--context", "256") as (base, _):
        results = [None] * 8
        barrier = threading.Barrier(len(results))

        def post(index):
            barrier.wait()
            results[index] = httpx.post(f"{base}/v1/completions", timeout=60,
                                        json={"model": MODEL, "prompt": "Hi", "max_tokens": 240, "temperature": 0})

        threads = [threading.Thread(target=post, args=(index,)) for index in range(len(results))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        codes = [result.status_code for result in results]
        assert 200 in codes and 503 in codes, codes
        for result in results:
            if result.status_code == 503:
                assert result.headers["retry-after"] == "1"
                assert result.json()["error"]["code"] == "queue_full"


def test_sigterm_lets_the_open_stream_finish_then_exits(served_dir):
    with server_process(served_dir, "--context", "256") as (base, process):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            iterator = response.iter_lines()
            lines.append(next(iterator))
            process.send_signal(signal.SIGTERM)
            lines.extend(line for line in iterator if line)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines if line.startswith("data: {")]
        assert finish[-1] in ("stop", "length")
        # uvicorn re-raises the signal once it has shut down, as a process killed by it would exit.
        assert process.wait(60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "graphopt", "serve", str(tmp_path / "nothing")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_ray_serve_with_two_replicas_answers_through_one_endpoint(served_dir, generator):
    """`graphopt serve --ray --replicas 2` on a local Ray cluster: both replicas answer, correctly."""
    pytest.importorskip("ray.serve", reason="graphopt[ray] is not installed")
    with server_process(served_dir, "--ray", "--replicas", "2", "--context", "256", "--threads", "1",
                        timeout=240) as (base, process):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        expected = [generator.generate_text(prompt, chat=True, max_new_tokens=40).text for prompt in PROMPTS]
        texts = [None] * len(PROMPTS)

        def chat(index):
            response = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0,
                                                      messages=[{"role": "user", "content": PROMPTS[index]}])
            texts[index] = response.choices[0].message.content

        threads = [threading.Thread(target=chat, args=(index,)) for index in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert texts == expected
        streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == generator.generate_text(
            PROMPTS[0], max_new_tokens=12).text
        replicas = {httpx.get(f"{base}/health", timeout=30).json()["replica"] for _ in range(40)}
        assert len(replicas) == 2, replicas
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0


@pytest.mark.parametrize("ray", [False, True])
def test_an_unfused_model_is_a_one_line_error(tiny_llama_dir, ray):
    result = subprocess.run([sys.executable, "-m", "graphopt", "serve", str(tiny_llama_dir), "--port", str(free_port()),
                             *(["--ray"] if ray else [])], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert "GroupQueryAttention" in result.stderr and result.stderr.count("\n") == 1


def test_a_port_in_use_is_a_one_line_error(served_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = subprocess.run([sys.executable, "-m", "graphopt", "serve", str(served_dir), "--port",
                                 str(held.getsockname()[1])], capture_output=True, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot listen on") and result.stderr.count("\n") == 1
