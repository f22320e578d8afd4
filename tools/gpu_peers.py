"""The fastest paths a GPU user could pick instead of graphopt, timed the way tools/gpu_check.py times graphopt.

* transformers ``generate`` with ``cache_implementation="static"`` (transformers compiles the decode
  forward itself when torch.compile works there; without triton it runs uncompiled, and the row
  says so), float16 and bfloat16; plus eager ``generate`` at batch 8 and 32 for aggregate throughput.
* onnxruntime-genai (CUDA build) on its own builder's float16 and int4 CUDA models, with and
  without its CUDA graph option; batch 1, 8 and 32.

Every row: the same chat prompt, ``tokens`` greedy tokens (EOS held off with ``min_length`` /
no EOS id, as graphopt's ``stop_on_eos=False``), decode tokens/s over the tokens after the first
(the first comes from prefill), and how many leading tokens equal the CPU fp32 reference's.
Used by tools/gpu_check.py; not run on its own.
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import subprocess
import sys
import time

logger = logging.getLogger("gpu_check")

BATCHES = (1, 8, 32)


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens equal the reference's (greedy streams diverge for good at the first miss)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token arrives (the prompt is put first)."""

    def __init__(self, device: str = "cuda"):
        self.device = device
        self.puts = 0
        self.first_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            _synchronize(self.device)
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def transformers_rows(model, prompt_ids: list[int], reference: list[int], tokens: int, repeats: int,
                      device: str = "cuda", batches: tuple[int, ...] = BATCHES) -> list[dict]:
    """transformers static cache (+ its own torch.compile), fp16 and bf16, batch 1; eager batches 8 and 32.

    ``device="cpu"`` (with small ``batches``) only checks this function on a tiny model.
    """
    import torch

    try:
        import triton  # noqa: F401  (torch.compile's GPU backend)

        compiles = device == "cuda"
    except ImportError:
        compiles = False
    logger.info("transformers: torch %s, triton %s", torch.__version__, "present" if compiles else "missing")
    rows = []
    ids = torch.tensor([prompt_ids], device=device)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    config.max_new_tokens, config.do_sample = tokens, False
    for dtype in (torch.float16, torch.bfloat16):
        model.to(device, dtype)
        for compile_now in ((True, False) if compiles else (False,)):
            try:
                rows.append(_static_row(model, ids, config, dtype, compile_now, prompt_ids, reference, repeats, device))
                break
            except Exception as error:  # an inductor failure: say so, and measure the static cache uncompiled
                logger.info("  FAILED (%s): %s", "compiled" if compile_now else "uncompiled",
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
                rows.append({"variant": f"transformers static cache, {dtype}, compile={compile_now}", "peer": True,
                             "error": str(error)[:300]})
    model.to(device, torch.float16)
    for batch in batches[1:]:
        label = f"transformers generate eager fp16, batch {batch}"
        logger.info("timing %s", label)
        batch_ids = ids.repeat(batch, 1)
        with torch.no_grad():
            model.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), generation_config=config)
            _synchronize(device)
            started = time.perf_counter()
            output = model.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), generation_config=config)
            _synchronize(device)
            seconds = time.perf_counter() - started
        rows.append({"variant": label, "provider": f"torch {torch.__version__} cuda", "peer": True, "batch": batch,
                     "greedy_tokens_agreeing": agreeing_prefix(output[0, len(prompt_ids):].tolist(), reference),
                     "aggregate_tokens_per_s": batch * tokens / seconds, "includes_prefill": True})
    return rows


def _static_row(model, ids, config, dtype, compile_now: bool, prompt_ids, reference, repeats, device) -> dict:
    """One static-cache ``generate`` configuration: two warm-up calls (compile, CUDA graphs), then the best of ``repeats``."""
    import torch

    static = copy.deepcopy(config)
    static.cache_implementation = "static"
    static.disable_compile = not compile_now
    if compile_now:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    label = f"transformers generate, static cache{' + torch.compile' if compile_now else ' (not compiled)'}, " \
            f"{str(dtype).removeprefix('torch.')}"
    logger.info("timing %s (the first calls compile)", label)
    rates, out = [], []
    started = time.perf_counter()
    with torch.no_grad():
        for index in range(repeats + 2):  # two warm-up calls: compilation and CUDA graph recording
            clock = _FirstTokenClock(device)
            output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=static, streamer=clock)
            _synchronize(device)
            done = time.perf_counter()
            out = output[0, len(prompt_ids):].tolist()
            if index >= 2:
                rates.append((len(out) - 1) / (done - clock.first_at))
            else:
                logger.info("  warm-up call %d: %.1f s", index + 1, done - started)
            started = time.perf_counter()
    # Whether dynamo really compiled something (transformers compiles the decode step on its own).
    graphs = int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)) if compile_now else 0
    return {"variant": label, "provider": f"torch {torch.__version__} {device}", "peer": True,
            "compiled_graphs": graphs, "greedy_tokens_agreeing": agreeing_prefix(out, reference),
            "decode_tokens_per_s": max(rates)}


