"""Distillation on a GPU machine: heal the 25%-pruned SmolLM2, and int4 QAT, measured on eval-gpl3.

One command does it all within a wall-clock budget (``all``; what the GPU run uses):

    python tools/distill_gpu.py all --plan tools/results/distill/p25-plan.json --work /tmp/dwork --out $OUT --wall 555

It starts from the GGUF (``--gguf``, else found under /tmp, /root, the repo and its parent), and
overlaps the CPU work with the GPU work: a child process (the ``build`` stage) exports the GGUF to
ONNX, prunes it by the plan, quantizes a post-training int4 baseline (graphopt quantize's default,
affine) and measures the baselines, while this process loads the GGUF with transformers, builds
the teacher's torch form from it (no export needed) and samples the data pool on the GPU until the
child is done. Then it heals the pruned model and runs QAT (int4, all linears, affine grid) in
the time left, and prints the tables. Figures: OUT/summary.json, heal.json, qat.json, build.json;
loss curves OUT/heal-loss.png, qat-loss.png; the whole log OUT/run.log (tee'd by the caller).

Earlier stages (each one command; the GPU machine keeps WORK between commands while it stays warm):

    python tools/distill_gpu.py plan --teacher smollm2 --student smollm2-p25 --out plan.json     (here)
    python tools/distill_gpu.py prepare --src SmolLM2.gguf --plan plan.json --work WORK --out OUT
    python tools/distill_gpu.py heal --work WORK --out OUT --minutes 8
    python tools/distill_gpu.py qat --work WORK --out OUT --minutes 7

``plan`` reads which MLP channels / heads / layers the local pruned model kept (by matching its
weights to the teacher's), so the GPU machine rebuilds exactly that student from the GGUF without
shipping 400 MB of weights. ``prepare`` exports, prunes by the plan, samples the teacher's data
pool on the GPU and measures the baselines (fp32, pruned, post-training int4 RTN and GPTQ).
Every stage prints a table last and writes its figures (JSON) and loss curves (PNG) to OUT.

A distilled draft (a quarter of the layers, the ``distilled`` draft recipe's cut) trained on the
GPU and brought back to measure speculative decoding here:

    python tools/distill_gpu.py all --plan tools/results/distill/draft-plan.json --label draft --ship \
        --qat-minutes 0 --work /tmp/dwork --out $OUT ...                                      (GPU)
    python tools/distill_gpu.py land --source smollm2 --plan tools/results/distill/draft-plan.json \
        --figures OUT/heal.json -o draft-distilled                                          (here)

``--ship`` writes the weights distillation changed as float16 pieces that fit what a lent machine
returns; ``land`` cuts the local export by the same plan, checks the pieces and writes them into
the cut's graph. A later lease continues from them: carry the pieces and heal.json to the GPU
machine and run ``all ... --init heal.json --sample-offset 100`` (new data), then resume with
``heal ... --resume --warm-started``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

QUESTION = "What is the capital of France?"
WINDOWS = 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def plan(args) -> None:
    """Kept heads / channels / layers of ``student`` relative to ``teacher`` (both model directories)."""
    import onnx_ir as ir

    teacher = ir.load(str(pathlib.Path(args.teacher) / "model.onnx")).graph.initializers
    student_dir = pathlib.Path(args.student)
    student = ir.load(str(student_dir / "model.onnx")).graph.initializers
    manifest = json.loads((student_dir / "graphopt.json").read_text())
    kept = manifest["lineage"][-1]["figures"].get("kept_layers")
    head_dim = manifest["head_dim"]
    channels, heads = {}, {}
    for new, old in enumerate(kept):
        ours = student[f"model.layers.{new}.mlp.up_proj.weight"].const_value.numpy()
        theirs = teacher[f"model.layers.{old}.mlp.up_proj.weight"].const_value.numpy()
        if ours.shape != theirs.shape:
            lookup = {theirs[:, column].tobytes(): column for column in range(theirs.shape[1])}
            channels[old] = [lookup[ours[:, column].tobytes()] for column in range(ours.shape[1])]
        ours = student[f"model.layers.{new}.self_attn.q_proj.weight"].const_value.numpy()
        theirs = teacher[f"model.layers.{old}.self_attn.q_proj.weight"].const_value.numpy()
        if ours.shape != theirs.shape:
            lookup = {theirs[:, h * head_dim:(h + 1) * head_dim].tobytes(): h for h in range(theirs.shape[1] // head_dim)}
            heads[old] = [lookup[ours[:, h * head_dim:(h + 1) * head_dim].tobytes()] for h in range(ours.shape[1] // head_dim)]
    layers = json.loads((pathlib.Path(args.teacher) / "graphopt.json").read_text())["layers"]
    drop = [index for index in range(layers) if index not in kept]
    pathlib.Path(args.out).write_text(json.dumps({"heads": heads, "channels": channels, "drop": drop}))
    log(f"plan: {len(channels)} layers with channels cut, {len(heads)} with heads cut, {len(drop)} dropped")


def _evaluate(model_dir, label: str, figures: dict, chat: bool = True) -> None:
    from graphopt.evaluate import evaluate
    from graphopt.runtime import Generator

    started = time.perf_counter()
    perplexity = evaluate(model_dir, max_windows=WINDOWS).perplexity
    row = {"perplexity": round(perplexity, 3)}
    if chat:
        answer = Generator(model_dir, ep="cpu").generate_text(QUESTION, chat=True, max_new_tokens=32).text
        row["answer"] = answer.strip().replace("\n", " ")[:120]
        row["paris"] = "Paris" in answer
    figures[label] = row
    log(f"{label}: {row} ({time.perf_counter() - started:.0f} s)")


def _write(out: pathlib.Path, name: str, figures: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("\n| model | perplexity | x fp32 | chat answer contains Paris |")
    print("|---|---:|---:|---|")
    base = figures.get("fp32", {}).get("perplexity")
    for label, row in figures.items():
        if isinstance(row, dict) and "perplexity" in row:
            ratio = f"{row['perplexity'] / base:.3f}" if base else "-"
            print(f"| {label} | {row['perplexity']} | {ratio} | {row.get('paris', '-')} |")


def prepare(args) -> None:
    import torch

    from graphopt.distill import sample_data
    from graphopt.export import export
    from graphopt.quantization import QuantizeConfig, quantize

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    started = time.perf_counter()
    if not (work / "fp32" / "model.onnx").is_file():
        export(args.src, work / "fp32", force=True, run_validation=False)
    figures["export_seconds"] = round(time.perf_counter() - started, 1)
    _cut(work / "fp32", args.plan, work / "p25")
    started = time.perf_counter()
    pool = sample_data(work / "fp32", args.data_tokens, args.seq_len, seed=0, device="cuda", chunk=args.chunk)
    np.save(work / "pool.npy", pool)
    figures["sampling"] = {"tokens": int(pool.size), "rows": int(len(pool)),
                           "seconds": round(time.perf_counter() - started, 1)}
    log(f"sampled {pool.size:,} tokens in {figures['sampling']['seconds']} s")
    _evaluate(work / "fp32", "fp32", figures)
    _evaluate(work / "p25", "p25 (pruned, not distilled)", figures)
    for method in ("rtn", "gptq"):
        started = time.perf_counter()
        quantize(work / "fp32", work / f"int4-{method}", QuantizeConfig(weights="int4", activations="none",
                                                                      block_size=32, method=method, head="int4"),
                 force=True)
        _evaluate(work / f"int4-{method}", f"int4 {method} (PTQ, all linears)", figures, chat=False)
        figures[f"int4 {method} (PTQ, all linears)"]["seconds"] = round(time.perf_counter() - started, 1)
    _write(out, "prepare", figures)


def heal(args) -> None:
    """Heal on ``all``'s WORK; ``--resume`` continues the checkpoint ``all --lease-wall`` left."""
    work, out, label = pathlib.Path(args.work), pathlib.Path(args.out), args.label
    student = work / f"{label}-init" if args.warm_started else work / label
    healed = _distill_stage(args, student, work / "fp32", work / f"{label}-healed", work / "pool.npy",
                            args.minutes, None, args.lr, resume=args.resume, stop_minutes=args.stop_minutes)
    if healed is None:
        log(f"stopped after {args.stop_minutes} min with a checkpoint: run the same command again (--resume)")
        return
    figures = {"distill": healed}
    _evaluate(work / f"{label}-healed", f"{label} healed", figures)
    figures["fp32"] = {"perplexity": args.fp32_perplexity}
    if args.ship:
        figures["shipped"] = ship(work / label, work / f"{label}-healed", out)
    _write(out, "heal", figures)


