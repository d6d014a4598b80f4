"""Loading the tiny checkpoint through the real from_pretrained path, strictly and safely."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from ziya_model import (
    UnsafeCheckpointError,
    ZiyaBlip2ForCausalLM,
    ZiyaImageProcessor,
    load_ziya,
    loading,
    model_identity,
    write_tiny_checkpoint,
)
from ziya_model.convert import convert
from ziya_model.convert import main as convert_main
from ziya_model.tiny import main as tiny_main

VISUAL_PREFIXES = ("vision_model.", "qformer.", "language_projection.", "query_tokens")


class Payload:
    """Pickles into a call of os.system: what a malicious .bin would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _files_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_safetensors_checkpoint_loads_every_weight(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path)
    model, tokenizer, processor = load_ziya(tiny.visual_dir, tiny.llm_dir)
    on_disk = load_file(tiny.visual_dir / "model.safetensors")
    state = model.state_dict()
    assert set(on_disk) == {k for k in state if not k.startswith("language_model.")}
    assert all(k.startswith(VISUAL_PREFIXES) for k in on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    lm_disk = load_file(tiny.llm_dir / "model.safetensors")
    for name, tensor in lm_disk.items():
        assert torch.equal(state[f"language_model.{name}"], tensor), name
    assert isinstance(model.language_model, LlamaForCausalLM)
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert (tokenizer.padding_side, tokenizer.pad_token_id) == ("left", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    added = tokenizer.convert_tokens_to_ids(["<human>", "<bot>"])
    assert tokenizer("<human>:hi\n<bot>:", add_special_tokens=False).input_ids[0] == added[0]
    assert isinstance(processor, ZiyaImageProcessor) and processor.image_size == 224


def test_bin_checkpoint_loads_the_same_weights(tmp_path):
    st = write_tiny_checkpoint(tmp_path / "st", seed=3)
    bn = write_tiny_checkpoint(tmp_path / "bin", seed=3, weights_format="bin")
    assert not (bn.visual_dir / "model.safetensors").exists()
    a, _, _ = load_ziya(st.visual_dir, st.llm_dir)
    b, _, _ = load_ziya(bn.visual_dir, bn.llm_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_call_keeps_the_passed_language_model(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path)
    lm = LlamaForCausalLM.from_pretrained(tiny.llm_dir)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    model = ZiyaBlip2ForCausalLM.from_pretrained(tiny.visual_dir, language_model=lm)
    assert model.language_model is lm
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="needs language_model"):
        ZiyaBlip2ForCausalLM.from_pretrained(tiny.visual_dir)
    with pytest.raises(ValueError, match="trust_remote_code"):
        ZiyaBlip2ForCausalLM.from_pretrained(
            tiny.visual_dir, language_model=lm, trust_remote_code=True
        )
    other = write_tiny_checkpoint(tmp_path / "other")
    config = LlamaForCausalLM.from_pretrained(other.llm_dir).config
    config.hidden_size, config.intermediate_size = 48, 96
    with pytest.raises(ValueError, match="hidden size 48 does not match"):
        ZiyaBlip2ForCausalLM.from_pretrained(
            tiny.visual_dir, language_model=LlamaForCausalLM(config)
        )
    with pytest.raises(ValueError, match="weights_only"):
        ZiyaBlip2ForCausalLM.from_pretrained(tiny.visual_dir, language_model=lm, weights_only=False)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_and_unexpected_visual_keys_are_listed(tmp_path, fmt):
    tiny = write_tiny_checkpoint(tmp_path, weights_format=fmt)
    path = tiny.visual_dir / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    state = load_file(path) if fmt == "safetensors" else torch.load(path, weights_only=True)
    dropped = "qformer.layernorm.weight"
    state.pop(dropped)
    state["vision_model.extra_head.weight"] = torch.zeros(2)
    if fmt == "safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_ziya(tiny.visual_dir, tiny.llm_dir, verify=False)
    message = str(err.value)
    assert "missing keys (1): qformer.layernorm.weight" in message
    assert "unexpected keys (1): vision_model.extra_head.weight" in message


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path, weights_format="bin")
    marker = tmp_path / "payload-ran"
    bin_path = tiny.visual_dir / "pytorch_model.bin"
    state = torch.load(bin_path, weights_only=True)
    state["vision_model.post_layernorm.weight"] = Payload(marker)
    torch.save(state, bin_path)
    (tiny.visual_dir / "weights.sha256").unlink()  # the attacker also removed the manifest

    with pytest.raises(UnsafeCheckpointError, match="not a plain tensor state dict"):
        load_ziya(tiny.visual_dir, tiny.llm_dir)
    with pytest.raises(UnsafeCheckpointError):
        loading.safe_load_bin(bin_path)
    with pytest.raises(UnsafeCheckpointError):
        convert(tiny.visual_dir)
    lm = LlamaForCausalLM.from_pretrained(tiny.llm_dir)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ZiyaBlip2ForCausalLM.from_pretrained(tiny.visual_dir, language_model=lm)
    assert not marker.exists()
    # Control: the payload is real -- an unsafe unpickle of the same kind of file runs it.
    control_marker, control = tmp_path / "control-ran", tmp_path / "control.bin"
    torch.save({"w": Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


def test_old_torch_is_refused_for_bin(tmp_path, monkeypatch):
    tiny = write_tiny_checkpoint(tmp_path, weights_format="bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UnsafeCheckpointError, match=r"torch 2\.5\.1.*CVE-2025-32434"):
        load_ziya(tiny.visual_dir, tiny.llm_dir)
    safe = write_tiny_checkpoint(tmp_path / "st")
    load_ziya(safe.visual_dir, safe.llm_dir)  # safetensors needs no unpickling: still fine


def test_weights_manifest_catches_tampering(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path)
    weights = tiny.visual_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit in the last tensor: same size, different content
    weights.write_bytes(bytes(raw))
    with pytest.raises(UnsafeCheckpointError, match="sha256 differs"):
        load_ziya(tiny.visual_dir, tiny.llm_dir)
    load_ziya(tiny.visual_dir, tiny.llm_dir, verify=False)  # explicit opt-out still loads
    load_ziya(tiny.visual_dir, tiny.llm_dir, verify="size")  # same size: passes a size check
    weights.write_bytes(bytes(raw[:-4]))
    with pytest.raises(UnsafeCheckpointError, match="size"):
        loading.verify_weights_manifest(tiny.visual_dir, check_hash=False)


def test_convert_bin_to_safetensors(tmp_path, capsys):
    tiny = write_tiny_checkpoint(tmp_path, weights_format="bin")
    original = torch.load(tiny.visual_dir / "pytorch_model.bin", weights_only=True)
    assert convert_main([str(tiny.visual_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    target = tiny.visual_dir / "model.safetensors"
    assert printed["size"] == target.stat().st_size
    assert printed["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    converted = load_file(target)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    manifest = json.loads((tiny.visual_dir / "weights.sha256").read_text())["files"]
    assert manifest["model.safetensors"]["sha256"] == printed["sha256"]
    assert loading.visual_weights_file(tiny.visual_dir) == target  # preferred from now on
    with pytest.raises(FileExistsError):
        convert(tiny.visual_dir)


def test_tiny_writer_is_deterministic_and_fast(tmp_path):
    import time

    start = time.perf_counter()
    assert tiny_main([str(tmp_path / "a"), "--seed", "0"]) == 0
    elapsed = time.perf_counter() - start
    write_tiny_checkpoint(tmp_path / "b", seed=0)
    write_tiny_checkpoint(tmp_path / "c", seed=1)
    a, b, c = (_files_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert {k for k in a if a[k] != c[k]} == {
        "visual/model.safetensors",
        "visual/weights.sha256",
        "llm/model.safetensors",
        "llm/weights.sha256",
    }
    config = json.loads((tmp_path / "a" / "visual" / "config.json").read_text())
    assert (config["human_name"], config["assistant_name"], config["prompt_prefix"]) == (
        "<human>",
        "<bot>",
        "",
    )
    assert config["text_config"]["model_type"] == "llama"
    assert config["model_type"] == "blip-2" and config["num_query_tokens"] == 32
    llm_config = json.loads((tmp_path / "a" / "llm" / "config.json").read_text())
    assert llm_config["model_type"] == "llama"
    assert elapsed < 10


def test_model_identity_is_stable_and_tracks_weights(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=0)
    b = write_tiny_checkpoint(tmp_path / "b", seed=1)
    ident = model_identity(a.visual_dir, a.llm_dir)
    assert ident == model_identity(a.visual_dir, a.llm_dir)
    assert ident.startswith("ziya-visual:visual+llm@") and len(ident.split("@")[1]) == 12
    assert ident != model_identity(b.visual_dir, b.llm_dir)
