"""Tiny seeded checkpoints built in code, for tests and quick experiments.

``tiny_checkpoint("llama", path)`` writes a Hugging Face checkpoint directory (config.json,
safetensors, a small byte-level BPE tokenizer with a chat template) that ``graphopt export`` takes
like any other. Weights are random but seeded, with a wide init so greedy decoding has clear
winners instead of near-ties.
"""

from __future__ import annotations

import pathlib

from graphopt.evaluate import forward_chunks
from graphopt.runtime.decoder import Decoder
from graphopt.runtime.session import make_session

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """The capital of France is Paris. The capital of Italy is Rome. Graphs of operators run on
many devices. A small model answers simple questions; a larger one answers harder ones. Numbers such as
0 1 2 3 4 5 6 7 8 9 appear in text, and so do words like attention, cache, token, layer and head.""".split("\n")

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2),
    # Phi-4-mini's shape in small: packed qkv / gate_up, rotary on half of each 32-wide head (a
    # multiple of 16, as GroupQueryAttention's rotary needs) and LongRoPE switching past 64 tokens.
    "phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 original_max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 initializer_range=0.2, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                     "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}),
    # Gemma 3 in small: sliding (window 8) and global layers with their own RoPE bases, q/k norms,
    # pre/post norms, scaled embeddings, GELU-tanh MLP, query_pre_attn_scalar != head_dim.
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        query_pre_attn_scalar=24, rms_norm_eps=1e-6, initializer_range=0.2,
                        # Untied: with the sqrt(hidden)-scaled embedding as its own head, a random model
                        # predicts its input token again and greedy decoding repeats one token.
                        tie_word_embeddings=False,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
}


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on a few sentences, with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A seeded random ``*ForCausalLM`` of the given family (a key of ``TINY_CONFIGS``)."""
    import torch
    import transformers

    settings = {**TINY_CONFIGS[family], **overrides}
    model_type = settings.pop("model_type")
    tokenizer = tiny_tokenizer()
    settings.setdefault("vocab_size", len(tokenizer))
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = transformers.AutoConfig.for_model(model_type, **settings, **special)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        # Norm scales and biases start as ones and zeros; give them spread, like trained weights.
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_checkpoint(family: str, path: str | pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    """Write a tiny seeded checkpoint directory (weights + tokenizer) and return its path."""
    path = pathlib.Path(path)
    model, tokenizer = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def chunked_logits(model_path, optimization: str, ids: list[int], splits: tuple[int, ...]) -> list:
    """Prefill ``ids[:splits[0]]``, then forward each further chunk on the cache; logits of each chunk.

    ``optimization="disable"`` is the reference a rewrite is compared with (ONNX Runtime's own
    graph rewrites off).
    """
    return forward_chunks(Decoder(model_path, session=make_session(model_path, optimization=optimization)), ids, splits)


def register_ort_onnx_domain_schemas() -> None:
    """ORT's SimplifiedLayerNormalization lives in the ONNX domain without an ONNX schema; declare it
    so that ``onnx.checker`` can check the rest of a cpu-target graph."""
    import onnx

    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    types = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    parameter = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[parameter("X", "T"), parameter("scale", "V")],
        outputs=[parameter("Y", "V"),
                 parameter("inv_std_var", "U", param_option=onnx.defs.OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", types, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", types, "")],
        attributes=[onnx.defs.OpSchema.Attribute(name, kind, "", required=False) for name, kind in (
                    ("axis", onnx.defs.OpSchema.AttrType.INT), ("epsilon", onnx.defs.OpSchema.AttrType.FLOAT),
                    ("stash_type", onnx.defs.OpSchema.AttrType.INT))])
    onnx.defs.register_schema(schema)