SHIP_PIECE_BYTES = 15 << 20  # a lent machine returns files of at most 16 MiB


def ship(student: pathlib.Path, healed: pathlib.Path, out: pathlib.Path) -> dict:
    """The initializers distillation changed, as float16 pieces in ``out`` small enough to come back
    from a lent machine; returns their index (``land`` rebuilds the model from a local student)."""
    import hashlib

    from graphopt import ir as graph_ir

    before = graph_ir.load(student / "model.onnx").graph.initializers
    after = graph_ir.load(healed / "model.onnx").graph.initializers
    names = sorted(name for name, value in after.items()
                   if not np.array_equal(value.const_value.numpy(), before[name].const_value.numpy()))
    arrays = [after[name].const_value.numpy() for name in names]
    largest = max(float(np.abs(array).max()) for array in arrays)
    if largest > 60000:
        raise SystemExit(f"error: a trained weight ({largest:g}) does not fit float16")
    flat = np.concatenate([array.astype(np.float16).ravel() for array in arrays]).tobytes()
    tensors, offset = [], 0
    for name, array in zip(names, arrays):
        tensors.append([name, list(array.shape), offset])
        offset += array.size
    pieces = []
    for index, start in enumerate(range(0, len(flat), SHIP_PIECE_BYTES)):
        data = flat[start:start + SHIP_PIECE_BYTES]
        name = f"weights-{index}.f16"
        (out / name).write_bytes(data)
        pieces.append([name, hashlib.sha256(data).hexdigest()])
    log(f"shipped {len(names)} trained initializers ({len(flat) / 1e6:.1f} MB float16) in {len(pieces)} pieces")
    return {"tensors": tensors, "pieces": pieces, "elements": offset}


