"""The torch-free runtime: sampling transforms, provider fallback, device-resident cache."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.modeldir import ModelDir
from graphopt.runtime import Decoder, DeviceDecoder, Sampling, resolve_providers
from graphopt.runtime.sampling import choose, probabilities


def test_probabilities_apply_temperature_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(probabilities(logits, Sampling(temperature=1.0)), [0.5, 0.2, 0.15, 0.1, 0.05])
    top2 = probabilities(logits, Sampling(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top2, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # top-p 0.8 keeps the smallest prefix whose mass reaches 0.8: 0.5 + 0.2 + 0.15.
    nucleus = probabilities(logits, Sampling(temperature=1.0, top_p=0.8))
    np.testing.assert_allclose(nucleus, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # top-k then top-p sorts only the k candidates; the result is the same as sorting everything.
    wide = np.random.default_rng(0).normal(size=(3, 4096)) * 3
    both = probabilities(wide, Sampling(temperature=1.0, top_k=50, top_p=0.9))
    reference = probabilities(wide, Sampling(temperature=1.0, top_k=50))
    for row, kept in zip(reference, both):
        order = np.argsort(-row)
        prefix = order[:np.searchsorted(np.cumsum(row[order]), 0.9) + 1]
        expected = np.zeros_like(row)
        expected[prefix] = row[prefix] / row[prefix].sum()
        np.testing.assert_allclose(kept, expected, atol=1e-12)
    cold = probabilities(logits, Sampling(temperature=0.5))
    np.testing.assert_allclose(cold, np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2 / np.sum(np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2))


def test_sampling_follows_the_distribution_and_greedy_takes_argmax():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    draws = np.bincount([choose(logits, Sampling(temperature=1.0), rng) for _ in range(6000)], minlength=3) / 6000
    np.testing.assert_allclose(draws, [0.6, 0.3, 0.1], atol=0.03)
    assert choose(logits, Sampling(), rng) == 0


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError):
        Sampling(temperature=-1)
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_missing_provider_falls_back_to_cpu_with_a_warning():
    with pytest.warns(UserWarning, match="CUDAExecutionProvider is not available"):
        assert resolve_providers("cuda", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown execution provider"):
        resolve_providers("npu")


def test_tensorrt_gets_engine_cache_options(tmp_path, monkeypatch):
    monkeypatch.setattr("graphopt.runtime.session.tensorrt_missing_library", lambda: None)
    providers = resolve_providers("tensorrt", available=["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                         "CPUExecutionProvider"], model_dir=tmp_path)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_device_decoder_matches_the_numpy_decoder(tiny_llama_dir):
    """The IOBinding path (device-resident cache on CUDA) run on CPU: same logits, same rollback."""
    path = ModelDir.open(tiny_llama_dir).model_path
    plain, bound = Decoder(path), DeviceDecoder(path, ep="cpu")
    ids = list(range(7, 19))
    np.testing.assert_array_equal(plain.forward(ids[:5]), bound.forward(ids[:5]))
    for decoder in (plain, bound):
        decoder.forward([3, 4, 5])
        decoder.truncate(5)
    assert bound.length == 5
    np.testing.assert_array_equal(plain.forward(ids[5:]), bound.forward(ids[5:]))
    np.testing.assert_array_equal(plain.forward([9]), bound.forward([9]))


def test_spinning_modes_set_the_session_options(tiny_llama_dir):
    """True: ORT's defaults; "run": spin within a run, stop when it returns (two sessions taking
    turns, as speculative decoding's); False: never spin; anything else is refused."""
    from graphopt.runtime.session import make_session

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except Exception:  # ORT raises when the key was never set
            return None

    model = tiny_llama_dir / "model.onnx"
    entries = {}
    for mode in (True, "run", False):
        options = make_session(model, spinning=mode).get_session_options()
        entries[mode] = {key: entry(options, key) for key in ("session.force_spinning_stop",
                                                              "session.intra_op.allow_spinning")}
    assert entries[True] == {"session.force_spinning_stop": None, "session.intra_op.allow_spinning": None}
    assert entries["run"] == {"session.force_spinning_stop": "1", "session.intra_op.allow_spinning": None}
    assert entries[False] == {"session.force_spinning_stop": None, "session.intra_op.allow_spinning": "0"}
    with pytest.raises(ValueError, match="spinning"):
        make_session(model, spinning="always")
