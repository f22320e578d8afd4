"""`graphopt distill STUDENT --teacher TEACHER -o OUT`: train a (pruned or small) model's weights to imitate a teacher."""

from __future__ import annotations

import logging
import os

import click

from graphopt.commands import say


@click.command("distill")
@click.argument("student", type=click.Path())
@click.option("--teacher", required=True, type=click.Path(), help="Teacher model directory (same tokenizer).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--tokens", type=int, default=None, metavar="N", help="Training budget in tokens (all processes).")
@click.option("--max-minutes", type=float, default=None, metavar="M",
              help="Wall-clock budget of the whole run (default: 10 when --tokens is not given either).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--lr", type=float, default=None,
              help="Peak learning rate (AdamW, cosine to 10%; default 5e-4, for QAT 3e-4 cpu, 5e-5 cuda).")
@click.option("--warmup-steps", type=int, default=None,
              help="Linear warm-up of the learning rate (default 3 cpu, 30 cuda).")
@click.option("--batch-size", type=int, default=None,
              help="Sequences per optimizer step, all processes together (default 8 cpu, 64 cuda).")
@click.option("--micro-batch", type=int, default=None,
              help="Sequences per forward on one process (memory; default 64 on cuda, else its whole share).")
@click.option("--seq-len", type=int, default=None, help="Tokens per training sequence (default 256 cpu, 512 cuda).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled data and its order.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature of the KL.")
@click.option("--ce-weight", type=float, default=0.0, show_default=True,
              help="Weight of cross-entropy on the data (the KL gets 1 - this).")
@click.option("--data", type=click.Path(), default=None,
              help="Text or JSONL ({\"text\": ...}) file; default: text the teacher samples from seed prompts.")
@click.option("--data-tokens", type=int, default=None,
              help="Size of the self-sampled pool in tokens (default 8M on cuda, 48k on cpu).")
@click.option("--teacher-runtime", type=click.Choice(["torch", "ort"]), default="torch", show_default=True,
              help="Run the teacher as torch (on --device) or with ONNX Runtime on the CPU.")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), default=None,
              help="Quantization-aware training on the weight-only pass's grid; then run graphopt quantize.")
@click.option("--quantize-method", type=click.Choice(["affine", "rtn"]), default="affine", show_default=True,
              help="QAT's int4 grid, as graphopt quantize --method (affine is its default).")
@click.option("--block-size", type=int, default=None, help="QAT block size (default: graphopt quantize's for the bits).")
@click.option("--head", "head", type=click.Choice(["auto", "float", "int8", "int4"]), default="auto", show_default=True,
              help="QAT grid of the LM head, as graphopt quantize --head (auto: int8).")
@click.option("--kernel-activations/--float-activations", "int8_activations", default=True, show_default=True,
              help="QAT rounds each quantized linear's input to int8 per block, as the CPU kernel "
                   "(accuracy_level 4) does; --float-activations trains on float inputs.")
@click.option("--train-embeddings", is_flag=True,
              help="Also train the token embedding (and a tied head; QAT of a quantized tied head always does).")
@click.option("--checkpoint-minutes", type=float, default=5.0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.ckpt/ (written every --checkpoint-minutes).")
@click.option("--eval-windows", type=int, default=4, show_default=True,
              help="Perplexity on eval-gpl3 before and after (windows of 512); 0 skips it.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Compute in bf16 (autocast, float32 weights): auto = on cuda and on CPUs with native bf16.")
@click.option("--kl-chunk-tokens", type=int, default=None,
              help="Tokens whose logits the loss holds at once (recomputed in the backward; "
                   "default 256 cpu, 4096 cuda).")
@click.option("--plot", type=click.Path(), default=None, help="Write the loss curve to this PNG.")
def command(student, teacher, output, force, tokens, max_minutes, device, lr, warmup_steps, batch_size, micro_batch, seq_len, seed,
            temperature, ce_weight, data, data_tokens, teacher_runtime, quantize, quantize_method, block_size, head,
            int8_activations, train_embeddings, checkpoint_minutes, resume, eval_windows, precision, kl_chunk_tokens, plot) -> None:
    """Train STUDENT's weights (its graph stays) on the KL to TEACHER's next-token distribution.

    Order: prune -> distill -> fuse -> quantize (fused or quantized students are refused).
    Budget: --tokens and/or --max-minutes; with neither, 10 minutes.
    Several GPUs: torchrun --nproc-per-node N -m graphopt distill ... --device cuda

    Example: graphopt distill smollm2-pruned --teacher smollm2 -o smollm2-healed --max-minutes 10
    """
    from graphopt.distill import DEFAULT_MAX_MINUTES, DistillConfig, distill, plot_loss

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("graphopt").setLevel(logging.WARNING)  # progress from process 0 only
    if tokens is None and max_minutes is None:
        max_minutes = DEFAULT_MAX_MINUTES
        say(f"  budget: {max_minutes:g} minutes (give --tokens or --max-minutes to change it)")
    config = DistillConfig(tokens=tokens, max_minutes=max_minutes, device=device, lr=lr, warmup_steps=warmup_steps,
                           batch_size=batch_size,
                           micro_batch=micro_batch, seq_len=seq_len, seed=seed, temperature=temperature,
                           ce_weight=ce_weight, data=data, data_tokens=data_tokens, teacher_runtime=teacher_runtime,
                           quantize=quantize, quantize_method=quantize_method, block_size=block_size, head=head,
                           int8_activations=int8_activations, train_embeddings=train_embeddings,
                           checkpoint_minutes=checkpoint_minutes, resume=resume,
                           eval_windows=eval_windows, precision=precision, kl_chunk_tokens=kl_chunk_tokens)
    result = distill(student, teacher, output, config, force=force)
    if result is None:
        return
    figures = result.figures
    for name in ("tokens", "train_seconds", "tokens_per_second", "final_loss", "perplexity_before", "perplexity_after"):
        if figures.get(name) is not None:
            say(f"  {name}: {figures[name]}")
    if quantize:
        method = f" --method {quantize_method}" if quantize == "int4" else ""
        block = f" --block-size {block_size}" if block_size else ""
        say(f"  next: graphopt quantize {result.model_dir.path} -o OUT --weights {quantize}{method}{block} --head {head}")
    if plot:
        plot_loss(figures["loss_curve"], plot)
    click.echo(str(result.model_dir.path))