def _cut(source: pathlib.Path, plan_path: str, output: pathlib.Path) -> None:
    """``source`` pruned by a plan file (``plan``'s JSON) into ``output``."""
    from graphopt.modeldir import ModelDir
    from graphopt.pruning import Plan, apply_plan

    layout = json.loads(pathlib.Path(plan_path).read_text())
    cut = Plan(heads={int(k): v for k, v in layout["heads"].items()},
               channels={int(k): v for k, v in layout["channels"].items()}, drop=layout["drop"])
    apply_plan(ModelDir(source), cut, output, force=True)


def _shipped(figures_path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """The float32 weights of a ``--ship`` run (its heal.json and the pieces beside it), checksums checked."""
    import hashlib

    figures = json.loads(figures_path.read_text())
    index = figures["shipped"]
    pieces = []
    for name, digest in index["pieces"]:
        pieces.append((figures_path.parent / pathlib.Path(name).name).read_bytes())
        if hashlib.sha256(pieces[-1]).hexdigest() != digest:
            raise SystemExit(f"error: {name} is not the piece that was shipped (checksum)")
    flat = np.frombuffer(b"".join(pieces), dtype=np.float16)
    if flat.size != index["elements"]:
        raise SystemExit(f"error: the pieces hold {flat.size} values, the index {index['elements']}")
    weights = {name: flat[offset:offset + int(np.prod(shape))].astype(np.float32).reshape(shape)
               for name, shape, offset in index["tensors"]}
    return weights, figures


def land(args) -> None:
    """Here: the distilled model from the local export, the plan, and the pieces ``--ship`` brought back."""
    import tempfile

    from graphopt.manifest import LineageStep
    from graphopt.modeldir import ModelDir, atomic_output, derive
    from graphopt.student import write_weights

    figures_path = pathlib.Path(args.figures)
    weights, figures = _shipped(figures_path)
    distilled = figures.get("distill") or {}
    with atomic_output(pathlib.Path(args.output), force=args.force, sources=[pathlib.Path(args.source)]) as scratch, \
            tempfile.TemporaryDirectory(prefix=".land.", dir=scratch.parent) as work:
        _cut(pathlib.Path(args.source), args.plan, pathlib.Path(work) / "cut")
        source = ModelDir(pathlib.Path(work) / "cut")
        changed = write_weights(source, weights, scratch)
        step = LineageStep("distill", {"landed_from": str(figures_path), "shipped_as": "float16"},
                           figures={**{key: value for key, value in distilled.items() if key != "loss_curve"},
                                    "initializers_changed": changed})
        derive(source, scratch, step)
    log(f"{args.output}: {changed} initializers from {len(figures['shipped']['pieces'])} pieces")


def _warm_start(work: pathlib.Path, label: str, figures_path: pathlib.Path) -> pathlib.Path:
    """WORK/LABEL-init: the cut with an earlier run's shipped weights, to train on from there."""
    from graphopt.modeldir import ModelDir
    from graphopt.student import write_weights

    weights, _ = _shipped(figures_path)
    start = work / f"{label}-init"
    if start.exists():
        shutil.rmtree(start)
    shutil.copytree(work / label, start, ignore=shutil.ignore_patterns("model.onnx", "*.onnx.data"))
    changed = write_weights(ModelDir(work / label), weights, start)
    log(f"warm start: {changed} initializers from {figures_path}")
    return start


def qat(args) -> None:
    """int4 QAT of all linears on ``all``'s WORK (its fp32 export and data pool), then graphopt quantize."""
    from graphopt.quantization import QuantizeConfig, quantize

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    figures = {"distill": _distill_stage(args, work / "fp32", work / "fp32", work / "qat", work / "pool.npy",
                                         args.minutes, "int4", args.lr, resume=args.resume)}
    quantize(work / "qat", work / "qat-int4", QuantizeConfig(**INT4_ALL_LINEARS), force=True)
    _evaluate(work / "qat-int4", "int4 affine after QAT (all linears)", figures)
    figures["fp32"] = {"perplexity": args.fp32_perplexity}
    _write(out, "qat", figures)


def smoke(args) -> None:
    """The CUDA paths on a tiny model (export, prune, sampling, distill, QAT), before the long runs."""
    from graphopt.distill import DistillConfig, distill, sample_data
    from graphopt.export import export
    from graphopt.pruning import prune
    from graphopt.testing import tiny_checkpoint

    work = pathlib.Path(args.work)
    checkpoint = tiny_checkpoint("llama", work / "tiny-ckpt", num_hidden_layers=4, intermediate_size=128)
    teacher = export(str(checkpoint), work / "tiny", force=True).path
    student = prune(teacher, work / "tiny-p", heads=0.25, channels=0.3, layers=1, importance="random", force=True).path
    pool = sample_data(teacher, 64 * 32, 32, device=args.device, chunk=32)
    np.save(work / "tiny-pool.npy", pool)
    for quantize in (None, "int4"):
        config = DistillConfig(tokens=16 * 32 * 10, batch_size=16, micro_batch=8, seq_len=32, lr=3e-3,
                               data=str(work / "tiny-pool.npy"), device=args.device, eval_windows=0,
                               quantize=quantize, warmup_steps=2)
        result = distill(student, teacher, work / f"tiny-out-{quantize}", config, force=True)
        curve = result.figures["loss_curve"]
        log(f"smoke {quantize}: loss {curve[0][2]} -> {curve[-1][2]}, {result.figures['tokens_per_second']} tok/s")


GGUF_PATTERN = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(given: str | None) -> pathlib.Path:
    """The GGUF: ``given``, else the first match under the usual places (depth-limited walk)."""
    import fnmatch
    import os

    if given and given != "auto":
        return pathlib.Path(given)
    repo = pathlib.Path(__file__).resolve().parents[1]
    for root in (pathlib.Path("/tmp"), repo, repo.parent, pathlib.Path("/root"), pathlib.Path.home(),
                 pathlib.Path("/workspace")):
        if not root.is_dir():
            continue
        base_depth = len(root.parts)
        for folder, subfolders, files in os.walk(root):
            if len(pathlib.Path(folder).parts) - base_depth >= 4 or "/proc" in folder:
                subfolders[:] = []
            for name in files:
                if fnmatch.fnmatch(name, GGUF_PATTERN):
                    return pathlib.Path(folder) / name
    raise SystemExit(f"error: no {GGUF_PATTERN} found; unpack the parts of gpu-parts.sh --with-model or give --gguf")


def _site_for(gguf: pathlib.Path) -> str | None:
    """The unpacked gpu-parts folder with the ``gguf`` package transformers needs: the GGUF's own
    (SITE/models/x.gguf), else a usual place; None when ``gguf`` is importable already or nowhere."""
    import importlib.util

    repo = pathlib.Path(__file__).resolve().parents[1]
    for site in (gguf.parent.parent, pathlib.Path("/tmp/gsite"), pathlib.Path("/tmp/site"), pathlib.Path("/root/site"),
                 repo.parent / ".gpusite", repo / ".gpusite"):
        if (site / "gguf" / "__init__.py").is_file():
            return str(site)
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("error: the gguf package is not importable and no unpacked gpu-parts folder has it")
    return None


# int4 all linears (the tied LM head too), the embedding lookup left in float: with the default
# embedding (sharing the head's table) an affine int4 head costs SmolLM2 +220% perplexity (1 window:
# 60.6 against 18.9 with an int8 head and 19.1 with a float embedding), the shared table apparently
# losing the affine offsets (graphopt quantize, not this script; reported to the lead).
INT4_ALL_LINEARS = {"weights": "int4", "head": "int4", "embedding": "float"}


def build(args) -> None:
    """CPU side of ``all``: export, prune by the plan, post-training int4 baseline, baselines measured."""
    import os

    import torch

    from graphopt.export import export
    from graphopt.quantization import QuantizeConfig, quantize

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 2))
    work = pathlib.Path(args.work)
    figures: dict = {}
    started = time.perf_counter()
    export(str(args.src), work / "fp32", force=True, run_validation=False)
    figures["export_seconds"] = round(time.perf_counter() - started, 1)
    _cut(work / "fp32", args.plan, work / args.label)
    (work / "models-ready").write_text("ok")  # the parent may start training now
    _evaluate(work / "fp32", "fp32", figures)
    _evaluate(work / args.label, f"{args.label} (pruned, not distilled)", figures)
    started = time.perf_counter()
    quantize(work / "fp32", work / "int4-ptq", QuantizeConfig(**INT4_ALL_LINEARS), force=True)
    _evaluate(work / "int4-ptq", "int4 affine PTQ (all linears)", figures)
    figures["int4 affine PTQ (all linears)"]["seconds"] = round(time.perf_counter() - started, 1)
    figures["build_seconds"] = round(time.perf_counter() - started, 1)
    (work / "build.json").write_text(json.dumps(figures, indent=2) + "\n")
    log("build done")