def build_genai_models(hf_dir: pathlib.Path, work: pathlib.Path) -> subprocess.Popen:
    """Start onnxruntime-genai's builder for the fp16 and int4 CUDA models (in the background: it is CPU work)."""
    script = " && ".join(
        f"{sys.executable} -m onnxruntime_genai.models.builder -i {hf_dir} -o {work / f'genai-{precision}'} "
        f"-p {precision} -e cuda -c {work / 'genai-cache'}" for precision in ("fp16", "int4"))
    log = open(work / "genai-build.log", "w")  # noqa: SIM115  (the child writes it while we go on)
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT)


def _with_cuda_graph(source: pathlib.Path, enable: bool) -> pathlib.Path:
    """The builder's model directory with genai_config.json's CUDA graph option set (a sibling copy)."""
    target = source.with_name(f"{source.name}-graph{int(enable)}")
    if not target.exists():
        target.mkdir()
        for file in source.iterdir():
            (target / file.name).symlink_to(file.resolve())
        (target / "genai_config.json").unlink()
    config = json.loads((source / "genai_config.json").read_text())
    for options in config["model"]["decoder"]["session_options"].get("provider_options", []):
        if "cuda" in options:
            options["cuda"]["enable_cuda_graph"] = "1" if enable else "0"
    (target / "genai_config.json").write_text(json.dumps(config, indent=2))
    return target


def _genai_run(model, prompt_ids: list[int], tokens: int, batch: int) -> tuple[float, float, list[int]]:
    """One greedy generation; returns (seconds after the first token, total seconds, tokens of row 0)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompt_ids) + tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.array([prompt_ids] * batch, dtype=np.int32))
    generator.generate_next_token()
    generator.get_next_tokens()  # waits for the step
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        generator.get_next_tokens()
    done = time.perf_counter()
    out = [int(token) for token in generator.get_sequence(0)[len(prompt_ids):]]
    del generator
    return done - first, done - started, out


def genai_rows(work: pathlib.Path, prompt_ids: list[int], reference: list[int], tokens: int, repeats: int) -> list[dict]:
    """onnxruntime-genai on its builder's fp16 / int4 CUDA models, CUDA graph off and on; batches for the best."""
    import onnxruntime_genai as og

    version = getattr(og, "__version__", "?")
    rows = []
    best: tuple[float, pathlib.Path, str] | None = None
    for precision in ("fp16", "int4"):
        built = work / f"genai-{precision}"
        if not (built / "genai_config.json").is_file():
            logger.info("no onnxruntime-genai %s model was built (see genai-build.log)", precision)
            continue
        for graph in (False, True):
            label = f"onnxruntime-genai {precision} (its builder){', CUDA graph' if graph else ''}"
            logger.info("timing %s", label)
            try:
                model = og.Model(str(_with_cuda_graph(built, graph)))
                _genai_run(model, prompt_ids, 8, 1)
                runs = [_genai_run(model, prompt_ids, tokens, 1) for _ in range(repeats)]
            except Exception as error:  # one configuration failing must not hide the others
                logger.info("  FAILED %s: %s", label, str(error).splitlines()[0] if str(error) else type(error).__name__)
                rows.append({"variant": label, "peer": True, "error": str(error)[:300]})
                continue
            rate = max((len(out) - 1) / decode_s for decode_s, _total, out in runs)
            rows.append({"variant": label, "provider": f"onnxruntime-genai {version} cuda", "peer": True,
                         "greedy_tokens_agreeing": agreeing_prefix(runs[0][2], reference), "decode_tokens_per_s": rate})
            if best is None or rate > best[0]:
                best = (rate, built, label)
            del model
    if best is not None:
        # genai's CUDA graph configuration refused a batched prompt on this model (its
        # GroupQueryAttention: "batch_size must be 1 when sequence_length > 1 and past context is
        # given"), so batches run the best precision with the graph option as it measured best,
        # then without it when that fails.
        _rate, built, _label = best
        for batch in BATCHES[1:]:
            for graph in (True, False):
                variant = f"onnxruntime-genai {built.name.removeprefix('genai-')} (its builder)" \
                          f"{', CUDA graph' if graph else ''}, batch {batch}"
                logger.info("timing %s", variant)
                try:
                    model = og.Model(str(_with_cuda_graph(built, graph)))
                    _genai_run(model, prompt_ids, 8, batch)
                    _decode_s, total_s, out = min((_genai_run(model, prompt_ids, tokens, batch) for _ in range(2)),
                                                  key=lambda run: run[1])
                except Exception as error:
                    rows.append({"variant": variant, "peer": True, "batch": batch, "error": str(error)[:300]})
                    continue
                rows.append({"variant": variant, "provider": f"onnxruntime-genai {version} cuda", "peer": True,
                             "batch": batch, "greedy_tokens_agreeing": agreeing_prefix(out, reference),
                             "aggregate_tokens_per_s": batch * tokens / total_s, "includes_prefill": True})
                break
    return rows