def _hf_prompts(tokenizer) -> list[list[int]]:
    """Sampling prompts (graphopt.distill's seeds) tokenized by the GGUF's own tokenizer."""
    from graphopt.calibration import SEED_PROMPTS
    from graphopt.distill import CHAT_SEEDS, TEXT_SEEDS

    prompts = [tokenizer(text)["input_ids"] for text in (*SEED_PROMPTS, *TEXT_SEEDS)]
    for text in CHAT_SEEDS:
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
        except Exception as error:  # no template: plain text prompts only
            log(f"no chat prompts ({error})")
            break
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        prompts.append(list(ids))
    return [prompt for prompt in prompts if prompt]


def _distill_stage(args, student, teacher, output, data, minutes, quantize, lr, resume=False,
                   stop_minutes=None) -> dict | None:
    """One distillation; None when it stopped at ``stop_minutes`` (its checkpoint is ready for resume)."""
    from graphopt.distill import DistillConfig, distill, plot_loss

    config = DistillConfig(max_minutes=minutes, device=args.device, lr=lr, batch_size=args.batch_size,
                           micro_batch=args.micro_batch, seq_len=args.seq_len, data=str(data), quantize=quantize,
                           quantize_method="affine", head="int4", warmup_steps=args.warmup_steps,
                           checkpoint_minutes=2, eval_windows=WINDOWS, resume=resume,
                           stop_after_minutes=stop_minutes)
    result = distill(student, teacher, output, config, force=True)
    if result is None:
        return None
    figures = dict(result.figures)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        plot_loss(figures["loss_curve"], pathlib.Path(args.out) / f"{pathlib.Path(output).name}-loss.png",
                  title=pathlib.Path(output).name)
    except ImportError as error:
        log(f"no plot ({error})")
    return figures


def run_all(args) -> None:
    import os
    import subprocess

    import torch

    from graphopt import checkpoint
    from graphopt.distill import sample_chunk
    from graphopt.student import module_from_transformers

    started = time.perf_counter()
    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (work / "models-ready").unlink(missing_ok=True)
    gguf = find_gguf(args.gguf)
    site = _site_for(gguf)
    env = dict(os.environ)
    if site:
        sys.path.append(site)  # after the installed packages: only gguf is wanted from there
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), site]))
    log(f"GGUF {gguf} (site {site}); device {args.device}")
    summary: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    label = args.label
    child = subprocess.Popen([sys.executable, __file__, "build", "--src", str(gguf), "--plan", args.plan,
                              "--work", str(work), "--out", str(out), "--label", label], env=env)
    # GPU side meanwhile: the teacher straight from the GGUF, and the data pool.
    loaded = checkpoint.load(str(gguf))
    device = torch.device(args.device)
    teacher = module_from_transformers(loaded.model).to(device).eval()
    probe = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]], device=device)
    with torch.no_grad():
        ours = teacher(probe)[0]
        theirs = loaded.model.to(device)(probe).logits
    difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1))
    log(f"teacher from transformers vs transformers: max |logits diff| {difference:.2e} of the scale")
    if difference > 1e-3:
        raise SystemExit(f"error: the teacher's torch form differs from transformers ({difference:.2e})")
    loaded.model.to("cpu")
    prompts = _hf_prompts(loaded.tokenizer)
    log(f"{len(prompts)} sampling prompts; t={time.perf_counter() - started:.0f} s")
    pieces, index, sample_started = [], 0, time.perf_counter()
    while True:
        seed = args.sample_offset + index
        order = np.random.default_rng([0, seed]).integers(0, len(prompts), size=args.chunk)
        pieces.append(sample_chunk(teacher, [prompts[choice] for choice in order], args.seq_len, seed, device,
                                   args.sample_temperature))
        index += 1
        rows = sum(len(piece) for piece in pieces)
        elapsed = time.perf_counter() - sample_started
        log(f"sampled {rows} rows ({rows * args.seq_len / elapsed:.0f} tokens/s)")
        ready = (work / "models-ready").is_file() or child.poll() is not None
        if rows >= args.max_rows or (ready and rows >= args.min_rows):
            break
    pool = np.concatenate(pieces)
    np.save(work / "pool.npy", pool)
    summary["sampling"] = {"rows": int(len(pool)), "tokens": int(pool.size), "seconds": round(elapsed, 1),
                           "offset": args.sample_offset, "temperature": args.sample_temperature,
                           "prompts": len(prompts)}
    del teacher
    if args.device == "cuda":
        torch.cuda.empty_cache()
    while not (work / "models-ready").is_file():
        if child.poll() is not None:
            raise SystemExit(f"error: the build stage failed ({child.returncode})")
        time.sleep(1)
    log(f"models ready; t={time.perf_counter() - started:.0f} s")

    # Heal: all the time left but the QAT stage's and the evaluations' (--heal-minutes 0: QAT only).
    heal = {}
    if args.heal_minutes > 0:
        left = args.wall - (time.perf_counter() - started)
        heal_minutes, stop_minutes = args.heal_minutes, None
        if args.lease_wall:
            # The schedule spans --heal-minutes; the lease ends first: stop with a checkpoint for `heal --resume`.
            stop_minutes = (left - args.reserve) / 60 if left - args.reserve < 60 * heal_minutes else None
        else:
            heal_minutes = min(heal_minutes, (left - args.qat_minutes * 60 - args.reserve) / 60)
        if min(heal_minutes, stop_minutes or heal_minutes) <= 0.2:
            raise SystemExit(f"error: {left:.0f} s left, too little to heal")
        log(f"heal for {heal_minutes:.2f} min" + (f", stopping after {stop_minutes:.2f}" if stop_minutes else ""))
        student = _warm_start(work, label, pathlib.Path(args.init)) if args.init else work / label
        healed = _distill_stage(args, student, work / "fp32", work / f"{label}-healed", work / "pool.npy",
                                heal_minutes, None, args.lr, stop_minutes=stop_minutes)
        if healed is None:
            # The resumed call trains what is left of the schedule: give it --stop-minutes if that outlasts a call.
            log(f"heal stopped at the lease's wall; continue on this machine with: heal --work {work} --out OUT "
                f"--resume --minutes {heal_minutes} --lr {args.lr} --batch-size {args.batch_size} "
                f"--micro-batch {args.micro_batch} --warmup-steps {args.warmup_steps} --seq-len {args.seq_len} "
                f"--label {label}" + (" --ship" if args.ship else "") + (" --warm-started" if args.init else ""))
            child.wait()
            return
        heal = {"distill": healed}
        _evaluate(work / f"{label}-healed", f"{label} healed", heal)
        if args.ship:
            heal["shipped"] = ship(work / label, work / f"{label}-healed", out)
        (out / "heal.json").write_text(json.dumps(heal, indent=2) + "\n")

    left = args.wall - (time.perf_counter() - started)
    qat_minutes = min(args.qat_minutes, (left - args.reserve / 2) / 60)
    figures = {}
    if qat_minutes > 0.1:
        from graphopt.quantization import QuantizeConfig, quantize

        log(f"QAT for {qat_minutes:.2f} min")
        qat = {"distill": _distill_stage(args, work / "fp32", work / "fp32", work / "qat", work / "pool.npy",
                                         qat_minutes, "int4", args.qat_lr)}
        quantize(work / "qat", work / "qat-int4", QuantizeConfig(**INT4_ALL_LINEARS), force=True)
        _evaluate(work / "qat-int4", "int4 affine after QAT (all linears)", qat)
        (out / "qat.json").write_text(json.dumps(qat, indent=2) + "\n")
        figures["int4 affine after QAT (all linears)"] = qat["int4 affine after QAT (all linears)"]
        summary["qat"] = {key: qat["distill"].get(key) for key in ("tokens", "train_seconds", "tokens_per_second",
                                                                   "perplexity_before", "perplexity_after")}
    else:
        log(f"no time left for QAT ({left:.0f} s)")
    child.wait()
    build_figures = json.loads((work / "build.json").read_text())
    if not args.ship:  # shipped pieces leave room for few files
        shutil.copy(work / "build.json", out / "build.json")
    summary["heal"] = {key: heal.get("distill", {}).get(key) for key in ("tokens", "train_seconds", "tokens_per_second",
                                                                 "data_rows", "final_loss")}
    pruned = f"{label} (pruned, not distilled)"
    rows = {"fp32": build_figures["fp32"], pruned: build_figures[pruned],
            **({f"{label} healed": heal[f"{label} healed"]} if heal else {}),
            "int4 affine PTQ (all linears)": build_figures["int4 affine PTQ (all linears)"], **figures}
    summary["table"] = rows
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nheal: {summary['heal']}\nqat: {summary.get('qat')}\nsampling: {summary['sampling']}")
    _write(out, "summary", summary | rows)
    log(f"done in {summary['wall_seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    one = stages.add_parser("plan")
    one.add_argument("--teacher", required=True)
    one.add_argument("--student", required=True)
    one.add_argument("--out", required=True)
    every = stages.add_parser("all")
    every.add_argument("--gguf", default="auto")
    every.add_argument("--plan", required=True)
    every.add_argument("--work", required=True)
    every.add_argument("--out", required=True)
    every.add_argument("--device", default="cuda")
    every.add_argument("--wall", type=float, default=555.0, help="seconds for everything")
    every.add_argument("--reserve", type=float, default=75.0, help="seconds kept for evaluations and writing")
    every.add_argument("--heal-minutes", type=float, default=5.0)
    every.add_argument("--lease-wall", action="store_true",
                       help="heal on a schedule of --heal-minutes even past --wall: stop there with a checkpoint")
    every.add_argument("--qat-minutes", type=float, default=1.5)
    every.add_argument("--seq-len", type=int, default=512)
    every.add_argument("--chunk", type=int, default=2048, help="rows sampled at once")
    every.add_argument("--min-rows", type=int, default=16384, help="rows sampled at least (8.4 M tokens: 1.25x "
                       "fp32 after 5.5 min of healing, where 4.2 M gave 1.32-1.33x)")
    every.add_argument("--max-rows", type=int, default=65536)
    every.add_argument("--lr", type=float, default=5e-4)
    every.add_argument("--qat-lr", type=float, default=5e-5)
    every.add_argument("--batch-size", type=int, default=64)
    every.add_argument("--micro-batch", type=int, default=64)
    every.add_argument("--warmup-steps", type=int, default=30)
    child = stages.add_parser("build")
    for name in ("--src", "--plan", "--work", "--out"):
        child.add_argument(name, required=True)
    for stage in (every, child):
        stage.add_argument("--label", default="p25", help="the student's name in WORK and the tables")
    every.add_argument("--init", default=None, metavar="HEAL_JSON",
                       help="start from an earlier --ship run's weights (its heal.json, the pieces beside it)")
    every.add_argument("--sample-offset", type=int, default=0,
                       help="first sampling seed (another offset than an earlier run's gives new data)")
    every.add_argument("--sample-temperature", type=float, default=1.0,
                       help="the teacher's sampling temperature (top-p 0.95); below 1 nearer its greedy path")
    every.add_argument("--ship", action="store_true",
                       help="bring the distilled weights back: float16 pieces in OUT for `land`")
    home = stages.add_parser("land")
    home.add_argument("--source", required=True, help="the float export here (what the GPU run cut)")
    home.add_argument("--plan", required=True, help="the plan the GPU run cut it by")
    home.add_argument("--figures", required=True, help="heal.json of a --ship run, its pieces beside it")
    home.add_argument("-o", "--output", required=True)
    home.add_argument("--force", action="store_true")
    two = stages.add_parser("smoke")
    two.add_argument("--work", required=True)
    two.add_argument("--device", default="cuda")
    for name in ("prepare", "heal", "qat"):
        stage = stages.add_parser(name)
        stage.add_argument("--work", required=True)
        stage.add_argument("--out", required=True)
        stage.add_argument("--seq-len", type=int, default=512)
        if name == "prepare":
            stage.add_argument("--src", required=True)
            stage.add_argument("--plan", required=True)
            stage.add_argument("--data-tokens", type=int, default=6_000_000)
            stage.add_argument("--chunk", type=int, default=2048)
        else:
            stage.add_argument("--minutes", type=float, default=8.0)
            stage.add_argument("--resume", action="store_true", help="continue the checkpoint an earlier run left")
            stage.add_argument("--lr", type=float, default=5e-4 if name == "heal" else 1e-4)
            stage.add_argument("--batch-size", type=int, default=64)
            stage.add_argument("--micro-batch", type=int, default=16)
            stage.add_argument("--warmup-steps", type=int, default=30)
            stage.add_argument("--device", default="cuda")
            stage.add_argument("--fp32-perplexity", type=float, default=None)
            stage.add_argument("--label", default="p25", help="the student's name in WORK")
        if name == "heal":
            stage.add_argument("--ship", action="store_true", help="bring the distilled weights back (land)")
            stage.add_argument("--warm-started", action="store_true", help="the `all` run being resumed had --init")
            stage.add_argument("--stop-minutes", type=float, default=None,
                               help="end with a checkpoint this many minutes in, before the call's limit")
    args = parser.parse_args()
    if getattr(args, "sample_temperature", 1.0) <= 0:
        parser.error("--sample-temperature must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    distill_log = logging.getLogger("graphopt.distill")
    distill_log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    distill_log.addHandler(handler)
    distill_log.propagate = False
    {"plan": plan, "smoke": smoke, "prepare": prepare, "heal": heal, "qat": qat, "all": run_all,
     "build": build, "land": land}[args.stage](args)


if __name__ == "__main__":
    main()
